"""Start-up time of the data on a large set: first start (read + tokenise, then cached) vs a
second start (read back from the tokenisation cache), for standard (HH text) and
conversational (chat template) rows, and tokenising with 1 or 2 worker processes.

The set is the bundled demo rows repeated with a counter in each prompt (every row distinct),
written once to a temporary folder; each start is a fresh process (`moedpo data inspect`
would print a report; this times `build_data` alone).

    python benchmarks/data_startup.py [--rows 100000]  # -> benchmarks/results/data_startup.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "moedpo" / "assets" / "data"

CHILD = """
import sys, time, json
from moedpo.config import register_schema
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from moedpo.config import DPOConfig
register_schema()
with initialize_config_module("moedpo.conf", version_base=None):
    raw = compose("config", overrides=sys.argv[1:])
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DPOConfig), raw))
from moedpo.data import build_data
from moedpo.models.load import load_tokenizer
tokenizer = load_tokenizer(cfg.model)
started = time.perf_counter()
data = build_data(cfg, tokenizer, 512)
print(json.dumps({"seconds": time.perf_counter() - started, "train": len(data.train)}))
"""


def write_set(folder: Path, kind: str, n_rows: int) -> None:
    source = BUNDLED / ("demo_chat" if kind == "conversational" else "demo")
    for split in ("train", "test"):
        with gzip.open(source / f"{split}.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        n = n_rows if split == "train" else len(rows)
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as out:
            for i in range(n):
                row = rows[i % len(rows)]
                if kind == "conversational":
                    row = {**row, "prompt": [*row["prompt"][:-1], {
                        **row["prompt"][-1], "content": f"{row['prompt'][-1]['content']} ({i})"}]}
                else:
                    cut = row["chosen"].rfind("\n\nAssistant:")
                    row = {k: v[:cut] + f" ({i})" + v[cut:] for k, v in row.items()}
                out.write(json.dumps(row) + "\n")


def start(folder: Path, cache: Path, *extra: str) -> dict:
    overrides = ["+experiment=demo", f"datasets=[{folder}]", f"data.cache_dir={cache}", *extra]
    done = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True,
                          text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "data_startup.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("standard", "conversational"):
            folder = Path(tmp) / kind
            folder.mkdir()
            write_set(folder, kind, args.rows)
            for workers in (1, 2):
                cache = Path(tmp) / f"cache-{kind}-{workers}"
                first = start(folder, cache, f"num_proc={workers}")
                second = start(folder, cache, f"num_proc={workers}")
                results.append({"rows": kind, "num_proc": workers, "pairs": first["train"],
                                "first_s": round(first["seconds"], 2),
                                "second_s": round(second["seconds"], 2)})
                print(results[-1], flush=True)
    table = ["| rows | num_proc | train pairs | first start (s) | second start, cached (s) |",
             "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['rows']} | {r['num_proc']} | {r['pairs']} | {r['first_s']} | "
              f"{r['second_s']} |" for r in results]
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": args.rows, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
