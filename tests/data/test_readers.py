"""Sources read through `datasets`: parquet in the Hub's layout, csv, a save_to_disk folder
and a Hub id from the local Hub cache (offline), each giving the same pairs as the bundled
jsonl rows they were written from."""

import datasets
import pytest

from conftest import chat_rows, demo_rows
from moedpo.data.pairs import DataError, SkipLog
from moedpo.data.sources import is_hub_id, load_pairs


def pairs_of(name, split="train", **kwargs):
    return [(p.prompt, p.chosen, p.rejected, p.format)
            for p in load_pairs(name, split, {}, SkipLog(), **kwargs)]


def bundled(split, n=12):
    rows = chat_rows(split, n)
    return rows, [(r["prompt"], r["chosen"], r["rejected"], "conversational-explicit")
                  for r in rows]


def test_parquet_folder_in_the_hub_layout(tmp_path):
    for split in ("train", "test"):
        rows, _ = bundled(split)
        (tmp_path / "data").mkdir(exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(
            tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    for split in ("train", "test"):
        got = pairs_of(str(tmp_path), split)
        assert got == bundled(split)[1]
    first = load_pairs(str(tmp_path), "train", {}, SkipLog())[0].origin
    assert first == f"{tmp_path}[train] row 0"


def test_csv_folder_with_renamed_columns_and_split_names(tmp_path):
    rows = [{"question": r["chosen"][:r["chosen"].rfind("Assistant:") + 10], "good": "a",
             "bad": "b"} for r in demo_rows("train", 6)]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "train_prefs.csv")
    got = pairs_of(str(tmp_path), splits={"train": "train_prefs"},
                   columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert got == [(r["question"], "a", "b", "standard-explicit") for r in rows]
    with pytest.raises(DataError, match=r"no train.jsonl\[.gz\] for the train split, nor train "
                                        r"files .*data.splits=\{train: NAME"):
        pairs_of(str(tmp_path))


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({s: datasets.Dataset.from_list(bundled(s)[0])
                          for s in ("train", "test")}).save_to_disk(str(tmp_path / "saved"))
    assert pairs_of(str(tmp_path / "saved"), "test") == bundled("test")[1]
    with pytest.raises(DataError, match=r"no split 'dev'.*it has \['test', 'train'\]"):
        pairs_of(str(tmp_path / "saved"), splits={"train": "dev"})


def test_hub_id_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The layout `hf download --repo-type dataset org/prefs` leaves in the Hub cache.
    repo = tmp_path / "hub" / "datasets--org--prefs"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    for split in ("train_prefs", "test_prefs"):
        rows, _ = bundled(split.split("_")[0])
        (repo / "snapshots" / "c0ffee" / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(
            repo / "snapshots" / "c0ffee" / "data" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.chdir(tmp_path)  # "org/prefs" must not be a folder here
    assert is_hub_id("org/prefs")
    splits = {"train": "train_prefs", "test": "test_prefs"}
    assert pairs_of("org/prefs", "test", splits=splits) == bundled("test")[1]
    with pytest.raises(DataError, match=r"org/prefs: no split 'train'.*data.splits="):
        pairs_of("org/prefs")
    with pytest.raises(DataError, match=r"cannot load org/absent \[train\].*hf download "
                                        r"--repo-type dataset org/absent"):
        pairs_of("org/absent")


def test_parquet_folder_at_a_url():
    import io

    import fsspec

    fs = fsspec.filesystem("memory")
    for split in ("train", "test"):
        buf = io.BytesIO()
        datasets.Dataset.from_list(bundled(split)[0]).to_parquet(buf)
        fs.pipe(f"/moedpo-prefs/{split}.parquet", buf.getvalue())
    try:
        assert pairs_of("memory://moedpo-prefs", "test") == bundled("test")[1]
    finally:
        fs.rm("/moedpo-prefs", recursive=True)
