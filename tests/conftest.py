"""Shared fixtures: the embedded tokenizer, tiny pretrained-model folders, HH-layout data,
and `make_cfg`, which composes the real Hydra config with overrides."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from moedpo.config import DPOConfig, register_schema
from moedpo.data.sources import BUNDLED_DIR, DEMO_DIR
from moedpo.data.tokenize import TokenizedPair
from moedpo.models.load import EMBEDDED_TOKENIZER

register_schema()


@pytest.fixture(scope="session", autouse=True)
def _own_data_cache(tmp_path_factory):
    """The tokenisation cache of this session only (runs in subprocesses inherit it)."""
    import os

    os.environ["MOEDPO_CACHE"] = str(tmp_path_factory.mktemp("moedpo-cache"))
    # A run that dies of a fatal signal (SIGABRT, SIGSEGV) prints its Python stacks.
    os.environ["PYTHONFAULTHANDLER"] = "1"
ROOT = Path(__file__).resolve().parents[1]
# What depends on the machine rather than the run (speed, the process's memory).
TIMING = ("examples_per_second", "tokens_per_second", "memory/measured_peak")


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))


def _fast(tok, **special: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="session")
def tokenizer_kinds(tokenizer) -> dict:
    return build_tokenizer_kinds()


def build_tokenizer_kinds() -> dict:
    """The tokenizer families users bring, built here (no download): byte-level BPE without
    a BOS (GPT-NeoX, Pythia, GPT-2, Qwen: the embedded one, with its HH-style chat template),
    byte-level BPE that adds a BOS (Llama 3), SentencePiece-style BPE (Metaspace "▁" words)
    that adds "<s>" (Llama 2, Mistral, Mixtral), trained on the demo rows, and byte-level
    BPE with ChatML's special tokens (Qwen's chat layout). Each but the first gets a chat
    template in its family's style (CHAT_TEMPLATES)."""
    from tokenizers import SentencePieceBPETokenizer, Tokenizer
    from tokenizers.pre_tokenizers import Metaspace
    from tokenizers.processors import TemplateProcessing

    llama3 = Tokenizer.from_file(str(EMBEDDED_TOKENIZER / "tokenizer.json"))
    llama3.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"])
    bos = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    texts = [row[key] for row in demo_rows("train", 400) for key in ("chosen", "rejected")]
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(texts, vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    spm = spm._tokenizer
    spm.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme="first")
    spm.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", spm.token_to_id("<s>"))])
    chatml = Tokenizer.from_file(str(EMBEDDED_TOKENIZER / "tokenizer.json"))
    chatml.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    kinds = {
        "bytelevel": AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER)),
        "bytelevel-bos": _fast(llama3, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>",
                               pad_token="<|pad|>"),
        "sentencepiece-bos": _fast(spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>"),
        "chatml": _fast(chatml, eos_token="<|im_end|>", pad_token="<|pad|>"),
    }
    for kind, template in CHAT_TEMPLATES.items():
        kinds[kind].chat_template = template
    return kinds


# Chat templates in the style of each family (shortened from the models' own).
CHAT_TEMPLATES = {
    "bytelevel-bos": (  # Llama 3: BOS written by the template, header tokens, <|eot_id|>
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"),
    "sentencepiece-bos": (  # Mistral: [INST] turns, BOS once, EOS after each answer
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'system' %}"
        "{{ m['content'] + '\n\n' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"),
    "chatml": (  # Qwen: <|im_start|>role ... <|im_end|>, tools in a system turn
        "{% if tools %}{{ '<|im_start|>system\nTools: ' + tools | tojson + '<|im_end|>\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content']"
        " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking %}"
        "{{ '<think>\n' }}{% endif %}{% endif %}"),
}


def offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1 as a user sets it before starting: huggingface_hub and datasets read
    the variable once, at import, so the tests set their copies too (else each Hub call
    waits for its network timeout)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def compose_cfg(*overrides: str) -> DPOConfig:
    with initialize_config_module("moedpo.conf", version_base=None):
        raw = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(raw)


@pytest.fixture
def make_cfg(tmp_path):
    """DPOConfig from the shipped config tree; output goes to the test's tmp dir."""
    def make(*overrides: str) -> DPOConfig:
        return compose_cfg(f"output_dir={tmp_path}", *overrides)
    return make


def tiny_train_overrides() -> list[str]:
    """The embedded tiny Mixtral on a few bundled pairs: a run of seconds."""
    return ["+experiment=demo", "max_steps=3", "per_device_train_batch_size=4",
            "per_device_eval_batch_size=8", "dry_run=true", "eval_frequency=2"]


def write_jsonl_gz(path: Path, rows: list) -> None:
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def chat_rows(split: str, n: int) -> list[dict]:
    """The bundled conversational demo rows (demo_chat: explicit prompt, messages)."""
    with gzip.open(BUNDLED_DIR / "demo_chat" / f"{split}.jsonl.gz", "rt") as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_unpaired(folder: Path, n_train: int, n_test: int, chat: bool = False) -> Path:
    """A jsonl folder of unpaired rows (prompt, completion, label) made from the bundled demo
    pairs: each pair gives a desirable row (its chosen) and an undesirable one (rejected);
    text from `demo`, messages from `demo_chat`."""
    from moedpo.data.formats import parse_row

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i, row in enumerate(chat_rows(split, n) if chat else demo_rows(split, n)):
            pair = parse_row(row, f"demo {i}")
            rows += [{"prompt": pair.prompt, "completion": pair.chosen, "label": True},
                     {"prompt": pair.prompt, "completion": pair.rejected, "label": False}]
        write_jsonl_gz(folder / f"{split}.jsonl.gz", rows)
    return folder


TINY_DEEPSEEK = {"model_type": "deepseek_v3", "vocab_size": 512, "hidden_size": 64,
                 "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
                 "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 0,
                 "n_group": 2, "topk_group": 2, "kv_lora_rank": 16, "q_lora_rank": None,
                 "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                 "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0,
                 "pad_token_id": 1}


def write_tiny_deepseek(path: Path) -> Path:
    """A DeepSeek-V3 model JSON at demo size (the embedded tokenizer's vocabulary): a router
    with sigmoid scores, correction bias and groups, a shared expert, MLA attention."""
    path.write_text(json.dumps(TINY_DEEPSEEK))
    return path


def demo_rows(split: str, n: int) -> list[dict]:
    with gzip.open(DEMO_DIR / f"{split}.jsonl.gz", "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="session")
def hh_dir(tmp_path_factory) -> Path:
    """A local copy of Anthropic/hh-rlhf in the hub's layout, with demo rows."""
    folder = tmp_path_factory.mktemp("hh")
    write_jsonl_gz(folder / "train.jsonl.gz", demo_rows("train", 200))
    write_jsonl_gz(folder / "test.jsonl.gz", demo_rows("test", 40))
    return folder


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny GPT-NeoX (Pythia's architecture) saved like a hub model, tokenizer included."""
    folder = tmp_path_factory.mktemp("tiny-neox")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tokenizer) -> Path:
    """The embedded tiny Mixtral with random weights, saved like a hub model."""
    from moedpo.config import ModelConfig
    from moedpo.models.load import build_models

    folder = tmp_path_factory.mktemp("tiny-mixtral")
    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                         policy_dtype="float32", reference_dtype="float32"))
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_policy(sdpa: bool = True) -> torch.nn.Module:
    """The tiny Mixtral as moedpo builds it (seed 0, float32): sdpa resolves to
    models.block_attention's moedpo_sdpa, `sdpa=False` to eager attention."""
    from moedpo.config import ModelConfig
    from moedpo.models.load import build_models

    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                      reference_dtype="float32", flash_attention=sdpa)
    return build_models(cfg, seed=0)[0]


def random_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        lens = torch.randint(1, 12, (3,), generator=g).tolist()
        ids = [torch.randint(3, 500, (k,), generator=g).tolist() for k in lens]
        pairs.append(TokenizedPair(*ids))
    return pairs


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def final_weights(ckpt_dir: Path, prefixes: tuple[str, ...] = ("model.",)
                  ) -> dict[str, torch.Tensor]:
    """The newest checkpoint's tensors under `prefixes` (the policy's: `model.`)."""
    (step_dir,) = sorted(ckpt_dir.glob("step_*"))[-1:]
    reader = dcp.FileSystemReader(str(step_dir))
    metadata = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if k.startswith(prefixes)}
    dcp.load(state, storage_reader=reader)
    return state


def run_ok(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"exit {done.returncode}\n--- stdout (end) ---\n"
                                  f"{done.stdout[-2500:]}\n--- stderr (end) ---\n"
                                  f"{done.stderr[-4000:]}")


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """`one_process(*args) -> run dir`: the one-process run that distributed runs are compared
    with, run once per distinct argument list in a session (several tests compare with the
    same one: FSDP2 and expert parallelism, each parametrization of a launch). The run dir is
    shared: read it, never write into it."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(*args: str) -> Path:
        if args not in runs:
            out = tmp_path_factory.mktemp("one-process")
            run_ok([sys.executable, "run_dpo_no_trainer.py", *args, f"output_dir={out}",
                    "exp_name=one"])
            runs[args] = out / "one"
        return runs[args]
    return run


def routing_tolerance(row: dict, split: str, flips: int) -> float:
    """What `flips` tokens choosing other experts move a routing statistic by: a load
    (count / total x E) moves E / tokens per flipped choice, a dropped fraction 1 / tokens.
    Discrete statistics: another summation order (other padding, other sharding) can flip a
    near-tie in a router's top-k on one machine and not on another."""
    loads = row.get(f"{split}/moe/expert_load")
    tokens = row.get(f"{split}/moe/routed_tokens")
    if not loads or not tokens:
        return 0.0
    return flips * len(loads[0]) / tokens


def assert_same_run(a, b, atol: float, rel: float = 0.0, routing_atol: float = 0.0,
                    skip_routing: bool = False, routing_flips: int = 6,
                    ignore: tuple[str, ...] = ()) -> None:
    """Same metrics rows (b may log more keys) and same final weights, within `atol` (plus
    `rel` of the value for metrics). Routing statistics, discrete, within what
    `routing_flips` tokens choosing other experts change (and `routing_atol`), or not
    compared with `skip_routing`; keys with a part in `ignore` are not compared."""
    rows_a, rows_b = train_rows(a), train_rows(b)
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        split = "eval" if any(k.startswith("eval/") for k in ra) else "train"
        flip_tol = routing_tolerance(ra, split, routing_flips)
        for key, value in ra.items():
            if any(part in key for part in ignore):
                continue
            if "/router/" in key:  # batch statistics (f.P), computed per micro-batch and rank
                continue
            if key.endswith("xla_compiles"):  # counts this process's compilations
                continue
            if skip_routing and "/moe/" in key:
                continue
            margin = ra.get(key.replace("accuracies", "margins"), 1.0)
            if key.endswith("rewards/accuracies") and abs(margin) <= atol:
                continue  # policy == reference: rewards are rounding noise of arbitrary sign
            tol = max(atol, routing_atol, flip_tol) if "/moe/" in key else atol
            if isinstance(value, list):  # the per-layer expert load
                torch.testing.assert_close(torch.tensor(rb[key]), torch.tensor(value), atol=tol,
                                           rtol=0)
            else:
                assert key in rb, (ra["step"], key)
                assert rb[key] == pytest.approx(value, abs=tol, rel=rel), (ra["step"], key)
    wa, wb = final_weights(a / "checkpoints"), final_weights(b / "checkpoints")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def assert_same_update(a: Path, b: Path, seed: int = 0, min_cosine: float = 0.95) -> None:
    """Two mixed-precision runs of the demo's tiny Mixtral from the same start: run b saved
    float32 master weights, took nearly every update (pure bf16 would round most of them
    away at a DPO learning rate), and moved the weights the way run a did (bf16 compute
    rounds their gradients differently, so not to the bit)."""
    from moedpo.config import ModelConfig
    from moedpo.models.load import build_models

    initial, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                          policy_dtype="float32"), seed=seed)
    start = {f"model.{k}": v for k, v in initial.state_dict().items()}
    wa, wb = final_weights(a / "checkpoints"), final_weights(b / "checkpoints")
    assert {v.dtype for v in wb.values()} == {torch.float32}
    moved_a = torch.cat([(wa[k] - start[k]).flatten() for k in wa])
    moved_b = torch.cat([(wb[k] - start[k]).flatten() for k in wa])
    # Weights that see no gradient (embedding rows of tokens not in the batches) stay put.
    assert (moved_a != 0).float().mean() > 0.8
    moved_both = ((moved_a != 0) & (moved_b != 0)).sum() / (moved_a != 0).sum()
    assert moved_both > 0.99, float(moved_both)
    cosine = float(torch.nn.functional.cosine_similarity(moved_a, moved_b, dim=0))
    assert cosine > min_cosine, cosine


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)
