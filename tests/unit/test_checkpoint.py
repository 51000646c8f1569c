"""Atomic checkpoints: round trip, manifest verification, temporary directories, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tunelab.train.checkpoint import (
    MANIFEST,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    verify,
)

FILES = {"trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json", MANIFEST}


def _trained(seed: int = 0) -> tuple[nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _save(ckpt: Path, step: int, keep: int = 10, seed: int = 0) -> Path:
    model, opt = _trained(seed)
    return save_checkpoint(ckpt, step, _params(model), opt, {"step": step, "epoch": 0, "batch": step}, keep)


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip(tmp_path):
    ckpt = tmp_path / "checkpoints"
    model, opt = _trained()
    state = {"step": 1, "epoch": 0, "batch": 3, "tokens": 120}
    path = save_checkpoint(ckpt, 1, _params(model), opt, state, keep=2)
    after_save = torch.rand(5)  # the RNG state was saved just before this draw

    assert path == ckpt / "step-1"
    assert {p.name for p in path.iterdir()} == FILES
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 1 and set(manifest["files"]) == FILES - {MANIFEST}
    assert verify(path)
    assert latest_valid(ckpt) == path

    params, opt_state, rng, loaded_state = load_checkpoint(path)
    assert loaded_state == state
    assert set(params) == {"weight", "bias"}
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach())

    # the optimizer state loads into a fresh optimizer and equals the original
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(params)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    opt2.load_state_dict(opt_state)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert set(s1["state"]) == set(s2["state"]) == {0, 1}
    for k in s1["state"]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(s1["state"][k][field]), torch.as_tensor(s2["state"][k][field]))
    assert s2["state"][0]["exp_avg"].abs().sum() > 0  # one real step was taken

    # the RNG state restores the stream
    set_rng_state(rng)
    assert torch.equal(torch.rand(5), after_save)


def test_each_process_gets_its_own_generators_back(tmp_path):
    """With several processes the checkpoint keeps each one's generators; a process restores its own."""
    from tunelab.train.checkpoint import own_rng_state, rng_state

    torch.manual_seed(1)
    rank0 = own_rng_state()
    torch.rand(3)  # rank 1 has drawn more than rank 0
    rank1 = own_rng_state()
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, _params(model), opt, {}, keep=2, rng=rng_state([rank0, rank1]))
    _, _, rng, _ = load_checkpoint(path)
    for rank, own in ((0, rank0), (1, rank1)):
        torch.manual_seed(99)
        set_rng_state(rng, rank)
        expected = torch.rand(4)
        torch.set_rng_state(own["torch"])
        assert torch.equal(expected, torch.rand(4)), rank


def test_checkpoint_is_a_copy_of_the_parameters(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, _params(model), opt, {}, keep=2)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    params, *_ = load_checkpoint(path)
    assert torch.equal(params["weight"], before)


def test_no_checkpoints(tmp_path):
    assert latest_valid(tmp_path / "nothing") is None
    assert list_checkpoints(tmp_path / "nothing") == []
    assert latest_valid(tmp_path) is None


@pytest.mark.parametrize("victim", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_corrupt_byte_falls_back_to_earlier(tmp_path, victim):
    ckpt = tmp_path / "ckpt"
    first = _save(ckpt, 1)
    second = _save(ckpt, 2, seed=1)
    assert latest_valid(ckpt) == second
    _flip_byte(second / victim, offset=len((second / victim).read_bytes()) // 2)
    assert not verify(second)
    assert verify(first)
    assert latest_valid(ckpt) == first


def test_missing_or_broken_manifest_is_invalid(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _save(ckpt, 1)
    second = _save(ckpt, 2)
    (second / MANIFEST).unlink()
    assert not verify(second)
    assert latest_valid(ckpt) == first
    (first / MANIFEST).write_text("{not json")
    assert not verify(first)
    assert latest_valid(ckpt) is None


def test_manifest_listing_a_missing_file_is_invalid(tmp_path):
    path = _save(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    assert not verify(path)
    assert latest_valid(tmp_path) is None


def test_tmp_directories_are_ignored_and_cleaned(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _save(ckpt, 1)
    other_pid = os.getpid() + 1
    stale = ckpt / f".tmp-step-7-{other_pid}"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    (ckpt / "step-9").write_text("a file, not a directory")
    assert [s for s, _ in list_checkpoints(ckpt)] == [1]
    assert latest_valid(ckpt) == first
    _save(ckpt, 2)
    assert not stale.exists()  # a later save removes another process's leftovers
    assert latest_valid(ckpt) == ckpt / "step-2"


def test_keep_prunes_to_k(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3, 4, 5):
        _save(ckpt, step, keep=2)
    assert [s for s, _ in list_checkpoints(ckpt)] == [4, 5]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-4", "step-5"]  # no temporary directories left


def test_keep_orders_steps_numerically(tmp_path):
    for step in (9, 10, 100):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 100]
    assert latest_valid(tmp_path) == tmp_path / "step-100"


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 3, seed=0)
    path = _save(tmp_path, 3, seed=1)
    params, *_ = load_checkpoint(path)
    model, _ = _trained(seed=1)
    assert torch.equal(params["weight"], model.weight.detach())
    assert verify(path)
