"""The multi-slice SPMD mesh (parallel.num_slices) without torch_xla: which device lands on
which axis, from the runtime's device attributes, and what each axis splits."""

import random
from types import SimpleNamespace

import pytest
import torch

from moedpo.config import ConfigError
from moedpo.parallel.spmd import data_axes, partition_spec, slice_order, weight_axes


def tpu_attributes(slices: int, per_slice: int, seed: int = 0) -> list[dict]:
    """Device attributes as a TPU runtime reports them (slice_index, coords, core_on_chip),
    the device ids shuffled across slices as a real job may number them."""
    devices = [{"slice_index": s, "coords": [i % 2, i // 2, 0], "core_on_chip": 0}
               for s in range(slices) for i in range(per_slice)]
    random.Random(seed).shuffle(devices)
    return devices


def test_devices_are_grouped_by_slice_and_ordered_by_coordinates():
    attributes = tpu_attributes(2, 4)
    ids = slice_order(attributes, None)  # the slice count read from the runtime
    assert ids.shape == (2, 4)
    for s, row in enumerate(ids):
        assert {attributes[i]["slice_index"] for i in row} == {s}  # one slice per row
        coords = [tuple(attributes[i]["coords"]) for i in row]
        assert coords == sorted(coords)  # neighbours on the ICI next to each other
    assert sorted(ids.reshape(-1).tolist()) == list(range(8))  # every device once
    assert slice_order(attributes, 2).tolist() == ids.tolist()


def test_devices_without_slices_split_in_id_order_when_forced():
    """Virtual CPU devices (and one-slice TPUs) report no slice: one slice, or as many
    groups of consecutive ids as parallel.num_slices asks for (what the tests force)."""
    cpu = [{"name": f"CPU:{i}"} for i in range(4)]
    assert slice_order(cpu, None).tolist() == [[0, 1, 2, 3]]
    assert slice_order(cpu, 2).tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("attributes, slices, message", [
    (tpu_attributes(2, 4), 4, "the runtime reports 2 slices; set it to 2 or null"),
    ([{"name": f"CPU:{i}"} for i in range(4)], 3, "num_slices=3 must divide the 4 XLA"),
])
def test_a_slice_count_the_devices_cannot_have_is_refused(attributes, slices, message):
    with pytest.raises(ConfigError, match=message):
        slice_order(attributes, slices)


@pytest.mark.parametrize("axes", [("data", "fsdp", "tensor"), ("data", "fsdp", "expert", "tensor")])
def test_weights_shard_inside_a_slice_and_the_batch_over_every_axis(axes):
    """Across slices a weight is replicated (no spec names "data"); the batch is split over
    "data" first, then inside the slice as before."""
    mesh = SimpleNamespace(axis_names=axes)
    inner = ("fsdp", "expert") if "expert" in axes else "fsdp"
    assert weight_axes(mesh) == inner
    assert data_axes(mesh) == ("data", *((inner,) if isinstance(inner, str) else inner))
    weights = {"model.embed_tokens.weight": torch.empty(64, 16),
               "model.layers.0.self_attn.q_proj.weight": torch.empty(16, 16),
               "model.layers.0.mlp.experts.gate_up_proj": torch.empty(8, 32, 16),
               "lm_head.weight": torch.empty(64, 16), "model.x.weight": torch.empty(4, 40)}
    specs = [partition_spec(name, w, mesh) for name, w in weights.items()]
    flat = [a for spec in specs for axis in spec
            for a in (axis if isinstance(axis, tuple) else (axis,))]
    assert "data" not in flat and inner in [axis for spec in specs for axis in spec]
    one_slice = SimpleNamespace(axis_names=axes[1:])
    assert specs == [partition_spec(n, w, one_slice) for n, w in weights.items()]
