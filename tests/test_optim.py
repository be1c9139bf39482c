import pytest
import torch

from moedpo.config import ConfigError
from moedpo.optim import build_optimizer, build_scheduler, step_if_finite


def lrs(cfg, steps):
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(cfg, opt, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_hold(make_cfg):
    cfg = make_cfg("lr=1.0", "sched.warmup_steps=3")
    assert lrs(cfg, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_reaches_min_lr_at_last_step(make_cfg):
    cfg = make_cfg("sched=CosineAnnealing", "lr=1.0", "sched.warmup_steps=1", "sched.min_lr=0.1")
    got = lrs(cfg, 5)  # warm-up 0.5, then cos over steps 1..4
    assert got == pytest.approx([0.5, 1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25, 0.1])


def test_optimizer_by_name_and_xla_alias(make_cfg):
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert type(build_optimizer(make_cfg("optimizer=RMSprop"), p)).__name__ == "RMSprop"
    assert type(build_optimizer(make_cfg(), p)).__name__ == "AdamW"  # ADAMW_TORCH_XLA
    with pytest.raises(ConfigError, match="optimizer=Foo"):
        build_optimizer(make_cfg("optimizer=Foo"), p)


@pytest.mark.parametrize("name", ["AdamW", "RMSprop"])
def test_step_if_finite_keeps_or_undoes_the_update(name):
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
        return model, optimizer

    def loss_step(model, optimizer, steps, guard=None):
        for finite in steps:
            optimizer.zero_grad()
            model(torch.ones(2, 4)).pow(2).sum().backward()
            if guard is None:
                optimizer.step()
            else:
                guard(optimizer, torch.tensor(finite))

    plain, plain_opt = setup()
    loss_step(plain, plain_opt, [True, True])
    guarded, guarded_opt = setup()
    loss_step(guarded, guarded_opt, [True, True], step_if_finite)
    for a, b in zip(plain.parameters(), guarded.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # A skipped first step leaves the weights and creates zero state; a skipped later step
    # restores weights and state to what the step before left.
    skipped, skipped_opt = setup()
    start = [p.detach().clone() for p in skipped.parameters()]
    loss_step(skipped, skipped_opt, [False], step_if_finite)
    for p, p0 in zip(skipped.parameters(), start, strict=True):
        torch.testing.assert_close(p, p0, rtol=0, atol=0)
        state = skipped_opt.state[p]
        key = "exp_avg" if name == "AdamW" else "square_avg"
        assert torch.count_nonzero(state[key]) == 0
    once, once_opt = setup()
    loss_step(once, once_opt, [True])
    skipped, skipped_opt = setup()
    loss_step(skipped, skipped_opt, [True, False], step_if_finite)
    for a, b in zip(once.parameters(), skipped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key, value in once_opt.state[a].items():
            if key != "step":  # kept on the host: advances even on a skipped step
                torch.testing.assert_close(skipped_opt.state[b][key], value, rtol=0, atol=0)


def test_adamw_is_fused_for_plain_cpu_params_and_matches_unfused(make_cfg):
    cfg = make_cfg("optimizer=AdamW", "lr=0.1", "weight_decay=0.01")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    fused = build_optimizer(cfg, [a])
    plain = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for p, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            (p ** 3).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not build_optimizer(make_cfg("optimizer=RMSprop"), [a]).defaults.get("fused")
