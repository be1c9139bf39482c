"""Rows of one split, as (row dict, origin) from wherever they live.

- JSON lines / JSON arrays (.jsonl, .json, gzipped or not; local or fsspec URLs): read here
  line by line, so that one bad line is skipped and named ("file:line") instead of aborting
  the file as `datasets`' JSON builder does.
- Every other layout `datasets` reads: parquet, csv or arrow files in a folder (any of its
  split-file patterns, e.g. the Hub's `data/train-00000-of-00001.parquet`), a
  `save_to_disk` folder, a Hub dataset id (downloaded, or from the local Hub cache offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .pairs import DataError, SkipLog

GZIP_MAGIC = b"\x1f\x8b"
Rows = Iterator[tuple[dict, str]]


@dataclass
class Split:
    """One split of a source: its rows (read lazily, when iterated) and a digest of its
    content's version, for the tokenisation cache (the files' fsspec `ukey`s: size and
    mtime locally, ETag or checksum remotely; a `datasets` table's fingerprint)."""

    rows: Rows
    digest: str


def files_digest(paths: list[str]) -> str:
    import fsspec

    h = hashlib.sha256()
    for path in paths:
        fs, local = fsspec.core.url_to_fs(path)
        h.update(f"{path}\0{fs.ukey(local)}\0".encode())
    return h.hexdigest()


def json_split(files: list[str], log: SkipLog) -> Split:
    return Split((r for path in files for r in read_jsonl(path, log)), files_digest(files))


def table_split(table: Any, where: str) -> Split:
    # A streamed (Iterable) dataset has no fingerprint: it is never cached.
    return Split(_table_rows(table, where), f"datasets:{getattr(table, '_fingerprint', '')}")


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


def json_files(folder: str, split: str, aliases: tuple[str, ...] = ()) -> list[str]:
    """JSON files of one split in a folder: `train.jsonl[.gz]` (HH's hub layout),
    `train.json`, or `*/train.json[l][.gz]` (SHP's per-domain layout); [] if none."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    for name in (split, *aliases):
        for suffix in (".jsonl.gz", ".jsonl", ".json", ".json.gz"):
            if fs.isfile(f"{root}/{name}{suffix}"):
                return [_unstrip(f"{root}/{name}{suffix}", folder, root)]
        nested = sorted(fs.glob(f"{root}/*/{name}.json*"))
        if nested:
            return [_unstrip(p, folder, root) for p in nested]
    return []


def _unstrip(path: str, folder: str, root: str) -> str:
    # fsspec drops the protocol from paths it returns; put it back for remote folders.
    return folder.rstrip("/") + path[len(root.rstrip("/")):] if "://" in folder else path


def read_jsonl(path: str, log: SkipLog) -> Rows:
    """(row, "file:line") for every JSON object line; a file holding one JSON array of
    objects gives (row, "file[i]"). Lines are decoded one by one, so a line that is not
    UTF-8 is skipped, not the file."""
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
                if isinstance(row, list) and any(isinstance(r, dict) for r in row):
                    # an array of rows on one line: each item read (or skipped) on its own
                    yield from _json_array(path, line, log)
                    continue
                if not isinstance(row, dict):
                    log.skip(origin, "line is not a JSON object")
                    continue
                yield row, origin
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: a broken gzip archive after line {number} ({err}); download "
                        "or compress it again") from None


def _json_array(path: str, text: str, log: SkipLog) -> Rows:
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


# ---------------------------------------------------------------- through `datasets`

# File types `datasets` reads, by its builder name.
TABLE_TYPES = {"parquet": "parquet", "csv": "csv", "arrow": "arrow"}
# Where a split's files sit in a folder: `train.parquet`, `train-00000-of-00002.parquet`,
# `data/train-...` (the Hub's layout), `train/part-0.parquet`.
SPLIT_PATTERNS = ("{split}.{ext}", "{split}-*.{ext}", "data/{split}.{ext}",
                  "data/{split}-*.{ext}", "{split}/*.{ext}")


def table_files(folder: str, split: str) -> tuple[str, list[str]]:
    """(datasets builder, files) of one split in a folder; ("", []) if none. Matched here
    rather than by `datasets`' own inference, which knows only train/test/validation names
    outside the Hub's `split-0000n-of-0000m` pattern (UltraFeedback's train_prefs.parquet)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    for ext, builder in TABLE_TYPES.items():
        for pattern in SPLIT_PATTERNS:
            found = sorted(fs.glob(f"{root}/{pattern.format(split=split, ext=ext)}"))
            if found:
                return builder, [_unstrip(p, folder, root) for p in found]
    return "", []


@contextlib.contextmanager
def _damaged(where: str) -> Iterator[None]:
    """`datasets` and pyarrow reading a damaged file raise what they meet (ArrowInvalid,
    OSError, JSONDecodeError from a dataset_info.json, ...): one DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001  (any failure reading the files is the files')
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise DataError(f"{where}: cannot be read ({type(err).__name__}: "
                        f"{lines[0] if lines else 'no message'}); the files may be truncated "
                        "or damaged: download or write them again") from None


def _table_rows(table: Any, where: str) -> Rows:
    with _damaged(where):  # a streamed table reads its files only here
        for index, row in enumerate(table):
            yield row, f"{where} row {index}"


def _split_error(where: str, split: str, err: Exception) -> DataError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return DataError(f"{where}: no split '{split}' ({first}); name the splits with "
                     "data.splits={train: NAME, test: NAME}")


def folder_split(folder: str, split: str, log: SkipLog, aliases: tuple[str, ...] = (),
                 num_proc: int = 1, streaming: bool = False) -> Split:
    """One split of a folder: JSON files read here, any other layout by `datasets`."""
    import datasets

    files = json_files(folder, split, aliases)
    if files:
        return json_split(files, log)
    if "://" not in folder and os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        with _damaged(folder):
            table = datasets.load_from_disk(folder)  # a DatasetDict written by save_to_disk
        if split not in table:
            raise _split_error(folder, split, KeyError(f"it has {sorted(table)}"))
        rows = table[split].to_iterable_dataset() if streaming else table[split]
        return table_split(rows, f"{folder}[{split}]")
    builder, found = table_files(folder, split)
    if not found:
        wanted = " or ".join(f"{n}.jsonl[.gz]" for n in (split, *aliases))
        raise DataError(f"{folder}: no {wanted} for the {split} split, nor {split} files in "
                        f"another format datasets reads ({', '.join(TABLE_TYPES)}: "
                        f"{split}.parquet, data/{split}-00000-of-00001.parquet, ...); name "
                        "other split names with data.splits={train: NAME, test: NAME}")
    with _damaged(f"{folder}[{split}]"):
        table = datasets.load_dataset(builder, data_files={split: found}, split=split,
                                      streaming=streaming,
                                      **({"num_proc": num_proc} if num_proc > 1
                                         and not streaming else {}))
    return table_split(table, f"{folder}[{split}]")


def hub_split(hub_id: str, config: str | None, split: str, num_proc: int = 1,
              hint: str = "", streaming: bool = False) -> Split:
    """Rows of a Hub dataset split: `datasets.load_dataset`, else (offline, or the Hub out of
    reach) the snapshot in the local Hub cache (`hf download --repo-type dataset ID`)."""
    import datasets

    where = f"{hub_id}[{split}]"
    try:
        table = datasets.load_dataset(hub_id, config, split=split, streaming=streaming,
                                      **({"num_proc": num_proc} if num_proc > 1 and not
                                         streaming else {}))
    except ValueError as err:
        if "unknown split" in str(err).lower():
            raise _split_error(hub_id, split, err) from None
        table = _cached_snapshot(hub_id, config, split, err, hint, streaming)
    except Exception as err:  # datasets raises many types; all mean "not available here"
        table = _cached_snapshot(hub_id, config, split, err, hint, streaming)
    return table_split(table, where)


def _cached_snapshot(hub_id: str, config: str | None, split: str, err: Exception,
                     hint: str, streaming: bool = False) -> Any:
    import datasets
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(hub_id, repo_type="dataset", local_files_only=True)
    except Exception:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get(
            "HF_DATASETS_OFFLINE") == "1"
        why = " (HF_HUB_OFFLINE=1 and it is not in the hub cache)" if offline else ""
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"cannot load {hub_id} [{split}]{why}: {type(err).__name__}: {first}; "
                        f"download it (hf download --repo-type dataset {hub_id}){hint}") from None
    try:
        return datasets.load_dataset(local, config, split=split, streaming=streaming)
    except ValueError as split_err:
        raise _split_error(hub_id, split, split_err) from None
