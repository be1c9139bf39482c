"""Conversational rows of every layout, grouped as TRL needs them (one Arrow schema per
group), and TRL 1.16's DPOTrainer preprocessing of them: shared by the tests and by
`python tests/data/pin_trl_chat_ids.py`, which writes the pinned fixture."""

from __future__ import annotations

import json
import types
from pathlib import Path

from conftest import chat_rows

FIXTURE = Path(__file__).parent / "fixtures" / "trl_chat_ids.json"
SYSTEM = {"role": "system", "content": "Answer briefly."}
TOOLS = json.dumps([{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}])


def chat_groups(kind: str) -> dict[str, list[dict]]:
    rows = chat_rows("train", 8)
    groups = {
        "explicit": rows,
        "implicit": [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                     for r in rows],
        "system": [{**r, "prompt": [SYSTEM, *r["prompt"]]} for r in rows],
        # UltraFeedback binarized's layout: a text prompt beside full conversations.
        "text-prompt-beside": [{"prompt": r["prompt"][-1]["content"],
                                "chosen": r["prompt"] + r["chosen"],
                                "rejected": r["prompt"] + r["rejected"]} for r in rows],
    }
    if kind == "chatml":
        groups["tools"] = [{**r, "tools": TOOLS} for r in rows]
        # The generation prompt opens a <think> block the rendered answers do not have: the
        # prompt's ids are not a prefix of prompt+response's.
        groups["thinking"] = [{**r, "chat_template_kwargs": {"enable_thinking": True}}
                              for r in rows]
    return groups


def trl_chat_ids(tokenizer, rows: list[dict]) -> list[list[list[int]]]:
    """TRL's own `_prepare_dataset` on `rows` (after `maybe_extract_prompt`, which its
    DPOTrainer leaves to the user for a text prompt beside conversations)."""
    import datasets
    import trl
    from trl.data_utils import maybe_extract_prompt

    args = trl.DPOConfig(output_dir="unused", max_length=None, report_to=[], bf16=False,
                         use_cpu=True)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    data = datasets.Dataset.from_list([maybe_extract_prompt(r) for r in rows])
    out = trl.DPOTrainer._prepare_dataset(trainer, data, tokenizer, args, "train")
    return [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in out]
