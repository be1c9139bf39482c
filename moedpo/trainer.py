"""The run: `Trainer`'s phases, top to bottom (setup, train_step, report, evaluate, save,
finish); the step itself is step.optimizer_step: take the step's pairs, split them into
micro-batches, run policy and reference on chosen+rejected together, backward the DPO loss
scaled by each micro-batch's share, clip, step the optimizer and the schedule, log.

Eval rows at step s are computed before the update of step s (step 0 is the untouched model);
a final eval runs after the last update.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import warnings
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
from .data import build_data, eval_indices
from .data.micro_batches import micro_batches, row_tokens
from .data.micro_batches import weights as micro_weights
from .evaluate import evaluate, generate
from .layout import batch_maker, packing_budget, padded_length, use_shared_prompt
from .losses import loss_names
from .losses.unpaired import RewardShift
from .metrics import MeanMetrics, MetricWriter, console_line
from .models import block_attention, lora
from .models.precision import compute_copies, policy_compute_dtype
from .optim import (
    build_optimizer,
    build_scheduler,
    check_nonfinite,
    continue_schedule,
)
from .parallel import make_strategy
from .parallel.backend import Backend, init_backend, shutdown
from .placement import load_models
from .planner import PlannedPeak
from .preemption import StopSignal
from .private_api import attention_implementation
from .progress import Progress, batch_bar, interactive
from .reference_sync import sync_reference
from .startup import log_startup
from .step import optimizer_step, pools_accumulation
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
    attention = attention_implementation(policy) or "eager"
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
    backend = init_backend(cfg.parallel.backend, cfg.local_compile_cache_dir,
                           cfg.full_precision)
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
    return Trainer(cfg, backend, callbacks).fit()


class Trainer:
    """One run. `fit` reads top to bottom: `setup` (run dir, models, data, optimizer, a
    resumed state), then per step an eval when due, `train_step`, `report` and a checkpoint
    when due or asked to stop, then the last checkpoint, the final eval and `finish`."""

    def __init__(self, cfg: DPOConfig, backend: Backend, callbacks: list[Callback]) -> None:
        self.cfg, self.backend, self.callbacks = cfg, backend, callbacks

    def fit(self) -> RunResult:
        self.setup()
        saved_at = self.start_step if self.resumed_from else None
        with StopSignal(self.backend) as stop, self.progress:
            for step in range(self.start_step, self.n_steps):
                if should_eval(step, self.cfg):
                    self.evaluate(step)
                self.train_step(step)
                self.report(step)
                # Every save_frequency steps, and when asked to stop (every rank agrees
                # on the step first).
                every = self.cfg.checkpoint.save_frequency
                stop.agree()
                if stop.received or stop.save_requested or (every and (step + 1) % every == 0):
                    self.save(step + 1)
                    saved_at, stop.save_requested = step + 1, False
                if stop.received:
                    return self.stopped(step, stop.name)
            # The last step's checkpoint before the final eval, still under the signal guard,
            # so a stop or an error in that eval loses nothing trained (a rerun resumes at the
            # end and only evaluates again).
            if saved_at != self.n_steps:
                self.save(self.n_steps)
            final = self.evaluate(self.n_steps)
        return self.finish(final)

    # ---- setup: everything a step needs, decided once
    def setup(self) -> None:
        cfg, backend = self.cfg, self.backend
        torch.manual_seed(cfg.seed)
        torch.set_float32_matmul_precision("highest" if cfg.full_precision else "high")
        if not backend.is_main:
            logging.getLogger("moedpo").setLevel(logging.WARNING)
        self.parallel = parallel = make_strategy(cfg, backend)
        # traced beside the loading below; read at the first report
        self.planned = (PlannedPeak(cfg, backend.total_devices)
                        if cfg.plan_memory and backend.is_main else None)
        self.checkpointer = Checkpointer(
            cfg.checkpoint_dir, cfg.checkpoint.max_to_keep, backend.process, backend.barrier,
            parallel.save_planner, parallel.load_planner,
            trusted=list(cfg.checkpoint.trusted_paths), trainable_only=lora.is_enabled(cfg.model))
        self.run_dir, self.resumed_from = run_dir_lib.prepare(cfg, self.checkpointer, backend)
        self.tokenizer, self.policy, self.reference = load_models(cfg, parallel)
        self.data = build_data(cfg, self.tokenizer,
                               self.policy.get_input_embeddings().num_embeddings,
                               backend.total_devices)
        check_rows_fit_losses(cfg, self.data.unpaired)
        static = padded_length(cfg, backend) is not None
        shared = use_shared_prompt(cfg, static, self.policy)
        max_tokens = packing_budget(cfg, shared, self.policy, static)
        self.to_batch = batch_maker(cfg, self.tokenizer, parallel, shared, max_tokens)
        self.cut = partial(micro_batches, budget=cfg.data.tokens_per_batch,
                           cost=row_tokens(shared), packed=max_tokens > 0)
        # One forward's pairs: SPMD splits one batch over all devices of the mesh.
        self.micro = cfg.per_device_train_batch_size * backend.devices
        self.step_size = self.micro * backend.world_size * cfg.gradient_accumulation_steps
        self.n_steps = total_steps(cfg, len(self.data.train), self.step_size)
        log_startup(cfg, self.policy, self.data, self.n_steps, parallel, self.run_dir)
        log.info("rows: %s", row_layout(shared, max_tokens, static, self.policy, cfg))
        if cfg.reference.precompute:  # from here on the reference lives in the data
            bar = partial(batch_bar, desc="reference", enabled=backend.is_main and interactive())
            self.data = reference_lib.precompute(cfg, self.data, self.reference, self.to_batch,
                                                 padded_length(cfg, backend), backend, bar)
            self.reference = None
            gc.collect()
        # Mixed precision on one process and XLA: forward and backward on a bf16 copy of the
        # float32 masters (FSDP2 casts in its own hooks).
        self.computing = partial(compute_copies, self.policy,
                                 policy_compute_dtype(cfg.model, backend.distributed))
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, self.params)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.n_steps)
        self.window, self.nonfinite = MeanMetrics(), {"total": 0, "in_a_row": 0}
        # TR-DPO's reference changes in training: its weights go into checkpoints too.
        self.synced = {"reference": self.reference} if cfg.reference.sync_every else {}
        self.shift = reward_shift(cfg, backend)  # BCO's running reward mean, else None
        self.pooled_routing = pools_accumulation(cfg, self.policy)
        if self.pooled_routing:
            log.info("router_aux_loss_scope=global_batch over %d accumulated micro-batches: "
                     "each step first runs the policy once more without gradients to count "
                     "the expert loads of all of them", cfg.gradient_accumulation_steps)
        self.settings = OmegaConf.to_container(OmegaConf.structured(cfg))  # a resume matches
        self.start_step, stream_state = 0, None
        if self.resumed_from:
            stream_state = self.resume()
        self.steps = self.data.train_steps(cfg, self.step_size, self.start_step, stream_state)
        self.writer = MetricWriter(self.run_dir, cfg.loggers, self.start_step, backend.is_main,
                                   self.settings, cfg.exp_name)
        self.progress = Progress(self.n_steps, self.start_step,
                                 enabled=backend.is_main and interactive())
        # Several sources: eval metrics of each too (eval/<source>/rewards/accuracies ...).
        self.eval_labels = self.data.eval_labels()
        self.groups = self.data.labels() if len(self.data.sources) > 1 else None
        self.sample_prompts = [list(p.prompt)
                               for p in self.data.eval[:cfg.n_eval_model_samples]]

    def resume(self) -> dict | None:
        """The newest (or given) checkpoint's weights, optimizer, schedule and counters;
        returns where a streamed dataset was."""
        cfg, checkpointer = self.cfg, self.checkpointer
        if cfg.resume_mode == "auto":  # a torn newest checkpoint falls back to the one before
            self.resumed_from, state, own = checkpointer.load_newest(
                self.policy, self.optimizer, self.synced)
        else:
            state, own = checkpointer.load(self.resumed_from, self.policy, self.optimizer,
                                           self.synced)
        if state.get("config") is not None:  # the checkpoint actually loaded, fallback or not
            run_dir_lib.check_resume_config(state["config"], self.settings)
        self.scheduler.load_state_dict(state["scheduler"])
        saved_lr, lr_now = continue_schedule(self.scheduler, self.optimizer)
        if saved_lr != lr_now:
            log.info("the learning-rate schedule now spans %d steps: lr %.4g at the checkpoint, "
                     "%.4g from here on", self.n_steps, saved_lr, lr_now)
        self.start_step, self.nonfinite = state["step"], state["nonfinite"]
        if self.shift is not None:
            self.shift.restore(state["bco_shift"])
        self.window = MeanMetrics.from_state(own["window"])
        if self.backend.is_main:  # one writer: ranks racing on the same file tear it
            run_dir_lib.trim_metrics(self.run_dir, self.start_step)
        log.info("resumed from %s at step %d", self.resumed_from, self.start_step)
        return state.get("data_stream")

    # ---- one optimizer step over gradient_accumulation_steps micro-batches (step.py)
    def train_step(self, step: int) -> None:
        cfg, backend, window = self.cfg, self.backend, self.window
        started = time.perf_counter()
        pairs = next(self.steps)
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step applies
        # this rank's share of the step, cut by count or by tokens (data.tokens_per_batch)
        chunks = self.cut(pairs, backend.rank, backend.world_size, self.micro)
        batches = [self.to_batch(chunk) for chunk in chunks]
        outcome = optimizer_step(self.policy, self.reference, batches, micro_weights(chunks),
                                 cfg, self.optimizer, self.params, self.parallel, self.shift,
                                 self.computing, self.pooled_routing)
        window.tokens += sum(p.n_tokens for chunk in chunks for p in chunk)
        if outcome.applied:
            self.nonfinite["in_a_row"] = 0
            for out in outcome.outputs:
                window.add_output(out)
            window.add_scalars({"grad_norm": outcome.grad_norm, "lr": lr})
            if cfg.data.tokens_per_batch:  # how many forwards the budget made
                window.add_scalars({"forwards": len(chunks)})
        else:  # skip the update, keep the schedule in step
            check_nonfinite(self.nonfinite, step, outcome.loss, outcome.grad_norm, cfg)
        with warnings.catch_warnings():  # torch warns when a skipped update precedes it
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if self.synced and (step + 1) % cfg.reference.sync_every == 0:  # TR-DPO
            sync_reference(self.reference, self.policy, cfg.reference.sync_alpha)
        window.seconds += time.perf_counter() - started
        if self.progress.enabled:  # this rank's window so far, no collective needed
            self.progress.step({
                **window.means(),
                "examples_per_second": window.count / max(window.seconds, 1e-9),
                "tokens_per_second": window.tokens / max(window.seconds, 1e-9)})
        fire(self.callbacks, "on_step_end", step,
             {"loss": outcome.loss, "grad_norm": outcome.grad_norm, "lr": lr})

    # ---- report: means since the last report; throughput excludes eval time
    def report(self, step: int) -> None:
        cfg, backend, window = self.cfg, self.backend, self.window
        if not (step % cfg.report_metrics_freq == 0 or step == self.n_steps - 1):
            return
        reduced = window.reduced(backend)
        tokens = float(backend.all_reduce_sum(torch.tensor([float(window.tokens)]))[0])
        extra = {"examples_per_second": reduced.count / max(window.seconds, 1e-9),
                 "tokens_per_second": tokens / max(window.seconds, 1e-9),
                 "nonfinite_steps": self.nonfinite["total"],
                 "memory/measured_peak": backend.peak_memory(), **self.parallel.step_metrics()}
        if self.planned is not None and self.planned.result() is not None:
            extra["memory/planned_peak"] = self.planned.result()
        row = self.writer.write(step, (step + 1) * self.step_size, "train", reduced, extra)
        log.info(console_line(step, self.n_steps, "train",
                              {k.removeprefix("train/"): v for k, v in row.items()}))
        self.window = MeanMetrics()

    # ---- evaluate: this rank's share of the eval pairs, reduced over ranks; samples
    def evaluate(self, step: int) -> dict[str, float]:
        cfg, backend, data = self.cfg, self.backend, self.data
        world = backend.world_size
        eval_batch = cfg.eval_batch_size * backend.devices
        batches = ((self.to_batch([data.eval[i] for i in idx]), valid,
                    [self.eval_labels[i] for i in idx]) for idx, valid in
                   eval_indices(len(data.eval), eval_batch, backend.rank, world))
        n_batches = -(-len(data.eval) // (eval_batch * world))
        with self.computing():
            metrics = evaluate(self.policy, self.reference, self.progress.eval(batches, n_batches),
                               cfg, backend.sync, self.groups, self.shift,
                               backend.sum_over_ranks)
        row = self.writer.write(step, step * self.step_size, "eval", metrics.reduced(backend))
        values = {k.removeprefix("eval/"): v for k, v in row.items()}
        log.info(console_line(step, self.n_steps, "eval", values))
        if cfg.sample_during_eval:
            self.write_samples(step)
        if backend.is_main:
            run_dir_lib.publish(cfg)
        fire(self.callbacks, "on_evaluate", step, values)
        return values

    def write_samples(self, step: int) -> None:
        """Greedy samples for fixed eval prompts: run_dir/samples.jsonl and TensorBoard."""
        cfg, prompts = self.cfg, self.sample_prompts
        with self.computing():
            answers = {"policy": generate(self.policy, self.tokenizer, prompts,
                                          cfg.sample_max_new_tokens)}
        if cfg.sample_reference and self.reference is not None:
            answers["reference"] = generate(self.reference, self.tokenizer, prompts,
                                            cfg.sample_max_new_tokens)
        rows = [{"step": step, "prompt": self.tokenizer.decode(prompt),
                 **{name: texts[i] for name, texts in answers.items()}}
                for i, prompt in enumerate(prompts)]
        self.writer.write_samples(step, rows)

    # ---- save: a checkpoint of `step` steps, and the run dir mirrored where it is a URL
    def save(self, step: int) -> str:
        state = {"step": step, "examples": step * self.step_size,
                 "scheduler": self.scheduler.state_dict(), "nonfinite": self.nonfinite,
                 "config": self.settings}  # what a resume must match
        if self.data.stream is not None:  # where the streamed data is: read again up to there
            state["data_stream"] = self.data.stream.state()
        if self.shift is not None:
            state["bco_shift"] = self.shift.state()
        path = self.checkpointer.save(step, self.policy, self.optimizer, state,
                                      {"window": self.window.state()}, self.synced)
        log.info("checkpoint written: %s", path)
        if self.backend.is_main:  # the metrics that go with it, where output_dir is a URL
            run_dir_lib.publish(self.cfg)
        fire(self.callbacks, "on_save", step, path)
        return path

    # ---- the end: finished, or stopped by a signal after a checkpoint
    def stopped(self, step: int, signal_name: str) -> RunResult:
        self.writer.close()
        if self.backend.is_main:
            run_dir_lib.publish(self.cfg)
        log.warning("stopped by %s after step %d; run the same command again to resume "
                    "(resume=auto)", signal_name, step)
        result = RunResult({}, self.policy, self.run_dir, preempted=True)
        fire(self.callbacks, "on_train_end", result)
        return result

    def finish(self, final: dict[str, float]) -> RunResult:
        cfg = self.cfg
        self.writer.close()
        if self.backend.is_main and not run_dir_lib.publish(cfg):
            log.warning("the run finished, but some of its files are not at %s yet (see "
                        "above): they are in %s; run the same command again to upload them",
                        cfg.run_url, self.run_dir)
        log.info("run finished; metrics in %s", cfg.run_url or self.run_dir)
        result = RunResult(final, self.policy, self.run_dir)
        fire(self.callbacks, "on_train_end", result)
        return result
