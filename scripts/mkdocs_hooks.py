"""mkdocs hooks: the site's front page is README.md and its changelog CHANGELOG.md, so neither
is kept twice. Their links are written for GitHub's view of the repository (`docs/data.md`);
on the site the pages sit one level up (`data.md`)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
FROM_REPOSITORY = {"index.md": "README.md", "changelog.md": "CHANGELOG.md"}


def on_files(files: Files, config) -> Files:
    for page, source in FROM_REPOSITORY.items():
        text = (ROOT / source).read_text()
        text = text.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")
        text = text.replace("([LICENSE](LICENSE))", "(the repository's LICENSE file)")
        files.append(File.generated(config, page, content=text))
    return files
