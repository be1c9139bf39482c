"""Row formats of preference data, detected per row: text or messages, prompt given or implied.

    standard-explicit        {"prompt": str, "chosen": str, "rejected": str}
    standard-implicit        {"chosen": str, "rejected": str}   (HH: prompt up to the last
                             "\\n\\nAssistant:" the two share)
    conversational-explicit  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
    conversational-implicit  {"chosen": [msgs], "rejected": [msgs]}   (prompt: the longest
                             common leading run of messages; a text "prompt" beside them, as
                             UltraFeedback binarized has, is ignored as TRL does)
    unpaired                 {"prompt", "completion", "label": bool}   (text or message lists;
                             loss.name=kto / apo_zero_unpaired)

Messages are {"role": ..., "content": ...} dicts. Conversational rows may carry `tools` (a
list or its JSON text) and `chat_template_kwargs` (a dict), passed to the chat template.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .pairs import Messages, Pair, RowError


class ShapeError(RowError):
    """A row whose keys fit no format: on a source's first row, the whole source is wrong."""

ASSISTANT = "\n\nAssistant:"

FORMATS = {
    "standard-explicit": '{"prompt": "\\n\\nHuman: 2+2?\\n\\nAssistant:", "chosen": " 4.", '
                         '"rejected": " 5."}',
    "standard-implicit": '{"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4.", '
                         '"rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5."}',
    "conversational-explicit": '{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": '
                               '[{"role": "assistant", "content": "4."}], "rejected": '
                               '[{"role": "assistant", "content": "5."}]}',
    "conversational-implicit": '{"chosen": [{"role": "user", "content": "2+2?"}, {"role": '
                               '"assistant", "content": "4."}], "rejected": [{"role": "user", '
                               '"content": "2+2?"}, {"role": "assistant", "content": "5."}]}',
    "unpaired": '{"prompt": "2+2?", "completion": " 4.", "label": true}',
}
ACCEPTED = ("prompt/chosen/rejected or chosen/rejected (text or message lists), or "
            "prompt/completion/label (unpaired)")


def is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value))


def detect(row: dict) -> str:
    """The row's format (a FORMATS key); RowError naming the keys found if it has none."""
    if "chosen" in row and "rejected" in row:
        if is_messages(row["chosen"]) or is_messages(row["rejected"]):
            return ("conversational-explicit" if is_messages(row.get("prompt"))
                    else "conversational-implicit")
        return "standard-explicit" if "prompt" in row else "standard-implicit"
    if "completion" in row and "label" in row:
        return "unpaired"
    raise ShapeError(f"not a preference row: keys {sorted(row)}; accepted: {ACCEPTED}; "
                   "rename columns with data.columns={prompt: KEY, chosen: KEY, rejected: KEY}")


def renamed(row: dict, columns: dict[str, str]) -> dict:
    """`data.columns` ({ours: theirs}) applied: row[theirs] read as row[ours]."""
    if not columns:
        return row
    missing = [theirs for theirs in columns.values() if theirs not in row]
    if missing:
        raise ShapeError(f"data.columns names {missing}, not in the row (keys: {sorted(row)})")
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({ours: row[theirs] for ours, theirs in columns.items()})
    return out


# ---------------------------------------------------------------- standard (text) rows


def text(row: dict, key: str) -> str:
    value = row.get(key)
    if is_messages(value):
        raise RowError(f"field '{key}' is a list of messages while the others are text; give "
                       "all of prompt/chosen/rejected as text or all as messages")
    if not isinstance(value, str):
        raise RowError(f"field '{key}' is missing or not a string")
    return value


def response(value: str, which: str) -> str:
    """The response as written: its leading space is part of its first token on byte-level
    BPE tokenizers (" Sure" is one token; "Sure" after a stripped boundary is others)."""
    if not value.strip():
        raise RowError(f"empty {which} response")
    return value


def parse_hh(row: dict) -> tuple[str, str, str]:
    """Prompt = shared prefix up to its last '\\n\\nAssistant:'; responses = the rest, as
    written (" Sure...")."""
    chosen, rejected = text(row, "chosen"), text(row, "rejected")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise RowError("no '\\n\\nAssistant:' in the text shared by chosen and rejected (a "
                       "standard row without a prompt); give a 'prompt' field")
    prompt = shared[: cut + len(ASSISTANT)]
    return (prompt, response(chosen[len(prompt):], "chosen"),
            response(rejected[len(prompt):], "rejected"))


def parse_prompt_chosen_rejected(row: dict) -> tuple[str, str, str]:
    return (text(row, "prompt"), response(text(row, "chosen"), "chosen"),
            response(text(row, "rejected"), "rejected"))


# ---------------------------------------------------------------- conversational rows


def messages(row: dict, key: str) -> Messages:
    value = row.get(key)
    if not is_messages(value):
        raise RowError(f"field '{key}' is not a list of messages ({{'role', 'content'}} dicts)"
                       "; give all of chosen/rejected as messages or all as text")
    return list(value)


def template_kwargs(row: dict) -> dict[str, Any] | None:
    """The row's `tools` and `chat_template_kwargs`, for the chat template (TRL's keys)."""
    given = row.get("chat_template_kwargs") or {}
    if isinstance(given, str):  # JSON text, as tables store nested fields
        try:
            given = json.loads(given)
        except json.JSONDecodeError as err:
            raise RowError(f"field 'chat_template_kwargs' is text but not JSON ({err.msg})"
                           ) from None
    if not isinstance(given, dict):
        raise RowError(f"field 'chat_template_kwargs' is a {type(given).__name__}: give an "
                       "object of template variables, e.g. {\"enable_thinking\": false}")
    kwargs = dict(given)
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise RowError(f"field 'tools' is text but not JSON ({err.msg})") from None
    if tools:
        kwargs["tools"] = tools
    return kwargs or None


def split_conversation(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages,
                                                                     Messages]:
    """Prompt = the longest common leading run of messages; responses = the rest."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        raise RowError("chosen and rejected are the same conversation (or one ends where the "
                       "other goes on): no response to compare")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_conversation(row: dict, implicit: bool) -> tuple[Messages, Messages, Messages]:
    chosen, rejected = messages(row, "chosen"), messages(row, "rejected")
    if implicit:
        prompt, chosen, rejected = split_conversation(chosen, rejected)
        if not prompt:
            raise RowError("chosen and rejected share no leading message: no prompt; give a "
                           "'prompt' field of messages")
    else:
        prompt = messages(row, "prompt")
    for which, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m.get("content").strip() if isinstance(m.get("content"), str)
                   else m.get("content") or m.get("tool_calls") for m in reply):
            raise RowError(f"empty {which} response")
        if all(m.get("role") == "user" for m in reply):  # training would write user turns
            raise RowError(f"the {which} response is in the user role; responses are the "
                           "model's turns (assistant, or tool calls): put the user's turns in "
                           "the prompt")
    return prompt, chosen, rejected


# ---------------------------------------------------------------- unpaired rows


def parse_unpaired(row: dict, origin: str) -> Pair:
    """{"prompt", "completion", "label"}: text, or message lists (the chat template renders
    them as it does pairs). The label is a bool (0/1 accepted: datasets stores bools so)."""
    label = row.get("label")
    if not isinstance(label, bool) and label not in (0, 1):
        raise RowError(f"field 'label' is {label!r}: give true (desirable) or false")
    if is_messages(row.get("completion")):
        prompt, completion = messages(row, "prompt"), messages(row, "completion")
        if not any(m.get("content") or m.get("tool_calls") for m in completion):
            raise RowError("empty completion")
        return Pair(prompt, completion, completion, origin, "unpaired", template_kwargs(row),
                    label=bool(label))
    completion = response(text(row, "completion"), "completion")
    return Pair(text(row, "prompt"), completion, completion, origin, "unpaired",
                label=bool(label))


# ---------------------------------------------------------------- any row


def parse_row(row: dict, origin: str, columns: dict[str, str] | None = None) -> Pair:
    """A user row of any format as a Pair (an unpaired row: a Pair with a label); RowError
    says why it cannot be one."""
    row = renamed(row, columns or {})
    kind = detect(row)
    if kind == "unpaired":
        return parse_unpaired(row, origin)
    if kind.startswith("conversational"):
        prompt, chosen, rejected = parse_conversation(row, kind.endswith("implicit"))
        return Pair(prompt, chosen, rejected, origin, kind, template_kwargs(row))
    parse = parse_hh if kind == "standard-implicit" else parse_prompt_chosen_rejected
    return Pair(*parse(row), origin, kind)
