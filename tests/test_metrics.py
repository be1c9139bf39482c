"""The metric window: what a report averages, and what a resumed run restores of it."""

import json
import types

import pytest
import torch

from moedpo.metrics import MeanMetrics
from moedpo.models.router import RouterOutput


def output(n_pairs: int, tokens: int, aux: float, z: float):
    router = RouterOutput(torch.tensor(aux), torch.tensor(z), torch.ones(2, 4) * tokens / 2,
                          torch.tensor(0.0), torch.tensor(0.0), torch.tensor(float(tokens)), 2)
    return types.SimpleNamespace(metrics={"loss": torch.ones(n_pairs)}, router=router)


def test_router_losses_are_means_over_tokens_not_batches():
    window = MeanMetrics()
    window.add_output(output(2, tokens=300, aux=1.0, z=4.0))
    window.add_output(output(2, tokens=100, aux=3.0, z=0.0))
    means = window.means()
    # By tokens: (300 * 1 + 100 * 3) / 400 = 1.5, where the mean of batch means gives 2.
    assert means["router/aux_loss"] == pytest.approx(1.5)
    assert means["router/z_loss"] == pytest.approx(3.0)
    assert means["moe/routed_tokens"] == 400


def test_resumed_window_keeps_its_time_and_tokens():
    window = MeanMetrics()
    window.add_output(output(4, tokens=100, aux=1.0, z=1.0))
    window.seconds, window.tokens = 2.0, 640
    restored = MeanMetrics.from_state(json.loads(json.dumps(window.state())))
    assert (restored.count, restored.seconds, restored.tokens) == (4, 2.0, 640)
    assert restored.means() == window.means()
    # A checkpoint of an older version has no time: it starts from zero.
    state = window.state()
    del state["seconds"], state["tokens"]
    assert MeanMetrics.from_state(state).seconds == 0.0


def test_torn_last_line_is_dropped_and_json_is_strict(tmp_path, caplog):
    from moedpo.metrics import MetricsError, MetricWriter, read_rows
    from moedpo.run_dir import trim_metrics

    writer = MetricWriter(tmp_path, loggers=[])
    window = MeanMetrics()
    window.add({"loss": torch.tensor([float("nan")])})
    writer.write(0, 0, "train", window, {"grad_norm": float("inf")})
    writer.write(1, 4, "train", window)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "examples": 8, "train/lo')  # a crash mid-write
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["train/loss"] is None
    assert "dropping a torn last line" in caplog.text
    trim_metrics(tmp_path, 1)  # a resume at step 1 reads it and rewrites it whole
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{oops\n{"step": 1}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not a JSON row"):
        read_rows(tmp_path / "metrics.jsonl")
    # A row without "step" (edited by hand): one line naming it, also from a resume's trim
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"train/loss": 0.6}\n{"step": 1}\n')
    for read in (lambda: read_rows(tmp_path / "metrics.jsonl"),
                 lambda: trim_metrics(tmp_path, 1)):
        with pytest.raises(MetricsError, match=r'metrics.jsonl:2: a row without its integer '
                           r'"step"'):
            read()

