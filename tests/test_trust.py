"""Checkpoints are code (DCP's .metadata is a pickle): moedpo reads one for training only if
it signed it under this machine's key, or its folder is trusted."""

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moedpo import trust
from moedpo.checkpoint import Checkpointer, restore_weights, save_weights


@pytest.fixture(autouse=True)
def own_key(monkeypatch, tmp_path):
    monkeypatch.delenv(trust.KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_signed_weights_load_and_foreign_ones_need_trust(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_weights(model, str(tmp_path / "ours"))
    assert (tmp_path / "ours" / trust.MANIFEST).exists()
    restore_weights(str(tmp_path / "ours"), [torch.nn.Linear(3, 2)], trusted=[])
    # Written by something else (no manifest): refused before its pickle is read...
    dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(
        str(tmp_path / "downloaded")))
    with pytest.raises(trust.UntrustedCheckpoint, match=r"downloaded: not read, it has no "
                                                        r"readable moedpo-manifest.json"):
        restore_weights(str(tmp_path / "downloaded"), [torch.nn.Linear(3, 2)], trusted=[])
    # ...unless the user says it is trusted.
    restore_weights(str(tmp_path / "downloaded"), [torch.nn.Linear(3, 2)],
                    trusted=[str(tmp_path / "downloaded")])


def test_a_manifest_made_with_another_key_or_a_changed_pickle_fails(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    monkeypatch.setenv(trust.KEY_ENV, "someone else's key")
    save_weights(model, str(tmp_path / "theirs"))
    monkeypatch.delenv(trust.KEY_ENV)
    with pytest.raises(trust.UntrustedCheckpoint, match="does not verify"):
        trust.check(str(tmp_path / "theirs"), [], "checkpoint_manager_path")
    save_weights(model, str(tmp_path / "ours"))
    metadata = tmp_path / "ours" / ".metadata"
    metadata.write_bytes(metadata.read_bytes() + b"\x00")  # swapped after signing
    with pytest.raises(trust.UntrustedCheckpoint, match="does not verify"):
        trust.check(str(tmp_path / "ours"), [], "checkpoint_manager_path")


def test_resume_reads_own_and_signed_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    own = Checkpointer(str(tmp_path / "run" / "checkpoints"), trusted=[])
    path = own.save(1, model, optimizer, {"step": 1})
    own.load(path, model, optimizer)  # the run's own folder
    other = Checkpointer(str(tmp_path / "another-run"), trusted=[])
    other.load(path, model, optimizer)  # signed by this key: fine from anywhere
    (tmp_path / "run" / "checkpoints" / "step_00000001" / trust.MANIFEST).unlink()
    with pytest.raises(trust.UntrustedCheckpoint, match=r"resume=.*step_00000001: not read"):
        other.load(path, model, optimizer)
    own.load(path, model, optimizer)  # its own folder stays trusted (older checkpoints)
