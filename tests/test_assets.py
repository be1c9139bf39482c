"""The embedded default is generated: rebuilding it gives the shipped bytes."""

import subprocess
import sys
from pathlib import Path

from moedpo.config import ASSETS_DIR, MODEL_JSON_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_build_assets_is_deterministic_and_matches_shipped(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_assets.py"), "--out",
                    str(tmp_path / "assets"), "--models-dir", str(tmp_path / "models")],
                   check=True, capture_output=True)
    shipped = sorted(p.relative_to(ASSETS_DIR) for p in ASSETS_DIR.rglob("*") if p.is_file())
    rebuilt = sorted(p.relative_to(tmp_path / "assets")
                     for p in (tmp_path / "assets").rglob("*") if p.is_file())
    assert shipped == rebuilt
    for rel in shipped:
        assert (ASSETS_DIR / rel).read_bytes() == (tmp_path / "assets" / rel).read_bytes(), rel
    tiny = "tiny-mixtral.json"
    assert (MODEL_JSON_DIR / tiny).read_bytes() == (tmp_path / "models" / tiny).read_bytes()
