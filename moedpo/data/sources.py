"""Preference data sources: hub datasets, local copies, user folders -> (prompt, chosen, rejected).

Each source turns its own row format into `Pair`s by the original trainer's rules (README,
"Datasets"). A row that cannot be used is skipped and counted in a `SkipLog`, or, with
`data.strict=true`, stops the run with an error naming the file and line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSISTANT = "\n\nAssistant:"
EVAL_ROWS_PER_DATASET = 8552  # HH's test size; every test split is cut to it (original rule)
DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "data" / "demo"


class DataError(ValueError):
    """A user-facing data problem; the message names the file (or dataset) and line."""


class RowError(ValueError):
    """A row that cannot become a preference pair; the message is the reason."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    origin: str  # "file:line" or "hub_id[split] row N", for error messages


@dataclass
class SkipLog:
    """Counts of skipped rows by reason, with the first few locations for the report."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def skip(self, origin: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{origin}: {reason} (data.strict=true; set it false to skip "
                            "such rows)")
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{origin}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------- row formats


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        raise RowError(f"field '{key}' is a list of messages (a conversational row), which "
                       "this version does not read; render the rows to text with the model's "
                       "chat template first")
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is missing or not a string")
    return value


def _response(text: str, which: str) -> str:
    """The response as written: its leading space is part of its first token on byte-level
    BPE tokenizers (" Sure" is one token; "Sure" after a stripped boundary is others)."""
    if not text.strip():
        raise RowError(f"empty {which} response")
    return text


def _spaced(text: str) -> str:
    """A reply after a template's "Assistant:" or "TL;DR:": one space between, as the
    original DPO recipe wrote its SHP and TL;DR pairs."""
    return text if text[:1].isspace() else " " + text


def parse_hh(row: dict) -> tuple[str, str, str]:
    """Prompt = shared prefix up to its last '\\n\\nAssistant:'; responses = the rest, as
    written (" Sure...")."""
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise RowError("no '\\n\\nAssistant:' in the text shared by chosen and rejected")
    prompt = shared[: cut + len(ASSISTANT)]
    return (prompt, _response(chosen[len(prompt):], "chosen"),
            _response(rejected[len(prompt):], "rejected"))


def parse_prompt_chosen_rejected(row: dict) -> tuple[str, str, str]:
    prompt = _text(row, "prompt")
    return prompt, _response(_text(row, "chosen"), "chosen"), _response(
        _text(row, "rejected"), "rejected")


def parse_local(row: dict) -> tuple[str, str, str]:
    """User folders: prompt/chosen/rejected rows, else HH rows."""
    return parse_prompt_chosen_rejected(row) if "prompt" in row else parse_hh(row)


def parse_shp(row: dict) -> tuple[str, str, str]:
    prompt = "\n\nHuman: " + _text(row, "history") + ASSISTANT
    a, b = _text(row, "human_ref_A"), _text(row, "human_ref_B")
    label = row.get("labels")
    if label not in (0, 1):
        raise RowError(f"field 'labels' must be 0 or 1, got {label!r}")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return prompt, _spaced(_response(chosen, "chosen")), _spaced(_response(rejected, "rejected"))


CNNDM_BATCHES = {"batch0_cnndm", "cnndm0", "cnndm2"}


def parse_os(row: dict) -> tuple[str, str, str]:
    info = row.get("info")
    if not isinstance(info, dict):
        raise RowError("field 'info' is missing or not an object")
    if row.get("batch") in CNNDM_BATCHES:
        template = f"Article:\n{_text(info, 'article')}\n\nTL;DR:"
    else:
        template = (f"SUBREDDIT: r/{_text(info, 'subreddit')}\n\nTITLE: {_text(info, 'title')}"
                    f"\n\nPOST: {_text(info, 'post')}\n\nTL;DR:")
    summaries, choice = row.get("summaries"), row.get("choice")
    if not (isinstance(summaries, list) and len(summaries) == 2 and choice in (0, 1)):
        raise RowError("needs 'summaries' (two of them) and 'choice' (0 or 1)")
    texts = [_text(s, "text") if isinstance(s, dict) else "" for s in summaries]
    return ("\n\nHuman: " + template + ASSISTANT, _spaced(_response(texts[choice], "chosen")),
            _spaced(_response(texts[1 - choice], "rejected")))


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


# ---------------------------------------------------------------- readers


GZIP_MAGIC = b"\x1f\x8b"


@contextlib.contextmanager
def _open_lines(path: str) -> Iterator[io.BufferedIOBase]:
    """The file's bytes, gunzipped when they are gzip whatever the name says (gzip content
    named .jsonl, plain text named .gz). fsspec, so gs:// folders work like local ones."""
    import gzip

    import fsspec

    with fsspec.open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        if head == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped
        else:
            yield raw


def split_files(folder: str, split: str, aliases: tuple[str, ...] = ()) -> list[str]:
    """Files of one split in a local copy: `train.jsonl[.gz]` (HH's hub layout), `train.json`,
    or `*/train.json[l][.gz]` (SHP's per-domain layout)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    for name in (split, *aliases):
        for suffix in (".jsonl.gz", ".jsonl", ".json", ".json.gz"):
            if fs.isfile(f"{root}/{name}{suffix}"):
                return [_unstrip(fs, f"{root}/{name}{suffix}", folder, root)]
        nested = sorted(fs.glob(f"{root}/*/{name}.json*"))
        if nested:
            return [_unstrip(fs, p, folder, root) for p in nested]
    wanted = " or ".join(f"{n}.jsonl[.gz]" for n in (split, *aliases))
    raise DataError(f"{folder}: no {wanted} for the {split} split")


def _unstrip(fs: Any, path: str, folder: str, root: str) -> str:
    # fsspec drops the protocol from paths it returns; put it back for remote folders.
    return folder.rstrip("/") + path[len(root.rstrip("/")):] if "://" in folder else path


def read_jsonl(path: str, log: SkipLog) -> Iterator[tuple[dict, str]]:
    """(row, "file:line") for every JSON object line; a file holding one JSON array of
    objects gives (row, "file[i]"). Written by hand rather than through `datasets`' JSON
    builder, which aborts the whole file on one bad line and names no line. Lines are
    decoded one by one, so a line that is not UTF-8 is skipped, not the file."""
    import gzip
    import zlib

    number = 0
    try:
        with _open_lines(path) as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                origin = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    log.skip(origin, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                     f"{err.start + 1})")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    if number == 1 and line.lstrip().startswith("["):  # a multi-line array
                        yield from _json_array(path, line + f.read().decode("utf-8", "replace"),
                                               log)
                        return
                    log.skip(origin, f"malformed JSON ({err.msg} at column {err.colno})")
                    continue
                if isinstance(row, list) and row and all(isinstance(r, dict) for r in row):
                    yield from _json_array(path, line, log)  # an array on one line
                    continue
                if not isinstance(row, dict):
                    log.skip(origin, "line is not a JSON object")
                    continue
                yield row, origin
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: a broken gzip archive after line {number} ({err}); download "
                        "or compress it again") from None


def _json_array(path: str, text: str, log: SkipLog) -> Iterator[tuple[dict, str]]:
    """A .json file that is one array of row objects (as many exports are)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: starts like one JSON array but is not valid JSON ({err.msg} "
                        f"at line {err.lineno}); give JSON lines (one object per line) or a "
                        "valid array") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: not JSON lines and not an array of objects")
    for index, row in enumerate(rows):
        origin = f"{path}[{index}]"
        if isinstance(row, dict):
            yield row, origin
        else:
            log.skip(origin, "array item is not a JSON object")


def read_hub(source: HubSource, split: str, num_proc: int = 1) -> Iterator[tuple[dict, str]]:
    import datasets

    hub_split = source.splits[split]
    try:
        table = datasets.load_dataset(source.hub_id, source.config, split=hub_split,
                                      num_proc=num_proc if num_proc > 1 else None)
    except Exception as err:  # datasets raises many types; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get(
            "HF_DATASETS_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 and it is not in the hub cache)" if offline else ""
        name = next(k for k, v in HUB_SOURCES.items() if v is source)
        raise DataError(
            f"cannot load {source.hub_id} [{hub_split}]{hint}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}; download it, or point "
            f"dataset_dir.{name}=DIR at a local copy holding {split}.jsonl.gz"
        ) from None
    for index, row in enumerate(table):
        yield row, f"{source.hub_id}[{hub_split}] row {index}"


# ---------------------------------------------------------------- entry point


def load_pairs(name: str, split: str, dataset_dir: dict[str, str | None],
               log: SkipLog, num_proc: int = 1) -> list[Pair]:
    """All usable pairs of one dataset split; `name` is hh/shp/os/demo or a folder."""
    if name in HUB_SOURCES:
        source = HUB_SOURCES[name]
        local = dataset_dir.get(name)
        if local:
            aliases = tuple(v for k, v in source.splits.items() if k == split and v != split)
            rows = (r for path in split_files(local, split, aliases) for r in read_jsonl(path, log))
        else:
            rows = read_hub(source, split, num_proc)
        parse = source.parse
    else:
        folder = str(DEMO_DIR) if name == "demo" else name
        rows = (r for path in split_files(folder, split) for r in read_jsonl(path, log))
        parse = parse_local
    pairs = []
    for row, origin in rows:
        try:
            prompt, chosen, rejected = parse(row)
        except RowError as err:
            log.skip(origin, str(err))
            continue
        pairs.append(Pair(prompt, chosen, rejected, origin))
    return pairs
