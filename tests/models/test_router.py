import copy
import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moedpo.models.moe import capacity, kept_slots
from moedpo.models.router import router_losses


def test_one_layer_aux_loss_equals_hugging_face_with_padding():
    torch.manual_seed(0)
    logits = torch.randn(2 * 6, 8)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ours = router_losses((logits,), mask, top_k=2)
    hf = load_balancing_loss_func((logits,), num_experts=8, top_k=2, attention_mask=mask)
    assert ours.aux_loss.item() == pytest.approx(hf.item(), rel=1e-6)
    assert ours.real_tokens == 10
    assert ours.expert_counts.sum().item() == 10 * 2  # pads are not counted


def test_aux_loss_is_mean_of_per_layer_losses():
    torch.manual_seed(1)
    layers = (torch.randn(5, 4), torch.randn(5, 4) * 3)
    mask = torch.ones(1, 5)
    per_layer = [router_losses((lg,), mask, top_k=1).aux_loss for lg in layers]
    assert router_losses(layers, mask, 1).aux_loss.item() == pytest.approx(
        float(sum(per_layer) / 2))


def test_balanced_router_has_aux_loss_k():
    # Uniform probabilities: P_e = 1/E, and with assignments spread evenly f_e = k/E.
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 1e-4  # tiny nudge spreads the top-1 choice
    out = router_losses((logits,), torch.ones(1, 8), top_k=1)
    assert out.aux_loss.item() == pytest.approx(1.0, rel=1e-3)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    out = router_losses((logits,), torch.tensor([[1, 1, 0]]), top_k=1)
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2  # the pad row (5, 5) is ignored
    assert out.z_loss.item() == pytest.approx(expected)


def test_drop_statistics_follow_kept_slots():
    torch.manual_seed(2)
    logits = torch.randn(3 * 10, 8)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 7:] = 0
    out = router_losses((logits,), mask, top_k=2, capacity_factor=1.0)
    top = logits.softmax(-1).topk(2).indices.view(3, 10, 2)
    kept = kept_slots(top, 8, capacity(10, 2, 8, 1.0), mask.bool())
    real = mask.bool()[..., None].expand_as(kept)
    assert out.dropped_slots == (~kept & real).sum().item() > 0
    assert out.fully_dropped_tokens == (~kept.any(-1) & mask.bool()).sum().item()
    assert router_losses((logits,), mask, 2, capacity_factor=4.0).dropped_slots == 0


def test_recorded_router_logits_are_transformers_own():
    from moedpo.config import ModelConfig
    from moedpo.models.load import build_models
    from moedpo.models.router import record_router_logits

    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                         policy_dtype="float32", logps_chunk_size=0), seed=0)
    ids = torch.randint(0, 500, (2, 9))
    with record_router_logits(policy) as recorded:
        out = policy(input_ids=ids, output_router_logits=True)
    assert len(recorded.logits) == len(out.router_logits) == policy.config.num_hidden_layers
    for mine, theirs in zip(recorded.logits, out.router_logits, strict=True):
        assert torch.equal(mine, theirs)
    policy(input_ids=ids)  # nothing is recorded outside the block
    assert len(recorded.logits) == policy.config.num_hidden_layers
    twin = copy.deepcopy(policy)  # records into its own list, not the original's
    other = torch.randint(0, 500, (2, 5))
    with record_router_logits(policy) as again, record_router_logits(twin) as copied:
        twin(input_ids=other)
    assert again.logits == [] and len(copied.logits) == policy.config.num_hidden_layers
    assert copied.logits[0].shape[0] == other.numel()


def test_statistics_count_the_routers_own_choice_deepseek_v3():
    """DeepSeek-V3 routes by sigmoid scores plus a correction bias, within the best groups:
    not the softmax top-k of its logits. Counts and drops follow what it chose."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from moedpo.models.router import record_router_logits

    config = DeepseekV3Config(vocab_size=512, hidden_size=32, intermediate_size=64,
                              moe_intermediate_size=16, num_hidden_layers=2,
                              first_k_dense_replace=0, num_attention_heads=4,
                              num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                              n_group=2, topk_group=1, kv_lora_rank=8, q_lora_rank=8,
                              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).eval()
    for module in model.modules():
        if type(module).__name__ == "DeepseekV3TopkRouter":
            torch.nn.init.normal_(module.weight, std=0.5)
            module.e_score_correction_bias.copy_(torch.linspace(1.0, -1.0, 8))
    chosen = []  # what each router returned, seen by a hook of the test's own
    for module in model.modules():
        if type(module).__name__ == "DeepseekV3TopkRouter":
            module.register_forward_hook(lambda m, i, out: chosen.append(out[2]))
    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad(), record_router_logits(model) as record:
        model(input_ids=ids)
    expected = torch.stack([torch.bincount(c.reshape(-1), minlength=8).float() for c in chosen])
    out = router_losses(record.logits, mask, 2, choices=record.choices)
    torch.testing.assert_close(out.expert_counts, expected)
    softmax_pick = router_losses(record.logits, mask, 2).expert_counts
    assert not torch.equal(softmax_pick, expected)  # the old statistics counted other experts


# Slow tier: a training run; the trained LoRA router copy (test_lora.py) stays in the fast tier.
@pytest.mark.slow
def test_freeze_router_leaves_routers_bit_identical_and_without_optimizer_state(make_cfg):
    """model.freeze_router=true: after training every router weight is exactly the starting
    one and has no optimizer state, while the experts and attention moved; unfrozen, the
    routers move too."""
    import torch.distributed.checkpoint as dcp

    from conftest import tiny_train_overrides
    from moedpo.models.load import build_models
    from moedpo.models.router import router_modules
    from moedpo.trainer import run

    common = [*tiny_train_overrides(), "dry_run=false", "max_steps=2"]
    frozen_cfg = make_cfg(*common, "model.freeze_router=true", "exp_name=frozen")
    frozen = run(frozen_cfg).policy
    free = run(make_cfg(*common, "exp_name=free")).policy
    start, _ = build_models(frozen_cfg.model, frozen_cfg.seed, with_reference=False)
    names = {n for n, _ in start.named_parameters()}
    routers = {f"{prefix}.{n}" for prefix, m in start.named_modules() if m in router_modules(start)
               for n, _ in m.named_parameters()}
    assert routers and routers < names
    before = dict(start.named_parameters())
    after = dict(frozen.named_parameters())
    moved = dict(free.named_parameters())
    for name in names:
        same = torch.equal(after[name], before[name])
        assert same == (name in routers), name  # frozen routers equal; everything else moved
        if name in routers:
            assert not torch.equal(moved[name], before[name]), name  # they train otherwise
    (step,) = sorted((frozen_cfg.run_dir / "checkpoints").glob("step_*"))[-1:]
    saved = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    optim = [k for k in saved if k.startswith("optim.state.")]
    assert optim and not any(r in k for r in routers for k in optim)


def test_sequence_scope_is_the_mean_over_sequences_of_each_ones_loss():
    torch.manual_seed(5)
    logits = torch.randn(3 * 6, 8)
    mask = torch.tensor([[1] * 6, [0, 0] + [1] * 4, [1] * 5 + [0]])
    members = torch.zeros(3, 3, 6, dtype=torch.bool)
    for row in range(3):
        members[row, row] = mask[row].bool()
    scoped = router_losses((logits,), mask, top_k=2, sequences=members.reshape(3, -1))
    each = [router_losses((logits.view(3, 6, 8)[row],), mask[row:row + 1], top_k=2).aux_loss
            for row in range(3)]
    assert scoped.aux_loss.item() == pytest.approx(float(sum(each) / 3), rel=1e-6)
    whole = router_losses((logits,), mask, top_k=2).aux_loss
    assert abs(scoped.aux_loss.item() - whole.item()) > 1e-3  # another loss than the batch's


def test_global_scope_pools_ranks_to_the_one_process_loss_and_gradient():
    """Two ranks' halves of a micro-batch: the value each reports is the whole batch's
    loss, and the mean of their gradients (FSDP's reduce) is the whole batch's gradient."""
    torch.manual_seed(6)
    logits = torch.randn(4 * 5, 8, dtype=torch.double)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]])
    whole = logits.clone().requires_grad_()
    one = router_losses((whole,), mask, top_k=2).aux_loss
    (want,) = torch.autograd.grad(one, whole)

    def flat_of(half):  # what a rank puts into the all-reduce
        seen = {}

        def keep(x):
            seen["flat"] = x
            return x
        router_losses((logits[half * 10:(half + 1) * 10],), mask[half * 2:(half + 1) * 2],
                      top_k=2, pool=keep)
        return seen["flat"].detach()

    grads = []
    for half in (0, 1):
        mine = logits[half * 10:(half + 1) * 10].clone().requires_grad_()
        other = flat_of(1 - half)
        out = router_losses((mine,), mask[half * 2:(half + 1) * 2], top_k=2,
                            pool=lambda x, other=other: x + other)
        assert out.aux_loss.item() == pytest.approx(one.item(), rel=1e-12)
        (grad,) = torch.autograd.grad(out.aux_loss, mine)
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads) / 2, want)


def test_global_scope_over_accumulation_is_the_whole_steps_loss_and_gradient():
    """2 ranks x 2 accumulated micro-batches, each part given the step's summed statistics
    (`global_routing`): each reports the whole step's loss, and its gradients, divided by
    the accumulation and averaged over ranks as the trainer does, are the whole step's."""
    torch.manual_seed(7)
    logits = torch.randn(8 * 4, 6, dtype=torch.double)
    mask = torch.tensor([[1] * 4, [1] * 2 + [0] * 2, [1] * 4, [1] * 3 + [0]] * 2)
    whole = logits.clone().requires_grad_()
    one = router_losses((whole,), mask, top_k=2).aux_loss
    (want,) = torch.autograd.grad(one, whole)

    def part(q):
        return logits[q * 8:(q + 1) * 8], mask[q * 2:(q + 1) * 2]

    parts = []
    for q in range(4):  # the pre-pass: every part's statistics, summed
        router_losses((part(q)[0],), part(q)[1], top_k=2,
                      pool=lambda x: parts.append(x.detach()) or x)
    totals = torch.stack(parts).sum(0)
    assert totals[-1] == 4  # the number of parts
    grads = []
    for q in range(4):
        mine = part(q)[0].clone().requires_grad_()
        out = router_losses((mine,), part(q)[1], top_k=2, pool=lambda _x: totals)
        assert out.aux_loss.item() == pytest.approx(one.item(), rel=1e-6)  # float32 inside
        (grad,) = torch.autograd.grad(out.aux_loss / 2, mine)  # accumulation 2
        grads.append(grad)
    torch.testing.assert_close(torch.cat(grads) / 2, want)  # FSDP's mean over 2 ranks
    alone = router_losses((part(0)[0],), part(0)[1], top_k=2).aux_loss
    assert abs(alone.item() - one.item()) > 1e-3  # a micro-batch's own loss is another


def test_sigmoid_routers_balance_their_normalised_sigmoid_scores():
    """DeepSeek-V3's router scores experts by sigmoid: its P_e is the mean of the sigmoid
    normalised over experts (its paper's balance loss), its choices the router's own (with
    the correction bias and groups); Mixtral's P_e stays the softmax."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import TINY_DEEPSEEK
    from moedpo.models.router import record_router_logits

    fields = dict(TINY_DEEPSEEK)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 512, (2, 7))
    mask = torch.ones_like(ids)
    with record_router_logits(model) as record:
        model(input_ids=ids, attention_mask=mask)
    assert record.scores == ["sigmoid", "sigmoid"]
    assert all(c is not None for c in record.choices)
    out = router_losses(record.logits, mask, 2, choices=record.choices, scores=record.scores)
    expected = []
    for logits, chosen in zip(record.logits, record.choices, strict=True):
        s = logits.double().sigmoid()
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.bincount(chosen.reshape(-1), minlength=8).double() / 14
        expected.append(8 * float((f * p).sum()))
    assert out.aux_loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    softmax = router_losses(record.logits, mask, 2, choices=record.choices)
    assert abs(softmax.aux_loss.item() - out.aux_loss.item()) > 1e-4

    from moedpo.config import ModelConfig
    from moedpo.models.load import build_models

    mixtral, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                          policy_dtype="float32"), with_reference=False)
    with record_router_logits(mixtral) as record:
        mixtral(input_ids=ids, attention_mask=mask)
    assert set(record.scores) == {"softmax"}
