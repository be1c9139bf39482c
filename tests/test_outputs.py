"""What users see: plots, the data report, samples, progress output, trackers."""

import importlib.util
import io
import json
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_train_overrides, write_jsonl_gz
from moedpo.config import ConfigError
from moedpo.inspect_data import inspect
from moedpo.plot import plot_runs
from moedpo.progress import Progress
from moedpo.trainer import run

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_of_real_runs_overlaid(make_cfg, tmp_path):
    a = run(make_cfg(*tiny_train_overrides(), "model.capacity_factor=1.0", "exp_name=a"))
    b = run(make_cfg(*tiny_train_overrides(), "exp_name=b"))
    out, titles = plot_runs([a.run_dir, b.run_dir], tmp_path / "p.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 20_000
    for title in ("DPO loss", "reward accuracy", "reward margin", "learning rate",
                  "gradient norm", "pairs / s", "MoE: dropped slot fraction", "expert load",
                  "MoE: routing agreement", "MoE: router KL", "MoE: expert load coefficient"):
        assert any(t.startswith(title) for t in titles), title
    done = subprocess.run([sys.executable, "-m", "moedpo", "plot", str(a.run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (a.run_dir / "plots" / "metrics.png").exists()


def test_data_report_counts_truncation(make_cfg, tmp_path):
    prompt = "\n\nHuman: " + "word " * 30 + "\n\nAssistant:"
    rows = [{"prompt": prompt, "chosen": "yes", "rejected": "no"}] * 3  # prompt cut only
    rows += [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "long " * 40,
              "rejected": "no"}] * 2  # responses cut
    rows += [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": "ok", "rejected": "no"}] * 5
    write_jsonl_gz(tmp_path / "train.jsonl.gz", rows + ["{broken"])
    write_jsonl_gz(tmp_path / "test.jsonl.gz", rows[-2:])
    cfg = make_cfg("model=tiny", f"datasets=[{tmp_path}]", "max_length=24",
                   "max_prompt_length=12")
    report = inspect(cfg)
    assert "prompt cut to 12 tokens: 3 pairs (25.0%)" in report  # 12 pairs, train and test
    assert "responses cut to 12 tokens: 2 pairs (16.7%)" in report
    assert "skipped rows: 1 {'malformed JSON" in report and "train.jsonl.gz:11" in report
    assert "[chosen]" in report and "⟦" in report  # the response marked


def test_samples_written_with_expected_fields(make_cfg):
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2", "sample_during_eval=true",
                   "n_eval_model_samples=2", "sample_max_new_tokens=5", "sample_reference=true")
    result = run(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2]  # first eval, final eval (step 2)
    assert all(set(r) == {"step", "prompt", "policy", "reference"} for r in rows)
    assert rows[0]["prompt"].endswith("Assistant:")


def test_plain_lines_and_no_bar_when_not_a_terminal(tmp_path):
    done = subprocess.run([sys.executable, "run_dpo_no_trainer.py", *tiny_train_overrides(),
                           f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0
    output = done.stdout + done.stderr
    assert "train step 0/3 | loss" in output and "%|" not in output and "step/s" not in output


def test_bar_shows_metrics_when_enabled(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    with Progress(4, 1, enabled=True) as progress:
        progress.step({"loss": 0.5, "rewards/accuracies": 0.75, "examples_per_second": 12.0})
    text = buffer.getvalue()
    assert "2/4" in text and "loss=0.5" in text and "acc=0.75" in text and "pairs/s=12" in text


def test_unknown_or_missing_logger_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError,
                       match="loggers: 'neptune' is not one of tensorboard, wandb, mlflow"):
        run(make_cfg(*tiny_train_overrides(), "loggers=[neptune]"))
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ConfigError, match="pip install mlflow"):
            run(make_cfg(*tiny_train_overrides(), "loggers=[tensorboard,mlflow]"))


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow not installed (pip install -e '.[dev]' installs it)")
def test_mlflow_local_store_gets_metrics_jsonl_values_and_the_config(make_cfg, monkeypatch):
    """MLflow with its local store in the run dir (SQLite: MLflow 3 refuses the old file
    store), read back through its own client: every metric of metrics.jsonl at the same steps
    with the same values, and the config as params."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run(make_cfg(*tiny_train_overrides(), "loggers=[tensorboard,mlflow]"))
    client = MlflowClient(tracking_uri=f"sqlite:///{(result.run_dir / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "Default"]
    (logged,) = client.search_runs([experiment.experiment_id])
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    expected = {(k, r["step"]): v for r in rows for k, v in r.items()
                if k not in ("step", "examples") and isinstance(v, int | float)}
    names = {k for k, _ in expected}
    assert {"train/loss", "eval/loss", "train/lr"} <= names
    got = {(m.key, m.step): m.value for name in names
           for m in client.get_metric_history(logged.info.run_id, name)}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-12) for k, v in expected.items())
    assert logged.data.params["beta"] == "0.1" and logged.data.params["max_steps"] == "3"


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb not installed (pip install -e '.[dev]' installs it)")
def test_wandb_offline_gets_the_same_metric_names(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = run(make_cfg(*tiny_train_overrides(), "loggers=[tensorboard,wandb]"))
    offline = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert offline, "wandb wrote no offline run"


def test_data_report_of_conversational_rows_shows_format_and_template(make_cfg):
    report = inspect(make_cfg("+experiment=demo", "datasets=demo_chat"))
    assert "demo_chat: 2000 train pairs, 200 eval pairs; row format: conversational-explicit " \
        "(2200)" in report
    # The rendered template, the response marked: the turn ends with the template's EOS.
    assert "[chosen]   \\n\\nHuman: " in report and "\\n\\nAssistant:⟦ " in report
    assert "<|endoftext|>⟧" in report and "prompt ids not a prefix" not in report
