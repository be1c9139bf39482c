"""Preference data sources -> `Pair`s: the original trainer's three Hub sets by their own
rules, the bundled sets, and whatever users bring (folders, Hub ids) in any row format of
`formats.py`.

A row that cannot be used is skipped and counted in a `SkipLog`, or, with
`data.strict=true`, stops the run with an error naming the file and line. A source whose
first row fits no format stops the run at once (its keys are wrong, not one row).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .formats import ASSISTANT, ShapeError, parse_hh, parse_row, response, text
from .pairs import DataError, Pair, RowError, SkipLog
from .readers import Split, folder_split, hub_split, json_files, json_split

__all__ = ["ASSISTANT", "BUNDLED", "DataError", "EVAL_ROWS_PER_DATASET", "HUB_SOURCES", "Pair",
           "RowError", "SkipLog", "is_hub_id", "load_pairs", "parse_hh", "parse_os",
           "parse_shp"]

EVAL_ROWS_PER_DATASET = 8552  # HH's test size; every test split is cut to it (original rule)
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"
DEMO_DIR = BUNDLED_DIR / "demo"
# Shipped sets: the HH-format demo and the same dialogues as chat messages.
BUNDLED = ("demo", "demo_chat")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """`org/name`, and not a folder of that name here."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


# ---------------------------------------------------------------- the original three


def _spaced(value: str) -> str:
    """A reply after a template's "Assistant:" or "TL;DR:": one space between, as the
    original DPO recipe wrote its SHP and TL;DR pairs."""
    return value if value[:1].isspace() else " " + value


def parse_shp(row: dict) -> tuple[str, str, str]:
    prompt = "\n\nHuman: " + text(row, "history") + ASSISTANT
    a, b = text(row, "human_ref_A"), text(row, "human_ref_B")
    label = row.get("labels")
    if label not in (0, 1):
        raise RowError(f"field 'labels' must be 0 or 1, got {label!r}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return prompt, _spaced(response(chosen, "chosen")), _spaced(response(rejected, "rejected"))


CNNDM_BATCHES = {"batch0_cnndm", "cnndm0", "cnndm2"}


def parse_os(row: dict) -> tuple[str, str, str]:
    info = row.get("info")
    if not isinstance(info, dict):
        raise RowError("field 'info' is missing or not an object")
    if row.get("batch") in CNNDM_BATCHES:
        template = f"Article:\n{text(info, 'article')}\n\nTL;DR:"
    else:
        template = (f"SUBREDDIT: r/{text(info, 'subreddit')}\n\nTITLE: {text(info, 'title')}"
                    f"\n\nPOST: {text(info, 'post')}\n\nTL;DR:")
    summaries, choice = row.get("summaries"), row.get("choice")
    if not (isinstance(summaries, list) and len(summaries) == 2 and choice in (0, 1)):
        raise RowError("needs 'summaries' (two of them) and 'choice' (0 or 1)")
    texts = [text(s, "text") if isinstance(s, dict) else "" for s in summaries]
    return ("\n\nHuman: " + template + ASSISTANT, _spaced(response(texts[choice], "chosen")),
            _spaced(response(texts[1 - choice], "rejected")))


@dataclass(frozen=True)
class HubSource:
    hub_id: str
    config: str | None
    splits: dict[str, str]  # our split -> the hub's split
    parse: Callable[[dict], tuple[str, str, str]]


HUB_SOURCES = {
    "hh": HubSource("Anthropic/hh-rlhf", None, {"train": "train", "test": "test"}, parse_hh),
    "shp": HubSource("stanfordnlp/SHP", None, {"train": "train", "test": "test"}, parse_shp),
    "os": HubSource("openai/summarize_from_feedback", "comparisons",
                    {"train": "train", "test": "validation"}, parse_os),
}


def _original_split(name: str, split: str, local: str | None, log: SkipLog,
                    num_proc: int, streaming: bool = False) -> Split:
    source = HUB_SOURCES[name]
    if not local:
        return hub_split(source.hub_id, source.config, source.splits[split], num_proc,
                         hint=f", or point dataset_dir.{name}=DIR at a local copy holding "
                              f"{split}.jsonl.gz", streaming=streaming)
    aliases = tuple(v for k, v in source.splits.items() if k == split and v != split)
    files = json_files(local, split, aliases)
    if not files:
        wanted = " or ".join(f"{n}.jsonl[.gz]" for n in (split, *aliases))
        raise DataError(f"{local}: no {wanted} for the {split} split")
    return json_split(files, log)


# ---------------------------------------------------------------- entry point


def open_split(name: str, split: str, dataset_dir: dict[str, str | None], log: SkipLog,
               num_proc: int = 1, splits: dict[str, str] | None = None,
               columns: dict[str, str] | None = None,
               streaming: bool = False) -> tuple[Split, Callable[[dict, str], Pair]]:
    """(the split, its row parser) of a source: hh/shp/os by their own rules; a bundled set,
    a folder (local or URL) or a Hub id in any format of `formats.py`."""
    if name in HUB_SOURCES:
        parse = HUB_SOURCES[name].parse
        kind = "standard-implicit" if name == "hh" else "standard-explicit"
        return (_original_split(name, split, dataset_dir.get(name), log, num_proc, streaming),
                lambda row, origin: Pair(*parse(row), origin, kind))
    theirs = (splits or {}).get(split, split)
    if is_hub_id(name):
        source = hub_split(name, None, theirs, num_proc, streaming=streaming)
    else:
        folder = str(BUNDLED_DIR / name) if name in BUNDLED else name
        source = folder_split(folder, theirs, log, num_proc=num_proc, streaming=streaming)
    return source, lambda row, origin: parse_row(row, origin, columns)


def read_pairs(source: Split, parse: Callable[[dict, str], Pair], log: SkipLog) -> list[Pair]:
    """The usable pairs of a split; a first row that fits no format stops the source."""
    pairs = []
    for index, (row, origin) in enumerate(source.rows):
        try:
            pairs.append(parse(row, origin))
        except ShapeError as err:
            if index == 0:
                raise DataError(f"{origin}: {err}") from None
            log.skip(origin, str(err))
        except RowError as err:
            log.skip(origin, str(err))
    return pairs


def load_pairs(name: str, split: str, dataset_dir: dict[str, str | None], log: SkipLog,
               num_proc: int = 1, splits: dict[str, str] | None = None,
               columns: dict[str, str] | None = None) -> list[Pair]:
    """All usable pairs of one split ("train" or "test") of a source. `splits` names the
    source's own splits ({train: train_prefs, ...}); `columns` renames its keys."""
    return read_pairs(*open_split(name, split, dataset_dir, log, num_proc, splits, columns), log)
