"""The training loop. One step, top to bottom: take the step's pairs, split them into
micro-batches, run policy and reference on chosen+rejected together, backward the DPO loss
scaled by 1/accumulation, clip, step the optimizer and the schedule, log.

Eval rows at step s are computed before the update of step s (step 0 is the untouched model);
a final eval runs after the last update.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .checkpoint import restore_weights
from .config import DPOConfig, validate
from .data import build_data, collate, eval_indices, train_indices
from .evaluate import batch_loss, evaluate
from .metrics import MeanMetrics, MetricWriter, console_line
from .models.load import build_models, check_vocab, load_tokenizer
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("moedpo")


def total_steps(cfg: DPOConfig, n_train: int, step_size: int) -> int:
    """max_steps, or fewer when n_epochs passes over the data end first."""
    limits = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.n_epochs is not None:
        limits.append(cfg.n_epochs * (n_train // step_size))
    return min(limits)


def should_eval(step: int, cfg: DPOConfig) -> bool:
    return (step == 0 and cfg.do_first_eval) or (step > 0 and step % cfg.eval_frequency == 0)


def prepare_run_dir(cfg: DPOConfig) -> Path:
    """Create run_dir, keep an earlier run's metrics aside (never delete them), save config."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "tensorboard"):
        old = run_dir / name
        if old.exists():
            n = 1
            while (run_dir / f"{name}.prev{n}").exists():
                n += 1
            old.rename(run_dir / f"{name}.prev{n}")
            log.info("kept the earlier run's %s as %s.prev%d", name, name, n)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return run_dir


def device_for_run() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class RunResult:
    final_eval: dict[str, float]
    policy: torch.nn.Module
    run_dir: Path


def load_models(cfg: DPOConfig, device: torch.device):
    """(tokenizer, policy, reference) on `device`; reference is None for reference-free DPO."""
    tokenizer = load_tokenizer(cfg.model)
    policy, reference = build_models(cfg.model, cfg.seed)
    if cfg.checkpoint_manager_path:
        restored = restore_weights(cfg.checkpoint_manager_path, [policy, reference])
        log.info("restored weights of policy and reference from %s", restored)
    check_vocab(tokenizer, policy, cfg.model.tokenizer_name_or_path)
    if cfg.loss.reference_free:
        reference = None
    return tokenizer, policy.to(device), reference.to(device) if reference is not None else None


def batch_maker(cfg: DPOConfig, tokenizer, device: torch.device) -> Callable:
    """pairs -> collated tensors on `device`."""
    # pad_token_id null (or the original's -100, not a token) means the tokenizer's pad token.
    own_pad = cfg.pad_token_id is not None and cfg.pad_token_id >= 0
    pad_id = cfg.pad_token_id if own_pad else tokenizer.pad_token_id
    pad_to = cfg.max_length if cfg.data.static_shapes else None

    def make(pairs: list) -> dict[str, torch.Tensor]:
        batch = collate(pairs, pad_id, cfg.label_pad_token_id, pad_to)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return make


def run(cfg: DPOConfig) -> RunResult:
    """Train as configured; returns the final eval metrics and the trained policy."""
    validate(cfg)
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("highest" if cfg.full_precision else "high")
    run_dir = prepare_run_dir(cfg)
    device = device_for_run()
    tokenizer, policy, reference = load_models(cfg, device)
    data = build_data(cfg, tokenizer, policy.get_input_embeddings().num_embeddings)
    to_batch = batch_maker(cfg, tokenizer, device)
    step_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    n_steps = total_steps(cfg, len(data.train), step_size)
    log_startup(cfg, policy, data, n_steps, device, run_dir)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, n_steps)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    stream = train_indices(len(data.train), step_size, cfg.seed, cfg.shuffle)
    writer = MetricWriter(run_dir)

    def eval_row(step: int) -> dict[str, float]:
        batches = (to_batch([data.eval[i] for i in idx])
                   for idx in eval_indices(len(data.eval), cfg.eval_batch_size))
        metrics = evaluate(policy, reference, batches, cfg)
        row = writer.write(step, step * step_size, "eval", metrics)
        values = {k.removeprefix("eval/"): v for k, v in row.items()}
        log.info(console_line(step, n_steps, "eval", values))
        return values

    window, train_seconds, window_tokens = MeanMetrics(), 0.0, 0
    for step in range(n_steps):
        if should_eval(step, cfg):
            eval_row(step)

        # ---- one optimizer step over gradient_accumulation_steps micro-batches
        started = time.perf_counter()
        pairs = [data.train[i] for i in next(stream)]
        lr = scheduler.get_last_lr()[0]
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, step_size, cfg.per_device_train_batch_size):
            batch = to_batch(pairs[start:start + cfg.per_device_train_batch_size])
            out = batch_loss(policy, reference, batch, cfg)
            (out.loss / cfg.gradient_accumulation_steps).backward()
            window.add_output(out)
            window_tokens += int(batch["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        window.add_scalars({"grad_norm": float(grad_norm), "lr": lr})
        train_seconds += time.perf_counter() - started

        # ---- report: means since the last report; throughput excludes eval time
        if step % cfg.report_metrics_freq == 0 or step == n_steps - 1:
            speed = {"examples_per_second": window.count / train_seconds,
                     "tokens_per_second": window_tokens / train_seconds}
            row = writer.write(step, (step + 1) * step_size, "train", window, speed)
            log.info(console_line(step, n_steps, "train",
                                  {k.removeprefix("train/"): v for k, v in row.items()}))
            window, train_seconds, window_tokens = MeanMetrics(), 0.0, 0

    final = eval_row(n_steps)
    writer.close()
    log.info("run finished; metrics in %s", run_dir / "metrics.jsonl")
    return RunResult(final, policy, run_dir)


def log_startup(cfg: DPOConfig, policy: torch.nn.Module, data, n_steps: int,
                device: torch.device, run_dir: Path) -> None:
    n_params = sum(p.numel() for p in policy.parameters())
    source = cfg.model.config_path or cfg.model.name_or_path
    log.info("model %s: %.2fM parameters, policy %s, reference %s, on %s", source,
             n_params / 1e6, cfg.model.policy_dtype, cfg.model.reference_dtype, device)
    for name, (n_train, n_eval) in data.sources.items():
        log.info("data %s: %d train pairs, %d eval pairs", name, n_train, n_eval)
    if data.skipped.total:
        log.warning("skipped %d rows: %s; first: %s", data.skipped.total,
                    dict(data.skipped.counts), "; ".join(data.skipped.examples))
    if data.truncated.counts:
        log.info("truncated: %s", dict(data.truncated.counts))
    log.info("%d steps of %d pairs (batch %d x accumulation %d); writing to %s", n_steps,
             cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
             cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, run_dir)
