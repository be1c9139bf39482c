"""The loss family in real runs: presets compose, reference-free losses build no reference,
several losses log their terms, and every loss learns the bundled demo task."""

import json

import pytest
import torch

from conftest import tiny_train_overrides, train_rows, write_unpaired
from moedpo.config import ConfigError
from moedpo.losses import LOSSES
from moedpo.parallel import make_strategy
from moedpo.parallel.backend import init_backend
from moedpo.placement import load_models
from moedpo.trainer import run
from moedpo.validate import validate


@pytest.mark.parametrize("preset, name, beta", [("tulu3", "sigmoid_norm", 5.0),
                                                ("llama3", ["sigmoid", "sft"], 0.1),
                                                ("simpo", "simpo", 2.0), ("orpo", "orpo", 0.1)])
def test_presets_compose_with_a_model_and_data(make_cfg, preset, name, beta):
    cfg = make_cfg(f"+experiment=[demo,{preset}]")
    validate(cfg)
    assert (cfg.loss.name if isinstance(cfg.loss.name, str) else list(cfg.loss.name)) == name
    assert cfg.beta == beta and cfg.datasets == "demo"


@pytest.mark.parametrize("overrides, built", [(["loss.name=simpo"], False),
                                              (["loss.name=[simpo,sigmoid]"], True),
                                              (["loss.reference_free=true"], False),
                                              ([], True)])
def test_reference_built_only_when_a_loss_reads_it(make_cfg, overrides, built):
    cfg = make_cfg(*tiny_train_overrides(), *overrides)
    validate(cfg)
    _, policy, reference = load_models(cfg, make_strategy(cfg, init_backend("cpu")))
    assert (reference is not None) == built and policy is not None


def test_precompute_refused_when_no_loss_reads_the_reference(make_cfg):
    with pytest.raises(ConfigError, match="reference.precompute=true with loss.name=.'orpo'"):
        validate(make_cfg("loss.name=orpo", "reference.precompute=true"))


def test_weighted_losses_log_each_term(make_cfg, caplog):
    with caplog.at_level("INFO", logger="moedpo"):
        result = run(make_cfg(*tiny_train_overrides(), "loss.name=[sigmoid,sft]",
                              "loss.weights=[1.0,0.2]", "loss.simpo_gamma=2.0",
                              "loss.label_smoothing=0.1"))
    # The startup log names each term with its paper, and a knob no term reads.
    assert "loss: sigmoid (arXiv 2305.18290) + 0.2 x sft (arXiv 2404.19733)" in caplog.text
    assert "loss.simpo_gamma=2.0 has no effect: loss.name=sigmoid,sft does not read it " \
        "(simpo, alphapo do)" in caplog.text
    assert "loss.label_smoothing" not in caplog.text  # sigmoid reads it (cDPO)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if "train/loss/sft" in r)
    expected = train["train/loss/sigmoid"] + 0.2 * train["train/loss/sft"]
    assert train["train/loss"] == pytest.approx(expected, rel=1e-5)


def eval_rows(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/rewards/accuracies" in r]


@pytest.fixture(scope="module")
def unpaired_demo(tmp_path_factory):
    """The demo pairs as unpaired rows: 300 pairs -> 600 rows, 100 -> 200 for eval."""
    return write_unpaired(tmp_path_factory.mktemp("unpaired"), 300, 100)


# Slow tier: 25 training runs; each loss's formula by hand (test_formulas.py) and against
# TRL's code (test_trl_parity.py) stay in the fast tier.
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_learns_the_demo_task(make_cfg, name, unpaired_demo):
    """60 steps at the demo's lr, on held-out rows: for pair losses the chosen responses'
    log-prob lead over the rejected ones grows (what every one of them optimises, reference
    or not); for unpaired ones desirable completions rise above KTO's reference point and
    undesirable ones fall below it (the signed margin grows)."""
    extra = ["loss.label_smoothing=0.01"] if name == "exo_pair" else []
    if LOSSES[name].unpaired:
        extra.append(f"datasets=[{unpaired_demo}]")
    result = run(make_cfg("+experiment=demo", f"loss.name={name}", *extra, "max_steps=60",
                          "per_device_train_batch_size=8", "eval_frequency=60",
                          "per_device_eval_batch_size=50", "max_length=96",
                          "max_prompt_length=48", f"exp_name={name}"))
    first, last = eval_rows(result.run_dir)[0], eval_rows(result.run_dir)[-1]
    if LOSSES[name].unpaired:
        margin = lambda r: r["eval/rewards/margins"]  # noqa: E731
        assert margin(first) == 0 and margin(last) > 0.05, (name, margin(last))
        assert last["eval/rewards/accuracies"] > 0.6, last["eval/rewards/accuracies"]
        return
    lead = lambda r: r["eval/logps/chosen"] - r["eval/logps/rejected"]  # noqa: E731
    assert lead(last) > lead(first) + 1.0, (name, lead(first), lead(last))


def test_bco_resumes_with_its_reward_shift(make_cfg, tmp_path, unpaired_demo):
    """BCO's running reward mean is in the checkpoints: 2 + 2 steps == 4 steps straight (the
    shift moves every step, so a resumed run without it would train differently)."""
    common = [*tiny_train_overrides(), "loss.name=bco", f"datasets=[{unpaired_demo}]",
              "dry_run=false", "eval_frequency=100", "report_metrics_freq=1"]
    run(make_cfg(*common, "max_steps=4", "exp_name=straight"))
    run(make_cfg(*common, "max_steps=2", "exp_name=resumed"))
    run(make_cfg(*common, "max_steps=4", "exp_name=resumed"))
    rows = {name: [r for r in train_rows(tmp_path / name) if "train/loss" in r]
            for name in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"] and len(rows["straight"]) == 4
    state = json.loads(next((tmp_path / "resumed" / "checkpoints").glob("step_00000004"))
                       .joinpath("trainer_state.json").read_text())
    assert state["bco_shift"]["count"] == 4 and state["bco_shift"]["mean"] != 0


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_eval_loss_end_to_end_equals_a_hand_computation(make_cfg, tmp_path, name):
    """KTO and BCO end to end on unpaired rows: after 3 steps, the final eval loss equals the
    paper's formula computed by hand from each row's own unpadded forward (float64 sums) of
    the trained policy and the initial model, with z0 over the batch's mismatched
    completions (KTO) and the run's saved reward shift (BCO)."""
    import math

    from moedpo.data import build_data
    from moedpo.models.load import build_models, load_tokenizer

    folder = write_unpaired(tmp_path / "rows", 40, 10)  # 20 eval rows: one eval batch
    cfg = make_cfg("+experiment=demo", f"loss.name={name}", f"datasets=[{folder}]",
                   "max_steps=3", "eval_frequency=3", "per_device_train_batch_size=8",
                   "per_device_eval_batch_size=20", "lr=3e-3", "sched.warmup_steps=0",
                   "model.policy_dtype=float32", "model.reference_dtype=float32",
                   "max_length=96", "max_prompt_length=48")
    result = run(cfg)
    first, final = eval_rows(result.run_dir)[0], eval_rows(result.run_dir)[-1]
    assert final["step"] == 3 and abs(final["eval/loss"] - first["eval/loss"]) > 1e-3
    policy = result.policy.eval()
    reference = build_models(cfg.model, cfg.seed)[1].eval()
    data = build_data(cfg, load_tokenizer(cfg.model), 10**6)
    assert len(data.eval) == 20

    def logp(model, prompt, response) -> float:
        ids = torch.tensor([list(prompt) + list(response)])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
        return float(sum(logprobs[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1])))

    h = [logp(policy, p.prompt, p.chosen) - logp(reference, p.prompt, p.chosen)
         for p in data.eval]
    labels = [p.label for p in data.eval]
    assert 0 < sum(labels) < len(labels)
    beta = cfg.beta
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    if name == "kto":
        kl = [logp(policy, p.prompt, p.rejected) - logp(reference, p.prompt, p.rejected)
              for p in data.eval]
        z0 = max(0.0, sum(kl) / len(kl))
        losses = [1 - sig(beta * (x - z0)) if y else 1 - sig(beta * (z0 - x))
                  for x, y in zip(h, labels, strict=True)]
    else:
        state = json.loads((result.run_dir / "checkpoints" / "step_00000003" /
                            "trainer_state.json").read_text())
        delta = state["bco_shift"]["mean"]
        assert delta != 0.0  # it moved while training
        losses = [-math.log(sig(beta * x - delta)) if y else -math.log(sig(-(beta * x - delta)))
                  for x, y in zip(h, labels, strict=True)]
    assert final["eval/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-6)
