"""Precision: what the forward pass is autocast to (train.precision), and the frozen weights stored in that dtype.

train.precision=auto is mixed (float32 weights and AdamW, the forward pass in bfloat16) for full fine-tuning
where model.dtype is bfloat16, and on a CPU that multiplies bfloat16 natively (avx512_bf16 or AMX) for a model
in float32 at least MIN_WIDTH wide: there bfloat16 products run at 2.2-2.5x the float32 speed, and a LoRA step of
SmolLM2-135M (576 wide) takes 0.75x the time (measured 2026-12-05); on a narrower model the casts cost more
than the products save.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import Config, ModelConfig
from ..models import resolve_dtype

MIN_WIDTH = 512  # hidden size from which auto computes in bfloat16 on such a CPU


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16, AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # (private helpers of torch.cpu: absent from some builds)
        return False


def width(model: nn.Module) -> int | None:
    """The model's hidden size, as its config gives it."""
    config = getattr(model, "config", None)
    value = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return value if isinstance(value, int) else None


def mixed_precision(cfg: Config, device: torch.device, model_width: int | None = None) -> torch.dtype | None:
    """The dtype the forward pass is autocast to when the weights are kept in float32 (train.precision), or
    None (pure: everything in model.dtype). ``model_width``: the loaded model's hidden size (the CPU case of
    auto needs it; without it only the cases decided before loading are)."""
    compute = resolve_dtype(cfg.model.dtype, device)
    if cfg.train.precision == "mixed":
        return torch.bfloat16
    if cfg.train.precision != "auto":
        return None
    if compute == torch.bfloat16 and cfg.train.mode == "full":
        return torch.bfloat16
    if (device.type == "cpu" and compute == torch.float32 and model_width is not None and model_width >= MIN_WIDTH
            and native_bf16_cpu()):
        return torch.bfloat16
    return None


def precision_line(cfg: Config, device: torch.device, amp_dtype: torch.dtype) -> str:
    """The log's line for a run in mixed precision, and why when auto chose it on the CPU."""
    why = ""
    if cfg.train.precision == "auto" and device.type == "cpu" and resolve_dtype(cfg.model.dtype, device) \
            == torch.float32:
        why = " (train.precision=auto: this CPU multiplies bfloat16 natively; pure keeps float32 throughout)"
    return f"mixed precision{why}: float32 weights and optimizer, the forward pass in {amp_dtype}"


def weights_config(cfg: Config, amp_dtype: torch.dtype | None) -> ModelConfig:
    """What to load the weights with: float32 under mixed precision (the master weights), else model.dtype."""
    return dataclasses.replace(cfg.model, dtype="float32") if amp_dtype else cfg.model


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Callable[[], Any]:
    """A context factory: the forward pass autocast to ``amp_dtype``, or nothing."""
    if amp_dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=amp_dtype)


def loaded_precision(cfg: Config, amp_dtype: torch.dtype | None, model: nn.Module
                     ) -> tuple[torch.dtype | None, Callable[[], Any]]:
    """Once the model is loaded (with ``weights_config``): the autocast dtype, now that its width decides the CPU
    case of auto, and the context factory for its forward passes. Training and ``tunelab eval`` both use it."""
    device = next(model.parameters()).device
    amp_dtype = amp_dtype or mixed_precision(cfg, device, width(model))
    return amp_dtype, autocast(device, amp_dtype)


def frozen_linears_to(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of linear layers in ``dtype``: the dtype autocast casts them to for
    every product anyway, so the products are the same, without the cast at every forward pass (mixed
    precision with LoRA, whose frozen base is never saved). A tensor shared with another kind of module (a head
    tied to the input embeddings) is left as it is. Returns the number of layers changed."""
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    n = 0
    for m in model.modules():
        if not isinstance(m, nn.Linear) or m.weight.requires_grad or id(m.weight) in shared:
            continue
        for t in (m.weight, m.bias):
            if t is not None and not t.requires_grad and t.is_floating_point():
                t.data = t.data.to(dtype)
        n += 1
    return n
