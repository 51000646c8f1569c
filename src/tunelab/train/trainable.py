"""Choosing what trains: full | lora | head | freeze, and saving what was trained.

- full: every parameter.
- lora: PEFT LoRA adapters, W = W0 + (alpha/r)·B·A, on ``lora.targets``: module names as PEFT matches them
  (default q_proj, v_proj; GPT-2's Conv1D layers c_attn, c_proj, c_fc; embeddings, convolutions), or
  ``all-linear`` for every nn.Linear and Conv1D but the output head. Saved in PEFT's own format.
- head: only the output head. When the head is tied to the input embeddings (SmolLM2, Llama-3.2 ...)
  it is untied first: the head gets its own copy and trains, the input embeddings stay frozen, and the
  saved model says ``tie_word_embeddings: false``.
- freeze: only parameters whose names match ``train.trainable`` (fnmatch patterns, e.g.
  ``model.layers.29.*``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..config import LoraConfig, TrainConfig
from ..errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("tunelab")


def set_dropout(model: nn.Module, p: float) -> None:
    """Override every dropout probability in the model (modules, attention dropout, config)."""
    for key, value in list(vars(model.config).items()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(model.config, key, p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)


def _lora_shape(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) of the update B·A that PEFT's LoRA gives a module of this type, or None for a type it cannot
    adapt (the types of peft.tuners.lora.layer.dispatch_default)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):  # GPT-2's c_attn, c_proj, c_fc: y = x·W + b, W stored (in, out)
        n_in, n_out = m.weight.shape
        return n_in, n_out
    if isinstance(m, nn.Embedding):  # A (r, num_embeddings), B (embedding_dim, r)
        return m.num_embeddings, m.embedding_dim
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # A: a conv of the layer's kernel onto r channels
        return m.in_channels * math.prod(m.kernel_size), m.out_channels
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    return None


def _is_linear(m: nn.Module) -> bool:
    """What PEFT's all-linear takes: nn.Linear and transformers' Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a listed target: the module's full name or its last dotted parts (c_proj, attn.c_proj)."""
    return name == target or name.endswith("." + target)


def _layer_index(name: str) -> int | None:
    index = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # PEFT's default layers pattern
    return None if index is None else int(index["idx"])


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Last name parts of the layers all-linear adapts: every nn.Linear and Conv1D but the output head."""
    out_emb = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m) and m is not out_emb})


def lora_module_names(model: PreTrainedModel) -> list[str]:
    """Last name parts of the modules LoRA can adapt by name (linear, Conv1D, embeddings, convolutions ...),
    but the output head."""
    out_emb = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if name and m is not out_emb and _lora_shape(m) is not None})


def _targeted(model: PreTrainedModel, lora: LoraConfig) -> dict[str, nn.Module]:
    out_emb = model.get_output_embeddings()
    every = lora.targets == ["all-linear"]
    found = {}
    for name, m in model.named_modules():
        if not name or m is out_emb or _lora_shape(m) is None:
            continue
        if not (_is_linear(m) if every else any(_matches(name, t) for t in lora.targets)):
            continue
        if lora.layers is not None and _layer_index(name) not in lora.layers:
            continue
        found[name] = m
    return found


def targeted_shapes(model: PreTrainedModel, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of each module LoRA adapts, matched as PEFT matches them: by the name's last parts
    (all-linear: every nn.Linear and Conv1D but the output head), then the layer index."""
    return {name: cast("tuple[int, int]", _lora_shape(m)) for name, m in _targeted(model, lora).items()}


def check_lora_rank(r: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a rank above what the adapted layers can hold: on a layer of ``in`` inputs and ``out`` outputs
    the update B·A is (out, r)·(r, in), of rank at most min(in, out), so a larger r only adds parameters (and
    a checkpoint that grows with r)."""
    if not shapes:
        return
    name, (n_in, n_out) = min(shapes.items(), key=lambda item: min(item[1]))
    limit = min(n_in, n_out)
    if r > limit:
        raise TunelabError(f"rank {r} is more than the layer {name} ({n_in} in, {n_out} out) can use: its update "
                           f"has rank at most {limit}, and a larger rank only adds parameters; set lora.r to "
                           f"{limit} or less", "lora.r")


def check_lora_targets(model: PreTrainedModel, targets: list[str]) -> None:
    """Each named target matches some module, none of them the output head, all of types LoRA adapts; an error
    lists the modules it could name."""
    out_emb = model.get_output_embeddings()
    choices = f"modules LoRA can adapt: {', '.join(lora_module_names(model))}; or all-linear"
    for t in targets:
        hits = [(name, m) for name, m in model.named_modules() if name and _matches(name, t)]
        if not hits:
            raise TunelabError(f"{t!r} matches no module of this model ({choices})", "lora.targets")
        if any(m is out_emb for _, m in hits):
            raise TunelabError(f"{t!r} is the output head, which tunelab's LoRA leaves out: train.mode=head "
                               f"trains it ({choices})", "lora.targets")
        bad = [(name, m) for name, m in hits if _lora_shape(m) is None]
        if bad:
            kind = type(bad[0][1]).__name__
            what = f"a {kind}" if len(bad) == 1 else f"{kind} modules"
            where = bad[0][0] + (", ..." if len(bad) > 1 else "")
            raise TunelabError(f"{t!r} names {what} ({where}), which LoRA cannot adapt ({choices})", "lora.targets")


def _apply_lora(model: PreTrainedModel, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    every = lora.targets == ["all-linear"]
    if not every:
        check_lora_targets(model, lora.targets)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if lora.layers is not None and n_layers is not None:
        bad = [i for i in lora.layers if not 0 <= i < n_layers]
        if bad:
            raise TunelabError(f"layers {bad} out of range: the model has {n_layers}", "lora.layers")
    targeted = _targeted(model, lora)
    check_lora_rank(lora.r, targeted_shapes(model, lora))  # before PEFT allocates r × in and out × r per layer
    targets: str | list[str] = list(lora.targets)
    layers = lora.layers
    if every and layers is None:
        targets = "all-linear"
    elif every:  # PEFT takes layers_to_transform only with listed names: all-linear's, cut to the layers here
        targets, layers = sorted(targeted), None
    try:
        # (PEFT annotates lora_alpha as int; it takes any number: the scaling is alpha / r. fan_in_fan_out: the
        # (in, out) layout of Conv1D's weight, which PEFT would otherwise set itself, with a warning)
        cfg = PeftLoraConfig(r=lora.r, lora_alpha=cast(int, lora.alpha), lora_dropout=lora.dropout,
                             target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM",
                             fan_in_fan_out=any(isinstance(m, Conv1D) for m in targeted.values()))
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise TunelabError(f"PEFT refused the adapter: {e}", "lora.targets") from None


def _untie_head(model: PreTrainedModel) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None:
        raise TunelabError("this model has no output head to train", "train.mode")
    tied = emb is not None and head.weight is emb.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        return True
    return False


def apply_mode(model: PreTrainedModel, train: TrainConfig, lora: LoraConfig) -> nn.Module:
    """Returns the model to train (a PeftModel for lora) with requires_grad set."""
    mode = train.mode
    if mode == "lora":
        model = _apply_lora(model, lora)
    elif mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "head":
        untied = _untie_head(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_output_embeddings().parameters():
            p.requires_grad_(True)
        if untied:
            log.info("head mode: the output head was tied to the input embeddings; it now has its own "
                     "copy that trains, and the input embeddings stay frozen")
    elif mode == "freeze":
        names = [n for n, _ in model.named_parameters()]
        for pat in train.trainable:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise TunelabError(f"pattern {pat!r} matches no parameter (e.g. {names[0]}, {names[-1]})",
                                   "train.trainable")
        for n, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(n, pat) for pat in train.trainable))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (what a checkpoint must hold), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model: Any, mode: str, out_dir, tokenizer) -> None:
    """LoRA: the PEFT adapter (adapter_config.json + adapter_model.safetensors). Otherwise: a full HF
    model directory. A classifier adds its head (safetensors + label names) and, trained head-only, is
    nothing but its head. The tokenizer goes beside any of them. (``model``: a PeftModel, a transformers
    model or a SequenceClassifier, whose saving methods nn.Module's types do not know.)"""
    if hasattr(model, "save_head"):
        model.save_head(out_dir)
        if mode != "head":
            model.lm.save_pretrained(out_dir, safe_serialization=True)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def make_classifier(lm: PreTrainedModel, cfg, labels: list[str] | None) -> nn.Module:
    """LM + K-way head; what trains: the head alone (head), LoRA + head (lora), everything (full), patterns."""
    from ..classify import SequenceClassifier

    model: nn.Module = lm  # (a PeftModel under lora)
    if cfg.train.mode == "head":
        for p in lm.parameters():
            p.requires_grad_(False)
    else:
        model = apply_mode(lm, cfg.train, cfg.lora)
    return SequenceClassifier(model, labels or [], cfg.classify.pooling, cfg.classify.bias)
