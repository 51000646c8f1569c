"""What differs between tasks, decided here once: the objective a step minimises and what it is normalised
by, where the trained weights are saved, and which tokens end a generation.

The task kinds: generation (prompt -> completion, also instruction mixtures and SNI tasks, which are
generation tasks with other example builders), chat (conversations, loss on assistant turns) and
classification (a head over the last non-padding token). Distillation is an objective over a generation
or chat task (``kd.teacher``), built by ``train.distill``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .classify import classifier_loss_sum
from .config import Config
from .data.formats import IGNORE
from .train.forward import causal_lm_loss_sum, packed_loss_sum

LossFn = Callable[..., tuple[torch.Tensor, int]]


def objective(cfg: Config) -> tuple[LossFn, Callable[[dict[str, torch.Tensor]], float]]:
    """(loss_sum(model, batch, chunk), count(batch)): what a step minimises, and what it is normalised by."""
    if cfg.task == "classification":
        return classifier_loss_sum, lambda b: int(b["class_labels"].numel())
    if cfg.train.packing:
        return functools.partial(packed_loss_sum, capacity=cfg.train.pack_length), supervised_weight
    return causal_lm_loss_sum, supervised_weight


def supervised_weight(batch: dict[str, torch.Tensor]) -> float:
    """What a step's loss is divided by: its supervised tokens, each counted with its example's weight
    (all 1 unless data.weight_field is set), so the loss is a weighted mean and a weight of 0 drops a token."""
    sup = (batch["labels"][:, 1:] != IGNORE)
    w = batch.get("weight")
    if w is None or bool((w == 1).all()):
        return int(sup.sum())
    return float((sup.float() * w[:, None]).sum())


def output_name(cfg: Config) -> str:
    """Where the trained weights go: adapter/ (LoRA), classifier/ (a classification head alone), model/."""
    if cfg.train.mode == "lora":
        return "adapter"
    if cfg.task == "classification" and cfg.train.mode == "head":
        return "classifier"
    return "model"


def stop_ids(cfg: Config, tok) -> list[int]:
    """Token ids generation stops at besides EOS: a chat template's end-of-turn token."""
    if cfg.task != "chat":
        return []
    from .data.chat import resolve_template, stop_id

    return [stop_id(resolve_template(cfg.chat.template, tok, cfg.chat.stop), tok)]
