"""Mixed precision with a frozen base: storing the frozen linear weights in bfloat16 (frozen_linears_to) gives
the same loss and the same LoRA gradients as letting autocast cast them at every forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from tunelab.config import LoraConfig, TrainConfig
from tunelab.data.batching import collate
from tunelab.data.formats import Example, mask_prompt
from tunelab.train.forward import causal_lm_loss_sum
from tunelab.train.precision import frozen_linears_to
from tunelab.train.trainable import apply_mode


def _model(path, mode):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return apply_mode(lm, TrainConfig(mode=mode), LoraConfig(r=4, alpha=8, targets=["all-linear"]))


def _batch(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    exs = []
    for n in ["emma", "olivia", "ava", "isabella", "sophia"]:
        ids, labels = mask_prompt(tok(f"Reverse the name: {n}. Answer:")["input_ids"],
                                  tok(" " + n[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        exs.append(Example(ids, labels, "", "", "test"))
    return collate(exs, tok.pad_token_id)


def _loss_and_grads(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("tie", [True, False])
def test_frozen_linears_in_bfloat16_change_no_number(tmp_path, tie):
    path = build_tiny_model(tmp_path / "m", tie=tie)
    model, batch = _model(path, "lora"), _batch(path)
    # a LoRA B of zeros gives A no gradient: start B away from zero
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    loss_a, grads_a = _loss_and_grads(model, batch)
    n = frozen_linears_to(model, torch.bfloat16)
    loss_b, grads_b = _loss_and_grads(model, batch)
    assert n == 2 * 7 + (0 if tie else 1)  # q k v o gate up down in each layer, and an untied head
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k
    embed = model.get_input_embeddings().weight
    assert embed.dtype == torch.float32  # a tied head shares it: left as it is
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the master weights


def test_trainable_weights_are_never_cast(tmp_path):
    model = _model(build_tiny_model(tmp_path / "m"), "full")
    assert frozen_linears_to(model, torch.bfloat16) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
