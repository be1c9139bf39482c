import pytest
import torch

from moedpo.config import ConfigError
from moedpo.optim import build_optimizer, build_scheduler


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
