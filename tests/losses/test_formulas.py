"""Each loss against a float64 hand formula written from its paper with the math module, on
random log-probs; its closed form at step 0 (policy == reference); weighted sums."""

import math
import random

import pytest
import torch

from moedpo.logps import SequenceLogps
from moedpo.losses import LOSSES, LossOptions, preference_loss

OPTS = LossOptions(beta=0.3, label_smoothing=0.15, simpo_gamma=0.4, cpo_alpha=0.7,
                   alphapo_alpha=0.3, dpop_lambda=5.0, rdpo_alpha=0.02, discopop_tau=0.05)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def hand_pair(name: str, pc, pr, rc, rr, nc, nr, o: LossOptions) -> float:
    """One pair's loss from scalars, formulas as in each paper (moedpo.losses docstrings)."""
    b, e = o.beta, o.label_smoothing
    hc, hr = pc - rc, pr - rr
    d = hc - hr
    mc, mr = pc / nc, pr / nr
    nll = -mc
    formulas = {
        "sigmoid": lambda: -(1 - e) * logsig(b * d) - e * logsig(-b * d),
        "sigmoid_norm": lambda: -logsig(b * (hc / nc - hr / nr)),
        "robust": lambda: (-(1 - e) * logsig(b * d) + e * logsig(-b * d)) / (1 - 2 * e),
        "hinge": lambda: max(0.0, 1 - b * d),
        "ipo": lambda: (hc / nc - hr / nr - 1 / (2 * b)) ** 2,
        "exo_pair": lambda: (sig(b * d) * (logsig(b * d) - math.log(1 - e))
                             + sig(-b * d) * (logsig(-b * d) - math.log(e))),
        "discopop": lambda: ((1 - sig(b * d / o.discopop_tau)) * -logsig(b * d)
                             + sig(b * d / o.discopop_tau) * math.exp(-b * d)),
        "dpop": lambda: -logsig(b * (d - o.dpop_lambda * max(0.0, rc - pc))),
        "rdpo": lambda: -logsig(b * d - o.rdpo_alpha * (nc - nr)),
        "nca_pair": lambda: -logsig(b * hc) - 0.5 * logsig(-b * hc) - 0.5 * logsig(-b * hr),
        "bco_pair": lambda: -logsig(b * hc) - logsig(-b * hr),
        "sppo_hard": lambda: (hc - 1 / (2 * b)) ** 2 + (hr + 1 / (2 * b)) ** 2,
        "apo_zero": lambda: 1 - sig(b * hc) + sig(b * hr),
        "apo_down": lambda: sig(b * hc) + 1 - sig(b * (hc - hr)),
        # the authors' released trainer: DPO_loss + 0.5 * (mse(h_c, 1/2b) + mse(h_r, -1/2b))
        "cal_dpo": lambda: -logsig(d) + 0.5 * ((hc - 1 / (2 * b)) ** 2 + (hr + 1 / (2 * b)) ** 2),
        "simpo": lambda: (-(1 - e) * logsig(b * (mc - mr) - o.simpo_gamma)
                          - e * logsig(-(b * (mc - mr) - o.simpo_gamma))),
        "cpo": lambda: (-(1 - e) * logsig(b * (pc - pr)) - e * logsig(-b * (pc - pr))
                        + o.cpo_alpha * nll),
        "alphapo": lambda: _alphapo(mc, mr, o),
        "orpo": lambda: nll - b * logsig(
            (mc - mr) - (math.log(1 - math.exp(mc)) - math.log(1 - math.exp(mr)))),
        "sft": lambda: nll,
    }
    return formulas[name]()


def hand_unpaired(name: str, pc, rc, kl_pc, kl_rc, labels, o: LossOptions) -> list[float]:
    """KTO (eq. 7-8), BCO (eq. 8) and unpaired APO-zero per row; z0 = max(0, mean KL
    log-ratio)."""
    b = o.beta
    z = max(0.0, sum(a - r for a, r in zip(kl_pc, kl_rc, strict=True)) / len(kl_pc))
    out = []
    for h, y in zip((a - r for a, r in zip(pc, rc, strict=True)), labels, strict=True):
        if name == "kto":
            out.append(o.kto_desirable_weight * (1 - sig(b * (h - z))) if y
                       else o.kto_undesirable_weight * (1 - sig(b * (z - h))))
        elif name == "bco":
            r = b * h - o.bco_delta
            out.append(o.kto_desirable_weight * -logsig(r) if y
                       else o.kto_undesirable_weight * -logsig(-r))
        else:
            out.append(o.kto_desirable_weight * (1 - sig(b * h)) if y
                       else o.kto_undesirable_weight * sig(b * h))
    return out


def hand(name: str, pc, pr, rc, rr, nc, nr, o: LossOptions) -> list[float]:
    """Per-pair losses of a batch; AOT's are batch statistics: sorted, matched by rank."""
    b, e = o.beta, o.label_smoothing
    if name in ("aot", "aot_unpaired"):
        pairs = range(len(pc))
        if name == "aot":
            x = sorted(pc[i] - pr[i] for i in pairs)
            y = sorted(rc[i] - rr[i] for i in pairs)
        else:
            x = sorted(pc[i] - rc[i] for i in pairs)
            y = sorted(pr[i] - rr[i] for i in pairs)
        return [-(1 - e) * logsig(b * (u - w)) - e * logsig(-b * (u - w))
                for u, w in zip(x, y, strict=True)]
    return [hand_pair(name, *values, o) for values in zip(pc, pr, rc, rr, nc, nr, strict=True)]


def _alphapo(mc: float, mr: float, o: LossOptions) -> float:
    a = o.alphapo_alpha
    r_c, r_r = (1 - math.exp(mc) ** -a) / a, (1 - math.exp(mr) ** -a) / a
    z = o.beta * (r_c - r_r) - o.simpo_gamma
    return -(1 - o.label_smoothing) * logsig(z) - o.label_smoothing * logsig(-z)


def random_batch(seed: int, pairs: int = 6):
    rng = random.Random(seed)
    nc = [float(rng.randint(1, 40)) for _ in range(pairs)]
    nr = [float(rng.randint(1, 40)) for _ in range(pairs)]
    # Log-probs of real responses: about -0.5 to -3 nats a token; the reference near.
    pc = [-n * rng.uniform(0.5, 3) for n in nc]
    pr = [-n * rng.uniform(0.5, 3) for n in nr]
    rc = [v + rng.uniform(-3, 3) for v in pc]
    rr = [v + rng.uniform(-3, 3) for v in pr]
    return pc, pr, rc, rr, nc, nr


def seq(chosen, rejected, nc, nr) -> SequenceLogps:
    return SequenceLogps(torch.tensor(chosen + rejected, dtype=torch.double),
                         torch.tensor(nc + nr, dtype=torch.double),
                         torch.zeros(2 * len(chosen), dtype=torch.double))


PAIRED = [n for n, spec in LOSSES.items() if not spec.unpaired]
UNPAIRED = [n for n, spec in LOSSES.items() if spec.unpaired]


@pytest.mark.parametrize("name", UNPAIRED)
@pytest.mark.parametrize("z_positive", [True, False])
def test_each_unpaired_loss_equals_its_hand_formula(name, z_positive):
    pc, pr, rc, rr, nc, nr = random_batch(8)
    if z_positive:  # the KL completions more likely under the policy: z0 > 0
        rr = [v - 4.0 for v in pr]
    labels = [True, False, True, True, False, False]
    opts = LossOptions(beta=0.3, kto_desirable_weight=1.3, kto_undesirable_weight=0.7,
                       bco_delta=0.25)
    out = preference_loss(seq(pc, pr, nc, nr), seq(rc, rr, nc, nr), [name], None, opts,
                          labels=torch.tensor(labels, dtype=torch.double))
    expected = hand_unpaired(name, pc, rc, pr, rr, labels, opts)
    torch.testing.assert_close(out.metrics["loss"], torch.tensor(expected, dtype=torch.double))
    z = out.metrics["kl"][0].item()
    assert (z > 0) == z_positive or (name != "kto" and z >= 0)
    h = [a - r for a, r in zip(pc, rc, strict=True)]
    right = [float((hi > z) == y) for hi, y in zip(h, labels, strict=True)]
    assert out.metrics["rewards/accuracies"].tolist() == right


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_equals_its_hand_formula(name, seed):
    pc, pr, rc, rr, nc, nr = random_batch(seed)
    reference = seq(rc, rr, nc, nr) if LOSSES[name].reference else None
    if reference is None:
        rc, rr = [0.0] * len(pc), [0.0] * len(pr)
    out = preference_loss(seq(pc, pr, nc, nr), reference, [name], None, OPTS)
    expected = hand(name, pc, pr, rc, rr, nc, nr, OPTS)
    assert len(expected) == len(pc)
    torch.testing.assert_close(out.metrics["loss"], torch.tensor(expected, dtype=torch.double),
                               rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


# Step 0: policy == reference, beta 0.1 (the table; reference-free losses excluded).
AT_START = {"sigmoid": math.log(2), "robust": math.log(2), "sigmoid_norm": math.log(2),
            "dpop": math.log(2), "rdpo": None, "ipo": 25.0, "hinge": 1.0, "apo_zero": 1.0,
            "apo_down": 1.0, "nca_pair": 2 * math.log(2), "sppo_hard": 50.0,
            "bco_pair": 2 * math.log(2), "cal_dpo": math.log(2) + 25.0,
            "aot": math.log(2), "aot_unpaired": math.log(2), "discopop": None,
            "exo_pair": None, "kto": 0.5, "apo_zero_unpaired": 0.5, "bco": math.log(2)}


@pytest.mark.parametrize("name", [n for n, v in AT_START.items() if v is not None])
def test_value_at_step_zero(name):
    pc, pr, _, _, nc, nr = random_batch(3)
    policy = seq(pc, pr, nc, nr)
    labels = torch.tensor([1.0, 0.0] * 3, dtype=torch.double) if LOSSES[name].unpaired else None
    out = preference_loss(policy, policy, [name], None, LossOptions(beta=0.1), labels=labels)
    torch.testing.assert_close(out.metrics["loss"],
                               torch.full((len(pc),), AT_START[name], dtype=torch.double))
    assert out.metrics["rewards/margins"].abs().max() == 0


def test_discopop_at_step_zero_blends_half_and_half():
    """m = sigma(0) = 1/2: (ln 2 + e^0) / 2."""
    pc, pr, _, _, nc, nr = random_batch(4)
    policy = seq(pc, pr, nc, nr)
    out = preference_loss(policy, policy, ["discopop"], None, LossOptions(beta=0.1))
    assert out.loss.item() == pytest.approx((math.log(2) + 1) / 2)


def test_weighted_sum_of_losses_and_their_terms():
    pc, pr, rc, rr, nc, nr = random_batch(5)
    policy, reference = seq(pc, pr, nc, nr), seq(rc, rr, nc, nr)
    out = preference_loss(policy, reference, ["sigmoid", "sft"], [1.0, 0.2], OPTS)
    dpo = hand("sigmoid", pc, pr, rc, rr, nc, nr, OPTS)
    nll = [-pc[i] / nc[i] for i in range(len(pc))]
    total = sum(d + 0.2 * n for d, n in zip(dpo, nll, strict=True))
    assert out.loss.item() == pytest.approx(total / 6)
    torch.testing.assert_close(out.metrics["loss/sft"], torch.tensor(nll, dtype=torch.double))
    torch.testing.assert_close(out.metrics["loss/sigmoid"],
                               torch.tensor(dpo, dtype=torch.double))


def test_gradients_reach_only_the_policy_through_each_loss():
    pc, pr, rc, rr, nc, nr = random_batch(6)
    labels = torch.tensor([1.0, 0.0] * 3, dtype=torch.double)
    for name, spec in LOSSES.items():
        logps = torch.tensor(pc + pr, dtype=torch.double, requires_grad=True)
        policy = SequenceLogps(logps, torch.tensor(nc + nr, dtype=torch.double),
                               torch.zeros(12, dtype=torch.double))
        reference = seq(rc, rr, nc, nr) if spec.reference else None
        preference_loss(policy, reference, [name], None, OPTS,
                        labels=labels if spec.unpaired else None).loss.backward()
        assert torch.isfinite(logps.grad).all() and logps.grad.abs().sum() > 0, name
        if spec.unpaired:  # the KL completions only set z0: no gradient through them
            assert logps.grad[6:].abs().sum() == 0, name


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores_replace_the_log_ratios(kind):
    """f-DPO: sigmoid of beta (f'(t_c) - f'(t_r)), t = pi / pi_ref, f' by hand."""
    pc, pr, rc, rr, nc, nr = random_batch(7)
    a = 0.3
    fprime = {"forward_kl": lambda h: 1 - math.exp(-h),
              "js_divergence": lambda h: math.log(2 * math.exp(h) / (1 + math.exp(h))),
              "alpha_divergence": lambda h: (math.exp(h) ** (a - 1) - 1) / (a - 1)}[kind]
    out = preference_loss(seq(pc, pr, nc, nr), seq(rc, rr, nc, nr), ["sigmoid"], None,
                          LossOptions(beta=0.3), f_divergence=kind, f_alpha=a)
    expected = [-logsig(0.3 * (fprime(pc[i] - rc[i]) - fprime(pr[i] - rr[i])))
                for i in range(6)]
    torch.testing.assert_close(out.metrics["loss"], torch.tensor(expected, dtype=torch.double))


def test_rewards_accuracy_is_strict_and_reference_free_uses_zero():
    policy = seq([-1.0, -2.0], [-2.0, -2.0], [1.0, 1.0], [1.0, 1.0])
    ref = seq([-1.5, -2.0], [-1.5, -2.0], [1.0, 1.0], [1.0, 1.0])
    out = preference_loss(policy, ref, ["sigmoid"], None, LossOptions(beta=0.1))
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.05, 0.0])
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # a tie is not a win
    free = preference_loss(policy, None, ["sigmoid"], None, LossOptions(beta=0.1))
    assert free.loss.item() == pytest.approx(-(logsig(0.1) + logsig(0.0)) / 2)


def test_ipo_rewards_are_of_sums_while_the_loss_sees_means():
    policy = seq([-4.0, -2.0], [-6.0, -2.0], [2.0, 1.0], [3.0, 1.0])
    ref = seq([0.0, 0.0], [0.0, 0.0], [2.0, 1.0], [3.0, 1.0])
    out = preference_loss(policy, ref, ["ipo"], None, LossOptions(beta=0.5))
    # pair 0: (-4/2) - (-6/3) = 0 -> (0 - 1)^2; pair 1: 0 -> 1
    assert out.loss.item() == pytest.approx(1.0)
    assert out.metrics["rewards/chosen"].tolist() == [-2.0, -1.0]
    assert out.metrics["rewards/margins"].tolist() == [1.0, 0.0]


def test_bco_reward_shift_is_the_running_mean_of_batch_means_and_resumes():
    from moedpo.losses.unpaired import RewardShift

    shift = RewardShift()
    batches = [torch.tensor([1.0, 3.0]), torch.tensor([-2.0]), torch.tensor([0.5, 0.5, 2.0])]
    got = [shift.update(b) for b in batches]
    means = [2.0, -2.0, 1.0]
    assert got == pytest.approx([sum(means[:i + 1]) / (i + 1) for i in range(3)])
    again = RewardShift()
    again.restore(shift.state())
    assert again.update(torch.tensor([4.0])) == shift.update(torch.tensor([4.0]))
    halved = RewardShift(reduce=lambda x: float(x) / 2)  # e.g. an average over two ranks
    assert halved.update(torch.tensor([3.0])) == 1.5


def test_kto_kl_estimate_over_ranks_is_the_global_micro_batchs():
    """z0 of two ranks' rows summed over ranks == z0 of all rows in one batch (hand mean);
    rows past `rows` (eval's padding) do not count; floored at 0."""
    from moedpo.losses.base import PairLogps
    from moedpo.losses.unpaired import global_kl_estimate, kl_estimate

    def view(mismatched: list[float]) -> PairLogps:
        n = len(mismatched)
        zeros = torch.zeros(n, dtype=torch.double)
        return PairLogps(zeros, torch.tensor(mismatched, dtype=torch.double), zeros, zeros,
                         zeros + 1, zeros + 1)

    a, b = view([0.5, 2.0, 1.0]), view([4.0, -9.0])  # rank 1's last row is padding

    def plus(other: torch.Tensor):  # the other rank's [sum, count], as all_reduce adds it
        return lambda values: values + other

    z = global_kl_estimate(a, plus(torch.tensor([4.0, 1.0])))
    assert float(z) == pytest.approx((0.5 + 2.0 + 1.0 + 4.0) / 4)
    assert float(global_kl_estimate(b, plus(torch.tensor([3.5, 3.0])), rows=1)) == \
        pytest.approx(float(z))
    alone = view([-1.0, -3.0])
    assert float(global_kl_estimate(alone, lambda x: x)) == 0.0
    assert float(kl_estimate(alone)) == 0.0
    assert float(kl_estimate(alone, LossOptions(kto_kl=torch.tensor(0.25)))) == 0.25


def test_cal_dpo_equals_the_authors_batch_form():
    """Cal-DPO as the authors' released trainer computes a batch: the mean of
    -log sigma(h_c - h_r) plus 0.5 x (mse(h_c, 1/(2 beta)) + mse(h_r, -1/(2 beta)))."""
    import torch.nn.functional as F

    pc, pr, rc, rr, nc, nr = random_batch(5)
    out = preference_loss(seq(pc, pr, nc, nr), seq(rc, rr, nc, nr), ["cal_dpo"], None, OPTS)
    hc = torch.tensor(pc, dtype=torch.double) - torch.tensor(rc, dtype=torch.double)
    hr = torch.tensor(pr, dtype=torch.double) - torch.tensor(rr, dtype=torch.double)
    target = torch.tensor(1 / (2 * OPTS.beta), dtype=torch.double)
    authors = (-F.logsigmoid(hc - hr) + 0.5 * (F.mse_loss(hc, target.expand_as(hc))
                                               + F.mse_loss(hr, -target.expand_as(hr)))).mean()
    assert out.loss.item() == pytest.approx(authors.item(), rel=1e-12)
