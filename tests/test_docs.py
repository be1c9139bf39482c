"""The docs stay true to the code: the config reference is what the schema renders, every key
is declared with its documentation, every declared rule is enforced, and every loss of the
registry is on its family's page."""

from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path

import pytest

from moedpo.config import ConfigError, DPOConfig, check_settings, schema_keys, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import config_reference  # noqa: E402


def test_the_config_reference_is_generated_from_the_schema():
    page = ROOT / "docs" / "reference" / "config.md"
    assert page.read_text() == config_reference.render(), (
        "docs/reference/config.md is not what moedpo/config.py renders: run `make docs`")


def test_every_key_of_the_schema_is_a_documented_setting():
    declared = {key for key, _, _ in settings()}
    sections = {key for key in schema_keys()
                if any(other.startswith(key + ".") for other in declared)}
    # A dict-valued key (dataset_dir, data.splits) is declared once, its entries with it.
    entries = {key for key in schema_keys() if "." in key and key.rsplit(".", 1)[0] in declared}
    assert set(schema_keys()) - sections - entries == declared
    assert len(declared) > 100
    for key, f, group in settings():
        assert len(f.metadata["help"]) > 10 and group, key
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert all(f"| `{key}` |" in page for key in declared)


def _with(key: str, value: object) -> DPOConfig:
    cfg = DPOConfig()
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)
    return cfg


def _cases():
    for key, f, _ in settings():
        bounds = f.metadata["bounds"]
        integer = f.type.startswith("int")
        step = 1 if integer else 0.25
        for op, limit in bounds.items():
            if math.isinf(limit):
                continue
            inside, outside = {"ge": (limit, limit - step), "gt": (limit + step, limit),
                               "le": (limit, limit + step), "lt": (limit - step, limit)}[op]
            yield pytest.param(key, inside, outside, id=f"{key}-{op}")


@pytest.mark.parametrize("key, inside, outside", list(_cases()))
def test_each_declared_range_is_enforced_at_its_edge(key, inside, outside):
    check_settings(_with(key, inside))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}={outside}: must be "):
        check_settings(_with(key, outside))


@pytest.mark.parametrize("key", [k for k, f, _ in settings() if f.metadata["choices"]])
def test_each_declared_name_list_is_enforced(key):
    f = next(f for k, f, _ in settings() if k == key)
    listed = f.type.startswith("list")
    for choice in f.metadata["choices"]:
        check_settings(_with(key, [choice] if listed else choice))
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}.*'?nonsense'?.* one of "
                                          f"{re.escape(', '.join(f.metadata['choices']))}"
                                          f"{' or null' if 'None' in f.type else ''}$"):
        check_settings(_with(key, ["nonsense"] if listed else "nonsense"))


def test_ranges_read_as_written_by_hand():
    from moedpo.config import _bounds_text

    assert _bounds_text({"ge": 0, "lt": 0.5}) == "in [0, 0.5)"
    assert _bounds_text({"gt": 0, "le": 1}) == "in (0, 1]"
    assert _bounds_text({"gt": 0, "lt": math.inf}) == "a finite number > 0"
    assert _bounds_text({"lt": 0}) == "< 0"
    with pytest.raises(ConfigError, match=r"^lr=inf: must be a finite number > 0$"):
        check_settings(_with("lr", math.inf))
    with pytest.raises(ConfigError, match=r"^loss\.label_smoothing=0\.5: must be in \[0, 0\.5\)$"):
        check_settings(_with("loss.label_smoothing", 0.5))
    check_settings(_with("per_device_eval_batch_size", None))  # null passes where allowed
    with pytest.raises(ConfigError, match=r"^model\.lora\.r=True: must be >= 0$"):
        check_settings(_with("model.lora.r", True))  # a bool is not a number here


def test_every_loss_is_on_its_family_page():
    from moedpo.losses import LOSSES

    pages = {p.stem.replace("-", "_"): p.read_text()
             for p in (ROOT / "docs" / "losses").glob("*.md") if p.stem != "index"}
    for name, loss in LOSSES.items():
        family = loss.fn.__module__.rsplit(".", 1)[1]
        on = [stem for stem, text in pages.items() if f"| `{name}` |" in text]
        assert on == [family], f"loss {name} ({family}) is on the pages {on}"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "moedpo"
    # A package's __init__.py that holds code is a module of its own (data/__init__.py).
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*.py")
               if p.name != "__init__.py" or p.parent != package and any(
                   not isinstance(node, ast.Expr) for node in ast.parse(p.read_text()).body)]
    missing = [m for m in modules if not re.search(rf"^  {re.escape(m)} ", page, re.M)]
    assert not missing, f"add these to docs/architecture.md's tree: {missing}"
