"""Untrusted files and failed writes: safetensors only unless pickle is allowed, no NaN checkpoints, a full
disk leaves the earlier checkpoints intact, data cannot change the configuration."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from torch import nn

from tunelab.config import ModelConfig, load_config
from tunelab.data.formats import to_pairs
from tunelab.data.readers import Record
from tunelab.errors import TunelabError
from tunelab.models import load_model
from tunelab.train import checkpoint as ckpt


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=0.1)


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, tiny_model):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model, d)
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(TunelabError, match="only pickle weights .*pytorch_model.bin.*model.allow_pickle=true"):
        load_model(ModelConfig(name=str(d), device="cpu"))
    model, _ = load_model(ModelConfig(name=str(d), device="cpu", allow_pickle=True))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_no_checkpoint_with_non_finite_weights(tmp_path):
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(TunelabError, match="refusing to write checkpoint step-3: non-finite weights in weight"):
        ckpt.save_checkpoint(tmp_path / "c", 3, params, _opt(model), {"step": 3}, keep=2)
    assert ckpt.list_checkpoints(tmp_path / "c") == []


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    first = ckpt.save_checkpoint(tmp_path / "c", 1, params, _opt(model), {"step": 1}, keep=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TunelabError, match="cannot write checkpoint step-2: No space left on device"):
        ckpt.save_checkpoint(tmp_path / "c", 2, params, _opt(model), {"step": 2}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "c")] == [1]
    assert ckpt.verify(first) and ckpt.latest_valid(tmp_path / "c") == first
    assert not list((tmp_path / "c").glob(".tmp-*"))


def test_optimizer_state_is_loaded_without_pickle_code(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    path = ckpt.save_checkpoint(tmp_path / "c", 1, params, _opt(model), {"step": 1}, keep=2)
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ckpt.load_checkpoint(path)
    assert seen.get("weights_only") is True


def test_a_data_record_cannot_change_the_configuration(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: x.jsonl\n  prompt: '{q}'\n  completion: ' {a}'\ntrain:\n  lr: 0.001\n")
    cfg = load_config(recipe)
    rec = Record({"q": "{train.lr}", "a": "train.lr=5", "train.lr": 5, "__class__": "x"}, "x.jsonl:1")
    (pair,) = to_pairs([rec], cfg.data)
    assert pair.prompt == "{train.lr}" and pair.completion == " train.lr=5"  # values are text, never templates
    assert cfg.train.lr == 0.001
    assert json.loads(json.dumps(cfg.to_dict()))["train"]["lr"] == 0.001


def test_model_names_hub_ids_with_and_without_an_owner_and_misspelt_aliases(tmp_path):
    from tunelab.models import resolve_model_path

    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("gpt2") == "gpt2"  # the hub's ids from before owners: a hub id, not an alias
    for name in ("smollm2", "smollm9-1t", "SmolLM2-135M-Instruc"):
        with pytest.raises(TunelabError, match=f"unknown model alias '{name}'"):
            resolve_model_path(name)
    with pytest.raises(TunelabError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
