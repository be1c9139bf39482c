"""The Python API (moedpo.train, moedpo.load_config) and callbacks: the same configs as the
command line, the same run, and every event a callback is promised."""

import json
from pathlib import Path

import pytest

import moedpo
from conftest import compose_cfg, tiny_train_overrides
from moedpo.callbacks import Callback
from moedpo.config import ConfigError


def test_load_config_equals_the_command_lines_config(tmp_path):
    overrides = [*tiny_train_overrides(), f"output_dir={tmp_path}", "lr=5e-4", "model.lora.r=4"]
    assert moedpo.load_config(overrides=overrides) == compose_cfg(*overrides)


def test_values_from_a_dict_or_yaml_with_overrides_on_top(tmp_path):
    values = {"lr": 2e-4, "loss": {"name": "ipo"}, "model.lora.r": 8, "beta": 0.3}
    cfg = moedpo.load_config(values, ["+experiment=demo", "beta=0.05"])
    assert (cfg.lr, cfg.loss.name, cfg.model.lora.r) == (2e-4, "ipo", 8)
    assert cfg.beta == 0.05  # the override wins over the dict
    assert cfg.exp_name == "demo" and cfg.max_steps == 150  # the experiment's own values
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.0002\nloss:\n  name: ipo\nmodel:\n  lora:\n    r: 8\nbeta: 0.3\n")
    assert moedpo.load_config(path, ["+experiment=demo", "beta=0.05"]) == cfg


@pytest.mark.parametrize("source, message", [
    ({"lrr": 1e-3}, "lrr"),
    ({"lr": "fast"}, "lr: Value 'fast' of type 'str' could not be converted"),
    ({"model": {"polcy_dtype": "float32"}}, "polcy_dtype"),
    ("/no/such/config.yaml", "/no/such/config.yaml: no such config file"),
])
def test_a_bad_key_value_or_file_is_one_line_naming_it(source, message):
    with pytest.raises(ConfigError) as err:
        moedpo.load_config(source)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_misspelt_key_gets_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        moedpo.load_config({"lrr": 1e-3})


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_step_end(self, step, metrics):
        self.events.append(("step", step, metrics))

    def on_evaluate(self, step, metrics):
        self.events.append(("eval", step, metrics))

    def on_save(self, step, path):
        self.events.append(("save", step, path))

    def on_train_end(self, result):
        self.events.append(("end", result))


def test_train_runs_and_callbacks_see_every_event(tmp_path):
    recorder = Recorder()
    overrides = [*tiny_train_overrides(), f"output_dir={tmp_path}", "report_metrics_freq=1",
                 "checkpoint.save_frequency=2"]
    result = moedpo.train(overrides=overrides, callbacks=[recorder])
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in recorder.events if e[0] == "step"]
    # One event per step, with the loss, grad norm and lr metrics.jsonl logged for it.
    assert [s for _, s, _ in steps] == [0, 1, 2]
    train = {r["step"]: r for r in rows if "train/loss" in r}
    for _, step, metrics in steps:
        assert metrics["loss"] == pytest.approx(train[step]["train/loss"], rel=1e-6)
        assert metrics["grad_norm"] == pytest.approx(train[step]["train/grad_norm"], rel=1e-6)
        assert metrics["lr"] == pytest.approx(train[step]["train/lr"], rel=1e-9)
    evals = [(s, m) for kind, s, m in [e for e in recorder.events if e[0] == "eval"]]
    assert [s for s, _ in evals] == [r["step"] for r in rows if "eval/loss" in r] == [0, 2, 3]
    assert evals[-1][1]["loss"] == pytest.approx(result.final_eval["loss"])
    saves = [(s, p) for kind, s, p in [e for e in recorder.events if e[0] == "save"]]
    assert [s for s, _ in saves] == [2, 3] and all(Path(p).is_dir() for _, p in saves)
    assert recorder.events[-1] == ("end", result) and not result.preempted
    # Events in the order they happen: the final eval after the last checkpoint.
    kinds = [e[0] for e in recorder.events]
    assert kinds.index("end") == len(kinds) - 1 and kinds[-2] == "eval" and kinds[-3] == "save"


def test_a_dpoconfig_runs_as_given_and_refuses_overrides_beside_it(tmp_path):
    cfg = compose_cfg(*tiny_train_overrides(), f"output_dir={tmp_path}", "max_steps=1")
    with pytest.raises(ConfigError, match="give overrides with a dict or YAML config"):
        moedpo.train(cfg, overrides=["lr=1e-4"])
    assert moedpo.train(cfg).run_dir == tmp_path / "demo"


def test_a_runs_own_config_yaml_gives_back_its_config(tmp_path):
    """A run's config.yaml (what it ran with) loads back to the same DPOConfig, so a run can
    be repeated or varied from its own folder."""
    cfg = compose_cfg(*tiny_train_overrides(), f"output_dir={tmp_path}", "max_steps=1",
                      "loss.name=[sigmoid,sft]", "loss.weights=[1.0,0.1]")
    result = moedpo.train(cfg)
    assert moedpo.load_config(result.run_dir / "config.yaml") == cfg
