"""Token-level distillation as a training objective: the student's loss against a live teacher or a cache of
its top-k log-probabilities (the divergences themselves are in ``train.distill``)."""

from __future__ import annotations

from typing import cast

import torch

from ..config import Config
from ..console import say
from ..data.formats import Example
from ..errors import TunelabError


def distillation_loss(cfg: Config, model, tok, train_ex: list[Example], device: torch.device, quiet: bool):
    """loss_fn(model, batch, chunk) for token-level KD against a live teacher or its top-k cache."""
    from ..teacher import cached_rows, load_or_build_cache, load_teacher
    from .distill import kd_loss_sum
    from .forward import body_hidden, pad_last, split_head, sum_over_groups

    kd = cfg.kd
    s_parts = split_head(model)
    if s_parts is None:
        raise TunelabError("distillation needs a model whose logits are head(hidden)", "model.name")
    cache = teacher = None
    if kd.cache:
        cache, vocab = load_or_build_cache(cfg, tok, train_ex, device, quiet)
    else:
        teacher, vocab = load_teacher(cfg, tok, device)
        t_parts = split_head(teacher)
        assert t_parts is not None, "load_teacher refuses a teacher whose logits are not head(hidden)"
        t_body, t_head = t_parts
        t_device = next(teacher.parameters()).device
    say(f"distilling from {kd.teacher}: alpha={kd.alpha}, T={kd.temperature}, {kd.divergence}"
        + (f", top-{kd.top_k} cache {kd.cache}" if cache else ""), quiet)
    s_head_out = cast(torch.Tensor, s_parts[1].weight).shape[0]  # (torch types a module's attribute loosely)
    if s_head_out < vocab:
        raise TunelabError(f"the student's output layer has {s_head_out} rows, fewer than the {vocab} tokens",
                           "model.name")

    def loss_fn(m, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, int]:
        parts = split_head(m)
        assert parts is not None, "m is the student, checked above"
        body, head = parts

        def group_loss(idx, ids, mask, labels, cut, w):
            hidden = pad_last(body_hidden(body, ids, mask), cut)
            rows = batch["index"] if idx is None else batch["index"][idx]
            t_part = c_part = None
            if cache is not None:
                lp, ix = cached_rows(cache, rows.cpu())
                c_part = (lp.to(hidden.device), ix.to(hidden.device))
            else:
                with torch.no_grad():
                    t_hidden = pad_last(body_hidden(t_body, ids.to(t_device), mask.to(t_device)), cut)
                    t_hidden = t_hidden.to(hidden.device)  # kd_loss_sum selects positions with the student's mask
                t_part = (t_hidden, t_head if t_device == hidden.device
                          else (lambda x, dev=hidden.device: t_head(x.to(t_device)).to(dev)))
            return kd_loss_sum(hidden, labels, head, t_part, c_part, temperature=kd.temperature,
                               kind=kd.divergence, beta=kd.beta, alpha=kd.alpha, vocab=vocab, weight=w,
                               chunk=kd.chunk)

        return sum_over_groups(batch, head, group_loss)

    return loss_fn
