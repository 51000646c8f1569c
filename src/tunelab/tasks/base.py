"""What a task is: how its records become examples, the objective that trains them, the metrics that score
them, and what a run saves. Each task kind says this once, in its own module, as a subclass of ``Task``; the
loop, the evaluation and the CLI ask the run's task (``tasks.task_of``) instead of checking ``cfg.task``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import Config
from ..data.formats import SYNTHETIC
from ..data.templates import render
from ..data.types import IGNORE, Example
from ..evaluate import generation_metrics
from ..train.forward import causal_lm_loss_sum, packed_loss_sum
from ..train.trainable import apply_mode

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LossFn = Callable[..., tuple[torch.Tensor, Any]]  # (model, batch, chunk) -> (summed loss, count)
Count = Callable[[dict[str, torch.Tensor]], float]  # what a step's loss is normalised by
Splits = dict[str, list[Example]]
SPLITS = ("train", "validation", "test")


def supervised_weight(batch: dict[str, torch.Tensor]) -> float:
    """What a step's loss is divided by: its supervised tokens, each counted with its example's weight
    (all 1 unless data.weight_field is set), so the loss is a weighted mean and a weight of 0 drops a token."""
    sup = (batch["labels"][:, 1:] != IGNORE)
    w = batch.get("weight")
    if w is None or bool((w == 1).all()):
        return int(sup.sum())
    return float((sup.float() * w[:, None]).sum())


class Task:
    """A causal-LM task scored by generation; subclasses change what differs."""

    name = "generation"
    by_generation = True  # scored by generating answers (exact match); else by a class's accuracy
    prompt_variations = True  # eval.variations re-renders its prompt templates
    checks_answer_budget = True  # eval.max_new_tokens is checked against the answers' lengths

    # ---- records -> examples

    def examples(self, cfg: Config, tok) -> tuple[Splits, dict[str, Any], list[str] | None]:
        """Examples of every split, their statistics (data_stats.json), and the label names (classification)."""
        raise NotImplementedError

    def trained_templates(self, cfg: Config) -> set[tuple[str, str]]:
        """(prompt, completion) patterns the run trained on (a prompt variation that is one is marked seen)."""
        return set()

    def token_settings(self, cfg: Config) -> dict[str, Any]:
        """The settings besides ``data`` that decide the examples' tokens (part of a resume's fingerprint)."""
        return {}

    def check(self, cfg: Config) -> None:
        """What the task refuses in a config before anything is loaded (beyond the recipe's own checks)."""

    def input_files(self, cfg: Config) -> list[str]:
        """Files besides the data and the model that the task reads (a run must never write over them)."""
        return []

    # ---- the model and its objective

    def trainable(self, lm: PreTrainedModel, cfg: Config, labels: list[str] | None) -> nn.Module:
        """The loaded language model made ready to train: what trains (train.mode, LoRA)."""
        return apply_mode(lm, cfg.train, cfg.lora)

    def objective(self, cfg: Config) -> tuple[LossFn, Count]:
        """(loss_sum(model, batch, chunk), count(batch)): what a step minimises, and what it is normalised by.
        Distillation replaces the loss once the student exists (``kd.teacher``; ``train.kd`` builds its loss)."""
        if cfg.train.packing:
            return functools.partial(packed_loss_sum, capacity=cfg.train.pack_length), supervised_weight
        return causal_lm_loss_sum, supervised_weight

    # ---- the metrics

    def score(self, model, tok, cfg: Config, examples: list[Example], labels: list[str] | None,
              progress: bool) -> dict[str, Any]:
        """The held-out metrics of the final evaluation (and of the base model)."""
        if not cfg.eval.generate or not examples:
            return {}
        return generation_metrics(model, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                                  progress=progress, display=cfg.eval.display, stop_ids=self.stop_ids(cfg, tok))

    def score_during(self, model, tok, cfg: Config, examples: list[Example],
                     labels: list[str] | None) -> dict[str, Any]:
        """The held-out metric a periodic evaluation records (eval.during_training)."""
        if not cfg.eval.generate:
            return {}
        return {"exact_match": generation_metrics(model, tok, examples, cfg.eval.max_new_tokens,
                                                  cfg.eval.batch_size, stop_ids=self.stop_ids(cfg, tok))["exact_match"]}

    def chat_defaults(self, cfg: Config) -> tuple[str | None, str | None]:
        """(the end-of-turn token, the system prompt) a conversation with the trained model starts from: what
        the run trained with (a chat run), else nothing (the model's own template decides)."""
        return None, None

    def stop_ids(self, cfg: Config, tok) -> list[int]:
        """Token ids generation stops at besides EOS."""
        return []

    # ---- what is saved

    def output_name(self, cfg: Config) -> str:
        """Where the trained weights go: adapter/ (LoRA) or model/."""
        return "adapter" if cfg.train.mode == "lora" else "model"


def check_display(cfg: Config, splits: Splits) -> None:
    """The evaluation table's input column (eval.display): a missing field is found now, not after training."""
    if cfg.eval.display:
        for e in (*splits["validation"], *splits["test"]):
            if e.record is not None:
                render(cfg.eval.display, e.record, e.where, "eval.display")


def synthetic_stats(cfg: Config, splits: Splits) -> dict[str, Any]:
    """data_stats.json's record of data.synthetic: what was asked and how many training examples it made."""
    sy = cfg.data.synthetic
    return {"field": sy.field, "order": sy.order, "asked": sy.count,
            "records": sum(e.where.startswith(SYNTHETIC) for e in splits["train"]), "lengths": sy.lengths}
