"""LoRA on GPT-2-style models, whose linear layers are transformers' Conv1D (c_attn, c_proj, c_fc; weight
stored (in, out)): targets by name and all-linear adapt them as PEFT does, the rank check reads their true
in/out, a target that matches nothing lists what can be adapted, and the fast loss paths hold on GPT-2
(absolute position embeddings, no pad token)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import build_tiny_gpt2

from tunelab.config import LoraConfig, TrainConfig
from tunelab.data.batching import collate
from tunelab.data.formats import Example, mask_prompt
from tunelab.errors import TunelabError
from tunelab.train.forward import causal_lm_loss_sum, packed_loss_sum, shared_prefix_len
from tunelab.train.objectives import masked_ce_sum
from tunelab.train.trainable import apply_mode, linear_module_names, set_dropout, targeted_shapes

# the tiny GPT-2: n_embd 32, 2 blocks; (in, out) of each Conv1D layer
SHAPES = {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32), "mlp.c_fc": (32, 128), "mlp.c_proj": (128, 32)}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "m")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _lora(model, **lora):
    """(the PEFT model, the full names of the modules it adapted), on a copy of ``model``."""
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*fan_in_fan_out")  # PEFT correcting the layout it was given
        m = apply_mode(copy.deepcopy(model), TrainConfig(mode="lora"), LoraConfig(**lora))
    adapted = {n.removeprefix("base_model.model.") for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}
    return m, adapted


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _names(*parts: str, blocks=(0, 1)) -> set[str]:
    return {f"transformer.h.{i}.{p}" for i in blocks for p in parts}


@pytest.mark.parametrize(("targets", "parts", "n_trainable"), [
    (["c_attn"], ["attn.c_attn"], 2 * 4 * (32 + 96)),
    (["c_attn", "c_proj"], ["attn.c_attn", "attn.c_proj", "mlp.c_proj"],
     2 * 4 * ((32 + 96) + (32 + 32) + (128 + 32))),
    (["attn.c_proj"], ["attn.c_proj"], 2 * 4 * (32 + 32)),  # a dotted suffix, as PEFT matches it
])
def test_named_targets_adapt_exactly_those_conv1d_modules(gpt2, targets, parts, n_trainable):
    from transformers.pytorch_utils import Conv1D

    m, adapted = _lora(gpt2[0], r=4, targets=targets)
    assert adapted == _names(*parts)
    assert all(isinstance(m.get_submodule(f"base_model.model.{n}").base_layer, Conv1D) for n in adapted)
    assert _trainable(m) == n_trainable  # r·(in + out) per adapted layer: A is (r, in), B is (out, r)
    assert targeted_shapes(gpt2[0], LoraConfig(targets=targets)) == {
        f"transformer.h.{i}.{p}": SHAPES[p] for i in (0, 1) for p in parts}


def test_all_linear_covers_every_conv1d_but_not_the_head(gpt2):
    model = gpt2[0]
    assert linear_module_names(model) == ["c_attn", "c_fc", "c_proj"]
    m, adapted = _lora(model, r=2, targets=["all-linear"])
    assert adapted == _names(*SHAPES)  # c_attn, both c_proj, c_fc; not lm_head
    assert _trainable(m) == 2 * 2 * sum(i + o for i, o in SHAPES.values())
    assert targeted_shapes(model, LoraConfig(targets=["all-linear"])) == {
        f"transformer.h.{i}.{p}": s for i in (0, 1) for p, s in SHAPES.items()}


def test_rank_check_uses_conv1d_in_and_out(gpt2):
    model = gpt2[0]
    _lora(model, r=32, targets=["c_fc"])  # c_fc: 32 in, 128 out; rank up to 32
    with pytest.raises(TunelabError) as e:
        _lora(model, r=33, targets=["c_fc"])
    assert e.value.where == "lora.r"
    assert "rank 33 is more than the layer transformer.h.0.mlp.c_fc (32 in, 128 out)" in str(e.value)


def test_a_target_that_matches_nothing_lists_the_adaptable_modules(gpt2):
    model = gpt2[0]
    with pytest.raises(TunelabError) as e:
        _lora(model, targets=["c_atn"])
    assert e.value.where == "lora.targets"
    assert str(e.value) == ("lora.targets: 'c_atn' matches no module of this model (modules LoRA can adapt: "
                            "c_attn, c_fc, c_proj, wpe, wte; or all-linear)")


@pytest.mark.parametrize(("target", "says"), [
    ("ln_1", "'ln_1' names LayerNorm modules (transformer.h.0.ln_1, ...), which LoRA cannot adapt"),
    ("attn", "'attn' names GPT2Attention modules (transformer.h.0.attn, ...), which LoRA cannot adapt"),
    ("lm_head", "'lm_head' is the output head, which tunelab's LoRA leaves out: train.mode=head trains it"),
])
def test_a_target_lora_cannot_adapt_says_why(gpt2, target, says):
    with pytest.raises(TunelabError) as e:
        _lora(gpt2[0], targets=[target])
    assert e.value.where == "lora.targets"
    assert says in str(e.value) and "c_attn, c_fc, c_proj" in str(e.value)


def test_an_embedding_is_a_target_too(gpt2):
    m, adapted = _lora(gpt2[0], r=4, targets=["wpe"])  # PEFT's LoRA adapts nn.Embedding
    assert adapted == {"transformer.wpe"}
    assert _trainable(m) == 4 * (128 + 32)  # A (r, positions), B (width, r)
    assert targeted_shapes(gpt2[0], LoraConfig(targets=["wpe"])) == {"transformer.wpe": (128, 32)}


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], ["all-linear"]])
def test_layers_pick_only_their_blocks(gpt2, targets):
    parts = ["attn.c_attn", "attn.c_proj", "mlp.c_proj"] if targets != ["all-linear"] else list(SHAPES)
    m, adapted = _lora(gpt2[0], r=4, targets=targets, layers=[1])
    assert adapted == _names(*parts, blocks=(1,))
    assert set(targeted_shapes(gpt2[0], LoraConfig(targets=targets, layers=[1]))) == adapted
    assert _trainable(m) == 4 * sum(sum(SHAPES[p]) for p in parts)
    with pytest.raises(TunelabError, match=r"lora.layers: layers \[2\] out of range: the model has 2"):
        _lora(gpt2[0], targets=targets, layers=[2])


def _batch(tok, names):
    exs = []
    for n in names:
        ids, labels = mask_prompt(tok(f"Reverse the name: {n}. Answer:")["input_ids"],
                                  tok(" " + n[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        exs.append(Example(ids, labels, n, n[::-1], "test"))
    return collate(exs, tok.eos_token_id)  # GPT-2 has no pad token: tunelab pads with end-of-text


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_loss_paths_equal_the_plain_loss_on_gpt2(gpt2, attn):
    """On GPT-2 (absolute positions, padding with end-of-text) each fast path gives the plain loss and
    gradients: the shared prefix in packed rows with a block mask (fast), as a KV cache with position ids
    continuing it (no-regroup), length groups (no-prefix), whole examples packed (packed)."""
    model, tok = gpt2
    m, _ = _lora(model, r=4, targets=["c_attn", "c_proj"])
    for layer in m.modules():  # non-zero B: the adapters change the output and carry gradient to A
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    set_dropout(m, 0.0)  # GPT-2's own is 0.1, under which the prefix is not shared
    m.config._attn_implementation = attn
    m.train()
    batch = _batch(tok, ["emma", "olivia", "ava", "isabella", "sophia", "jo", "christopher", "ella"])
    batch["weight"] = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 1.5, 1.0])
    assert shared_prefix_len(batch["input_ids"], batch["attention_mask"]) >= 2
    results = []
    for how in ("plain", "fast", "no-regroup", "no-prefix", "packed"):
        m.zero_grad()
        if how == "plain":
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = masked_ce_sum(logits, batch["labels"], batch["weight"])
        elif how == "packed":
            loss, n = packed_loss_sum(m, batch, chunk=7, capacity=40)
        else:
            loss, n = causal_lm_loss_sum(m, batch, chunk=7, share_prefix=how != "no-prefix",
                                         regroup=how != "no-regroup")
        loss.backward()
        results.append((how, float(loss.detach()), n, {k: p.grad.clone() for k, p in m.named_parameters()
                                              if p.grad is not None}))
    _, l0, n0, g0 = results[0]
    assert g0 and all(".lora_" in k for k in g0)
    for how, loss, n, g in results[1:]:
        assert n == n0 and abs(loss - l0) < 1e-5 * abs(l0), how
        assert g.keys() == g0.keys() and all(torch.allclose(g[k], g0[k], atol=1e-5, rtol=1e-4) for k in g0), how
