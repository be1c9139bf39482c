"""The parallelism strategies behind one interface (parallel/strategy.py): the registry picks
the one each backend and process count runs, each states its own refusals, and the trainer
asks only the strategy, so a strategy added to the registry is the one a run uses."""

import json
import logging

import pytest
import torch

import moedpo
from conftest import tiny_train_overrides
from moedpo import parallel
from moedpo.config import ConfigError
from moedpo.parallel import STRATEGIES, strategy_class
from moedpo.parallel.expert import ExpertParallel
from moedpo.parallel.fsdp import FSDP2
from moedpo.parallel.single import SingleProcess
from moedpo.parallel.spmd import SPMD
from moedpo.validate import check_placement, use_meta_init


@pytest.mark.parametrize("kind, world, ep, expected", [
    ("cpu", 1, 1, SingleProcess), ("cuda", 1, 1, SingleProcess),
    ("cpu", 1, 2, SingleProcess),  # which then refuses it: EP needs several processes
    ("cpu", 2, 1, FSDP2), ("cuda", 8, 1, FSDP2),
    ("cpu", 4, 2, ExpertParallel), ("cuda", 8, 8, ExpertParallel),
    ("xla", 1, 1, SPMD), ("xla", 1, 2, SPMD),
])
def test_the_registry_picks_the_strategy_of_each_backend_and_process_count(
        make_cfg, kind, world, ep, expected):
    cfg = make_cfg(f"parallel.expert_parallel={ep}")
    assert strategy_class(kind, world, cfg) is expected


def test_every_strategy_has_its_own_name_and_module():
    names = [s.name for s in STRATEGIES]
    assert all(names) and len(set(names)) == len(names)
    assert len({s.__module__ for s in STRATEGIES}) == len(STRATEGIES)


@pytest.mark.parametrize("strategy, overrides, wanted", [
    (SingleProcess, ["parallel.expert_parallel=2"], "spreads the experts over torchrun"),
    (SingleProcess, ["tensor_parallelism=2"], "tensor_parallelism=2 needs the xla backend"),
    (FSDP2, ["tensor_parallelism=2"], "tensor_parallelism=2 needs the xla backend"),
    (FSDP2, ["model.lora.r=4", "model.lora.quantize=4bit"], "FSDP2 cannot shard"),
    (ExpertParallel, ["parallel.expert_parallel=4"], "must divide the 6 processes"),
    (FSDP2, ["parallel.replicate=4"], "parallel.replicate=4: must divide the 2 processes"),
    (ExpertParallel, ["parallel.expert_parallel=2", "parallel.replicate=2"],
     "parallel.expert_parallel=2 x parallel.replicate=2 must divide the 6 processes"),
    (SPMD, ["model.lora.r=4"], "model.lora.r > 0 on XLA"),
    (SPMD, ["model.compile=true"], "on XLA every step is compiled whole"),
    (SPMD, ["model.moe_implementation=dropless"], "XLA recompiles every step"),
    (SPMD, ["model.meta_init=true"], "model.meta_init=true on XLA"),
])
def test_each_strategy_refuses_what_it_cannot_run(make_cfg, strategy, overrides, wanted):
    kind = "xla" if strategy is SPMD else "cpu"
    world = {SingleProcess: 1, FSDP2: 2, ExpertParallel: 6, SPMD: 1}[strategy]
    cfg = make_cfg(*overrides)
    refusals = list(strategy.refusals(cfg, kind, world))
    assert len(refusals) == 1 and wanted in refusals[0] and "\n" not in refusals[0]
    # ... and that only: the same strategy with the key at its default runs
    assert not list(strategy.refusals(make_cfg(), kind, world))


def test_validate_raises_the_chosen_strategys_refusal(make_cfg, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ConfigError, match="parallel.expert_parallel=4: must divide the 6"):
        check_placement(make_cfg("parallel.expert_parallel=4", "parallel.backend=cpu"))


@pytest.mark.parametrize("strategy, checkpoint, expected", [
    (SingleProcess, False, False), (FSDP2, False, True), (ExpertParallel, False, True),
    (SPMD, False, False), (SPMD, True, True)])
def test_meta_init_by_default_where_the_strategy_fills_shards(make_cfg, tmp_path, strategy,
                                                              checkpoint, expected):
    cfg = make_cfg(*([f"checkpoint_manager_path={tmp_path}"] if checkpoint else []))
    assert use_meta_init(cfg, strategy) is expected
    assert use_meta_init(make_cfg("model.meta_init=false"), strategy) is False


class Recording(SingleProcess):
    """A strategy of a test's own: one process, recording what the trainer asks of it."""

    name = "recording"
    calls: list = []

    @classmethod
    def applies(cls, kind, world, cfg):
        return kind == "cpu" and world == 1

    def shard(self, model, role):
        self.calls.append(("shard", role, type(model).__name__))
        return super().shard(model, role)

    def place(self, batch):
        self.calls.append(("place", tuple(batch["input_ids"].shape)))
        return batch

    def step_metrics(self):
        return {"recorded_calls": float(len(self.calls))}


def test_a_strategy_added_to_the_registry_is_the_one_a_run_uses(tmp_path, monkeypatch, caplog):
    """The trainer, placement and startup ask only the strategy: a new parallelism is its
    class and an entry in the registry."""
    monkeypatch.setattr(parallel, "STRATEGIES", (Recording, *STRATEGIES))
    Recording.calls = []
    caplog.set_level(logging.INFO, logger="moedpo")
    result = moedpo.train(overrides=[*tiny_train_overrides(), f"output_dir={tmp_path}",
                                     "parallel.backend=cpu", "do_first_eval=false",
                                     "report_metrics_freq=1"])
    shards = [c for c in Recording.calls if c[0] == "shard"]
    assert shards == [("shard", "policy", "MixtralForCausalLM"),
                      ("shard", "reference", "MixtralForCausalLM")]
    placed = [c for c in Recording.calls if c[0] == "place"]
    assert len(placed) >= 3  # one micro-batch per step at least, and the eval batches
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    train = [r for r in rows if "train/recorded_calls" in r]
    assert len(train) == 3 and all(r["train/recorded_calls"] > 0 for r in train)
    assert "strategy recording" in caplog.text
    assert torch.isfinite(torch.tensor(result.final_eval["loss"]))
