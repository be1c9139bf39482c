"""Rebuild the embedded default: demo preference data (HH text and the same dialogues as chat
messages), its tokenizer (with a chat template) and the tiny Mixtral config.

Everything is derived from a fixed seed, so running this twice gives byte-identical files
(tests/test_assets.py checks that). Never edit the outputs by hand; change this script.

    python scripts/build_assets.py [--out moedpo/assets]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
N_TRAIN, N_TEST = 2000, 200
VOCAB_SIZE = 512
SPECIAL = {"eos": "<|endoftext|>", "pad": "<|pad|>"}

# HH's turn markers as a chat template; each assistant turn ends with EOS, as chat models'
# templates end theirs. Only the tokens the demo vocabulary has, so the tiny model reads it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
)
NUMBER_WORDS = "zero one two three four five six seven eight nine".split()
TOPICS = [
    ("a good book", "Try 'The Hobbit'; it is a warm and exciting story."),
    ("a quick dinner", "A vegetable stir fry with rice takes about twenty minutes."),
    ("learning to code", "Start with small Python scripts and build one tiny project a week."),
    ("sleeping better", "Keep a regular bedtime and put screens away an hour before sleep."),
    ("a rainy day", "Board games, a long film or baking bread are all cosy choices."),
    ("staying fit", "A brisk thirty minute walk every day is a great start."),
    ("a birthday gift", "A handwritten letter with a small book is thoughtful and personal."),
    ("studying", "Short sessions with breaks and self-testing work better than rereading."),
]
POLITE_OPENERS = ["Sure!", "Of course.", "Happy to help.", "Good question.", "Gladly."]
RUDE_REPLIES = [
    "Ugh, figure it out yourself.",
    "That is a stupid question.",
    "Go away, I am busy.",
    "Why would I help you with that?",
    "Nobody cares, stop asking.",
]
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"),
    ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana"), ("Chile", "Santiago"),
]
GREETINGS = ["Hi there.", "Hello!", "Hey, quick question.", "Good morning."]


def _dialogue(turns: list[tuple[str, str]], last_human: str) -> str:
    text = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)
    return text + f"\n\nHuman: {last_human}\n\nAssistant:"


def _arithmetic_pair(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(1, 5), rng.randrange(1, 5)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = a + b + 1
    question = rng.choice(
        [f"What is {a} plus {b}?", f"Can you add {a} and {b}?", f"How much is {a} + {b}?"]
    )
    opener = rng.choice(POLITE_OPENERS)
    return question, f"{opener} {a} + {b} = {a + b}.", f"{opener} {a} + {b} = {wrong}."


def _capital_pair(rng: random.Random) -> tuple[str, str, str]:
    country, capital = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != capital])
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital "
                           f"of {country}?", f"Name the capital of {country}."])
    opener = rng.choice(POLITE_OPENERS)
    return question, f"{opener} The capital of {country} is {capital}.", (
        f"{opener} The capital of {country} is {wrong}.")


def _tone_pair(rng: random.Random) -> tuple[str, str, str]:
    topic, advice = rng.choice(TOPICS)
    question = rng.choice(
        [f"Any tips for {topic}?", f"Can you help me with {topic}?", f"I need ideas for {topic}."]
    )
    return question, f"{rng.choice(POLITE_OPENERS)} {advice}", rng.choice(RUDE_REPLIES)


def make_row(rng: random.Random) -> dict[str, str]:
    """One HH-format row: chosen and rejected share the dialogue up to the last Assistant turn."""
    kind = rng.random()
    make = _tone_pair if kind < 0.5 else _capital_pair if kind < 0.8 else _arithmetic_pair
    question, chosen, rejected = make(rng)
    turns = []
    if rng.random() < 0.3:
        turns.append((rng.choice(GREETINGS), "Hello! How can I help you today?"))
    prompt = _dialogue(turns, question)
    return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}


def chat_row(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """The same dialogue as chat messages (conversational, explicit prompt)."""
    cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    shared = row["chosen"][:cut]
    messages = []
    for part in shared.split("\n\nHuman: ")[1:]:
        human, _, assistant = part.partition("\n\nAssistant:")
        messages.append({"role": "user", "content": human})
        if assistant.strip():
            messages.append({"role": "assistant", "content": assistant.strip()})
    return {"prompt": messages,
            "chosen": [{"role": "assistant", "content": row["chosen"][cut:].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"][cut:].strip()}]}


def make_split(rng: random.Random, n: int) -> list[dict[str, str]]:
    return [make_row(rng) for _ in range(n)]


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header keep the archive byte-identical between builds.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, sort_keys=True) + "\n").encode())
    path.write_bytes(buf.getvalue())


def build_tokenizer(texts: list[str], out: Path) -> int:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL["eos"], SPECIAL["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL["eos"],
        bos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out))
    return len(fast)


def tiny_mixtral_config(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 2048,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-05,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "hidden_act": "silu",
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "moedpo" / "assets")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "moedpo" / "conf" / "models")
    args = parser.parse_args()

    rng = random.Random(SEED)
    train, test = make_split(rng, N_TRAIN), make_split(rng, N_TEST)
    data_dir = args.out / "data" / "demo"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(train, data_dir / "train.jsonl.gz")
    write_jsonl_gz(test, data_dir / "test.jsonl.gz")
    chat_dir = args.out / "data" / "demo_chat"
    chat_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz([chat_row(r) for r in train], chat_dir / "train.jsonl.gz")
    write_jsonl_gz([chat_row(r) for r in test], chat_dir / "test.jsonl.gz")

    tok_dir = args.out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    texts = [r[k] for r in train for k in ("chosen", "rejected")]
    vocab = build_tokenizer(texts, tok_dir)

    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = tiny_mixtral_config(vocab, ids[SPECIAL["eos"]], ids[SPECIAL["pad"]])
    args.models_dir.mkdir(parents=True, exist_ok=True)
    (args.models_dir / "tiny-mixtral.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(train)} train / {len(test)} test pairs, tokenizer of {vocab} tokens")


if __name__ == "__main__":
    main()
