"""The training loop. One step, top to bottom: take the step's pairs, split them into
micro-batches, run policy and reference on chosen+rejected together, backward the DPO loss
scaled by 1/accumulation, clip, step the optimizer and the schedule, log.

Eval rows at step s are computed before the update of step s (step 0 is the untouched model);
a final eval runs after the last update.
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import reference as reference_lib
from . import run_dir as run_dir_lib
from .callbacks import Callback, fire
from .checkpoint import Checkpointer
from .config import DPOConfig
from .data import build_data, collate, collate_shared, eval_indices
from .data.collate import HOST_KEYS
from .data.micro_batches import micro_batches, row_tokens
from .data.micro_batches import weights as micro_weights
from .evaluate import evaluate, generate
from .layout import packing_budget, static_shapes, use_shared_prompt
from .losses import loss_names
from .losses.unpaired import RewardShift
from .metrics import MeanMetrics, MetricWriter, console_line
from .models import block_attention, lora
from .models.balance import update_correction_biases
from .models.precision import compute_copies, policy_compute_dtype
from .optim import (
    build_optimizer,
    build_scheduler,
    check_nonfinite,
    clip_grad_norm,
    continue_schedule,
    step_if_finite,
)
from .parallel import spmd
from .parallel.backend import Backend, init_backend, shutdown
from .placement import load_models
from .preemption import StopSignal
from .progress import Progress, batch_bar, interactive
from .reference_sync import sync_reference
from .startup import log_startup
from .step import batch_loss, global_routing, pools_accumulation
from .validate import check_rows_fit_losses, validate

log = logging.getLogger("moedpo")


def total_steps(cfg: DPOConfig, n_train: int, step_size: int) -> int:
    """max_steps, or fewer when n_epochs passes over the data end first."""
    limits = [cfg.max_steps] if cfg.max_steps is not None else []
    if cfg.n_epochs is not None:
        limits.append(cfg.n_epochs * (n_train // step_size))
    return min(limits)


def should_eval(step: int, cfg: DPOConfig) -> bool:
    return (step == 0 and cfg.do_first_eval) or (step > 0 and step % cfg.eval_frequency == 0)


@dataclass
class RunResult:
    final_eval: dict[str, float]
    policy: torch.nn.Module
    run_dir: Path
    preempted: bool = False


def padded_length(cfg: DPOConfig, backend: Backend) -> int | list[int] | None:
    """With static shapes (by default on XLA): max_length, or the length buckets up to it;
    else None: each batch's longest."""
    if not static_shapes(cfg, backend.kind):
        return None
    if cfg.data.length_buckets:
        return sorted({*cfg.data.length_buckets, cfg.max_length})
    return cfg.max_length


def batch_maker(cfg: DPOConfig, tokenizer, backend: Backend, shared: bool = False,
                max_tokens: int = 0) -> Callable:
    """pairs -> collated tensors on the backend's device (split over the mesh on XLA); one
    row per pair with `shared` (use_shared_prompt), several of up to `max_tokens` tokens
    with packing (packing_budget)."""
    # pad_token_id null (or the original's -100, not a token) means the tokenizer's pad token.
    own_pad = cfg.pad_token_id is not None and cfg.pad_token_id >= 0
    pad_id = cfg.pad_token_id if own_pad else tokenizer.pad_token_id
    pad_to = padded_length(cfg, backend)
    if shared and pad_to is not None:  # static shapes: bin packing into rows of max_tokens
        pad_to = max_tokens
    to_rows = (partial(collate_shared, max_tokens=max_tokens, ld_alpha=cfg.loss.ld_alpha,
                       row_multiple=backend.devices if pad_to is not None else 1)
               if shared else partial(collate, ld_alpha=cfg.loss.ld_alpha))

    def make(pairs: list) -> dict[str, torch.Tensor]:
        batch = to_rows(pairs, pad_id, cfg.label_pad_token_id, pad_to)
        if backend.kind == "xla":  # eager attention: the dense mask, no per-pair layout
            batch.pop("blocks", None)
        batch = {k: v if k in HOST_KEYS else v.to(backend.device, non_blocking=True)
                 for k, v in batch.items()}
        return spmd.shard_batch(batch, backend.mesh) if backend.kind == "xla" else batch
    return make


def row_layout(shared: bool, max_tokens: int, static: bool, policy: torch.nn.Module,
               cfg: DPOConfig) -> str:
    """One line on how pairs become rows and how attention runs over them."""
    if not shared:
        layout = "two per pair (chosen, rejected), prompt in both"
    elif not max_tokens:
        layout = "one per pair, prompt shared"
    elif max_tokens >= sys.maxsize:
        layout = "prompts shared, each micro-batch packed into one row"
    else:
        layout = (f"prompts shared, pairs packed into rows of {'exactly' if static else 'up to'} "
                  f"{max_tokens} tokens")
    attention = getattr(policy.config, "_attn_implementation", None) or "eager"
    if shared and block_attention.uses_blocks(policy):
        attention += ", per pair"
    budget = (f"; forwards of at most {cfg.data.tokens_per_batch} tokens"
              if cfg.data.tokens_per_batch else "")
    return f"{layout}; attention {attention}{budget}"


def reward_shift(cfg: DPOConfig, backend: Backend) -> RewardShift | None:
    """BCO's running reward mean, averaged over ranks (one scalar a micro-batch)."""
    if "bco" not in loss_names(cfg.loss.name):
        return None
    return RewardShift(lambda x: float(backend.sum_over_ranks(x.reshape(1))[0])
                       / backend.world_size)


def run(cfg: DPOConfig, callbacks: list[Callback] | None = None) -> RunResult:
    """Train as configured (continuing from a checkpoint when there is one); returns the final
    eval metrics and the trained policy. `callbacks` get the run's events (callbacks.py)."""
    validate(cfg)
    backend = init_backend(cfg.parallel.backend, cfg.tensor_parallelism,
                           cfg.local_compile_cache_dir, cfg.full_precision,
                           cfg.parallel.expert_parallel)
    try:
        with run_dir_lib.RunLock(cfg.run_dir, backend):
            result = train(cfg, backend, callbacks or [])
        # Ranks leave together: none tears its process group down while another may still
        # be exchanging with it (a gloo peer gone mid-exchange aborts the other process).
        backend.barrier()
        return result
    finally:
        shutdown(backend)


def train(cfg: DPOConfig, backend: Backend, callbacks: list[Callback]) -> RunResult:
    torch.manual_seed(cfg.seed)
    torch.set_float32_matmul_precision("highest" if cfg.full_precision else "high")
    if not backend.is_main:
        logging.getLogger("moedpo").setLevel(logging.WARNING)
    checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.max_to_keep, backend.process,
                                backend.barrier, xla=backend.kind == "xla",
                                trusted=list(cfg.checkpoint.trusted_paths),
                                trainable_only=lora.is_enabled(cfg.model))
    run_dir, resume_from = run_dir_lib.prepare(cfg, checkpointer, backend)
    tokenizer, policy, reference = load_models(cfg, backend)
    data = build_data(cfg, tokenizer, policy.get_input_embeddings().num_embeddings,
                      backend.total_devices)
    check_rows_fit_losses(cfg, data.unpaired)
    static = padded_length(cfg, backend) is not None
    shared = use_shared_prompt(cfg, static, policy)
    max_tokens = packing_budget(cfg, shared, policy, static)
    to_batch = batch_maker(cfg, tokenizer, backend, shared, max_tokens)
    cut = partial(micro_batches, budget=cfg.data.tokens_per_batch, cost=row_tokens(shared),
                  packed=max_tokens > 0)
    # One forward's pairs: SPMD splits one batch over all devices of the mesh.
    micro, world = cfg.per_device_train_batch_size * backend.devices, backend.world_size
    step_size = micro * world * cfg.gradient_accumulation_steps  # pairs per optimizer step
    n_steps = total_steps(cfg, len(data.train), step_size)
    log_startup(cfg, policy, data, n_steps, backend, run_dir)
    log.info("rows: %s", row_layout(shared, max_tokens, static, policy, cfg))
    if cfg.reference.precompute:  # from here on the reference lives in the data
        bar = partial(batch_bar, desc="reference", enabled=backend.is_main and interactive())
        data = reference_lib.precompute(cfg, data, reference, to_batch,
                                        padded_length(cfg, backend), backend, bar)
        reference = None
        gc.collect()

    # Mixed precision on one process and XLA: forward and backward on a bf16 copy of the
    # float32 masters (FSDP2 casts in its own hooks).
    computing = partial(compute_copies, policy,
                        policy_compute_dtype(cfg.model, backend.distributed))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, n_steps)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    window, nonfinite, start_step = MeanMetrics(), {"total": 0, "in_a_row": 0}, 0
    stream_state = None
    # TR-DPO's reference changes in training: its weights go into checkpoints too.
    synced = {"reference": reference} if cfg.reference.sync_every else {}
    shift = reward_shift(cfg, backend)  # BCO's running reward mean, None for other losses
    pooled_routing = pools_accumulation(cfg, policy)
    if pooled_routing:
        log.info("router_aux_loss_scope=global_batch over %d accumulated micro-batches: each "
                 "step first runs the policy once more without gradients to count the expert "
                 "loads of all of them", cfg.gradient_accumulation_steps)
    settings = OmegaConf.to_container(OmegaConf.structured(cfg))  # what a resume must match
    if resume_from:
        if cfg.resume_mode == "auto":  # a torn newest checkpoint falls back to the one before
            resume_from, state, own = checkpointer.load_newest(policy, optimizer, synced)
        else:
            state, own = checkpointer.load(resume_from, policy, optimizer, synced)
        if state.get("config") is not None:  # the checkpoint actually loaded, fallback or not
            run_dir_lib.check_resume_config(state["config"], settings)
        scheduler.load_state_dict(state["scheduler"])
        saved_lr, lr_now = continue_schedule(scheduler, optimizer)
        if saved_lr != lr_now:
            log.info("the learning-rate schedule now spans %d steps: lr %.4g at the checkpoint, "
                     "%.4g from here on", n_steps, saved_lr, lr_now)
        start_step, nonfinite = state["step"], state["nonfinite"]
        stream_state = state.get("data_stream")
        if shift is not None:
            shift.restore(state["bco_shift"])
        window = MeanMetrics.from_state(own["window"])
        if backend.is_main:  # one writer: ranks racing on the same file tear it
            run_dir_lib.trim_metrics(run_dir, start_step)
        log.info("resumed from %s at step %d", resume_from, start_step)
    steps = data.train_steps(cfg, step_size, start_step, stream_state)
    writer = MetricWriter(run_dir, cfg.loggers, start_step, backend.is_main, settings,
                          cfg.exp_name)

    def save(step: int) -> str:
        state = {"step": step, "examples": step * step_size, "scheduler": scheduler.state_dict(),
                 "nonfinite": nonfinite, "config": settings}  # what a resume must match
        if data.stream is not None:  # where the streamed data is: read again up to there
            state["data_stream"] = data.stream.state()
        if shift is not None:
            state["bco_shift"] = shift.state()
        path = checkpointer.save(step, policy, optimizer, state, {"window": window.state()},
                                 synced)
        log.info("checkpoint written: %s", path)
        if backend.is_main:  # the metrics that go with it, where output_dir is a URL
            run_dir_lib.publish(cfg)
        fire(callbacks, "on_save", step, path)
        return path

    progress = Progress(n_steps, start_step, enabled=backend.is_main and interactive())

    # Several sources: eval metrics of each too (eval/<source>/rewards/accuracies ...).
    eval_labels = data.eval_labels()
    groups = data.labels() if len(data.sources) > 1 else None

    def eval_row(step: int) -> dict[str, float]:
        eval_batch = cfg.eval_batch_size * backend.devices
        batches = ((to_batch([data.eval[i] for i in idx]), valid,
                    [eval_labels[i] for i in idx]) for idx, valid in
                   eval_indices(len(data.eval), eval_batch, backend.rank, world))
        n_batches = -(-len(data.eval) // (eval_batch * world))
        with computing():
            metrics = evaluate(policy, reference, progress.eval(batches, n_batches), cfg,
                               backend.sync, groups, shift, backend.sum_over_ranks)
        metrics = metrics.reduced(backend)
        row = writer.write(step, step * step_size, "eval", metrics)
        values = {k.removeprefix("eval/"): v for k, v in row.items()}
        log.info(console_line(step, n_steps, "eval", values))
        if cfg.sample_during_eval:
            write_samples(step)
        if backend.is_main:
            run_dir_lib.publish(cfg)
        fire(callbacks, "on_evaluate", step, values)
        return values

    sample_prompts = [list(p.prompt) for p in data.eval[:cfg.n_eval_model_samples]]

    def write_samples(step: int) -> None:
        """Greedy samples for fixed eval prompts: run_dir/samples.jsonl and TensorBoard."""
        with computing():
            answers = {"policy": generate(policy, tokenizer, sample_prompts,
                                          cfg.sample_max_new_tokens)}
        if cfg.sample_reference and reference is not None:
            answers["reference"] = generate(reference, tokenizer, sample_prompts,
                                            cfg.sample_max_new_tokens)
        rows = [{"step": step, "prompt": tokenizer.decode(prompt),
                 **{name: texts[i] for name, texts in answers.items()}}
                for i, prompt in enumerate(sample_prompts)]
        writer.write_samples(step, rows)

    saved_at = start_step if resume_from else None
    with StopSignal(backend) as stop, progress:
        for step in range(start_step, n_steps):
            if should_eval(step, cfg):
                eval_row(step)

            # ---- one optimizer step over gradient_accumulation_steps micro-batches
            started = time.perf_counter()
            pairs = next(steps)
            lr = float(optimizer.param_groups[0]["lr"])  # the rate this step applies
            optimizer.zero_grad(set_to_none=True)
            outputs, totals = [], None
            # this rank's share of the step, cut by count or by tokens (data.tokens_per_batch)
            chunks = cut(pairs, backend.rank, world, micro)
            batches = [to_batch(chunk) for chunk in chunks]
            if pooled_routing:  # the step's expert loads, before the first backward
                with computing():
                    totals = global_routing(policy, batches, cfg, backend.sum_over_ranks)
            for chunk, batch, weight in zip(chunks, batches, micro_weights(chunks), strict=True):
                with computing():
                    out = batch_loss(policy, reference, batch, cfg, shift,
                                     backend.sum_over_ranks, router_totals=totals)
                    (out.loss * weight).backward()  # the step's loss: a mean over its pairs
                outputs.append(out)
                window.tokens += sum(p.n_tokens for p in chunk)
            norm = clip_grad_norm(params, clip)  # global norm
            losses = torch.stack([out.loss.detach() for out in outputs]).sum()
            if cfg.model.router_bias_update_rate > 0:  # aux-loss-free balancing
                counts = torch.stack([out.router.expert_counts for out in outputs]).sum(0)
                update_correction_biases(policy, backend.sum_over_ranks(counts),
                                         cfg.model.router_bias_update_rate)
            if backend.kind == "xla":  # decided on the device: no host read inside the step
                step_if_finite(optimizer, torch.isfinite(losses) & torch.isfinite(norm))
                backend.sync()  # runs the step's one graph; the reads below only copy
            step_loss = float(backend.all_reduce_sum(losses.reshape(1).cpu().double())[0])
            grad_norm = float(norm)
            if math.isfinite(step_loss) and math.isfinite(grad_norm):
                if backend.kind != "xla":
                    optimizer.step()
                nonfinite["in_a_row"] = 0
                for out in outputs:
                    window.add_output(out)
                window.add_scalars({"grad_norm": grad_norm, "lr": lr})
                if cfg.data.tokens_per_batch:  # how many forwards the budget made
                    window.add_scalars({"forwards": len(chunks)})
            else:  # skip the update, keep the schedule in step
                check_nonfinite(nonfinite, step, step_loss, grad_norm, cfg)
            fire(callbacks, "on_step_end", step,
                 {"loss": step_loss, "grad_norm": grad_norm, "lr": lr})
            with warnings.catch_warnings():  # torch warns when a skipped update precedes it
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            if synced and (step + 1) % cfg.reference.sync_every == 0:  # TR-DPO
                sync_reference(reference, policy, cfg.reference.sync_alpha)
            window.seconds += time.perf_counter() - started
            if progress.enabled:  # this rank's window so far, no collective needed
                progress.step({**window.means(),
                               "examples_per_second": window.count / max(window.seconds, 1e-9),
                               "tokens_per_second": window.tokens / max(window.seconds, 1e-9)})

            # ---- report: means since the last report; throughput excludes eval time
            if step % cfg.report_metrics_freq == 0 or step == n_steps - 1:
                reduced = window.reduced(backend)
                tokens = float(backend.all_reduce_sum(torch.tensor([float(window.tokens)]))[0])
                extra = {"examples_per_second": reduced.count / max(window.seconds, 1e-9),
                         "tokens_per_second": tokens / max(window.seconds, 1e-9),
                         "nonfinite_steps": nonfinite["total"]}
                if backend.kind == "xla":  # flat after warm-up: one graph per step shape
                    extra["xla_compiles"] = spmd.compile_count()
                row = writer.write(step, (step + 1) * step_size, "train", reduced, extra)
                log.info(console_line(step, n_steps, "train",
                                      {k.removeprefix("train/"): v for k, v in row.items()}))
                window = MeanMetrics()

            # ---- checkpoint: every save_frequency steps, and when asked to stop
            every = cfg.checkpoint.save_frequency
            stop.agree()  # every rank stops at the same step
            if stop.received or stop.save_requested or (every and (step + 1) % every == 0):
                save(step + 1)
                saved_at, stop.save_requested = step + 1, False
            if stop.received:
                writer.close()
                if backend.is_main:
                    run_dir_lib.publish(cfg)
                log.warning("stopped by %s after step %d; run the same command again to "
                            "resume (resume=auto)", stop.name, step)
                result = RunResult({}, policy, run_dir, preempted=True)
                fire(callbacks, "on_train_end", result)
                return result

        # ---- the end: the last step's checkpoint before the final eval, still under the
        # signal guard, so a stop or an error in that eval loses nothing trained (a rerun
        # resumes at the end and only evaluates again)
        if saved_at != n_steps:
            save(n_steps)
        final = eval_row(n_steps)
    writer.close()
    if backend.is_main and not run_dir_lib.publish(cfg):
        log.warning("the run finished, but some of its files are not at %s yet (see above): "
                    "they are in %s; run the same command again to upload them",
                    cfg.run_url, run_dir)
    log.info("run finished; metrics in %s", cfg.run_url or run_dir)
    result = RunResult(final, policy, run_dir)
    fire(callbacks, "on_train_end", result)
    return result
