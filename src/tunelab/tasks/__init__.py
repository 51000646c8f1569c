"""The task kinds, each in its own module, and the one place a run's task is decided (``task_of``).

generation (prompt -> completion), instruct (a FLAN-style mixture of generation tasks), sni
(Super-NaturalInstructions-style tasks), chat (conversations, loss on assistant turns) and classification
(a head over the last non-padding token). Distillation is an objective over a generation or chat task
(``kd.teacher``; ``train.kd`` builds its loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..config import Config
from ..data.types import Example, Pair
from ..errors import TunelabError
from ..train.trainable import set_dropout
from .base import SPLITS, Count, LossFn, Splits, Task, supervised_weight
from .chat import ChatTask
from .classification import ClassificationTask
from .generation import GenerationTask
from .instruct import InstructTask
from .sni import SNITask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GENERATION, INSTRUCT, SNI, CHAT, CLASSIFICATION = (GenerationTask(), InstructTask(), SNITask(), ChatTask(),
                                                   ClassificationTask())


def task_of(cfg: Config) -> Task:
    """The run's task: decided here, once."""
    match cfg.task:
        case "classification":
            return CLASSIFICATION
        case "chat":
            return CHAT
        case "generation" if cfg.sni.dir is not None:
            return SNI
        case "generation" if cfg.instruct.tasks:
            return INSTRUCT
        case _:
            return GENERATION


def build_dataset(cfg: Config, tok) -> tuple[Splits, dict[str, Any], list[str] | None]:
    """Read, split, format and tokenize: Examples of every split, their statistics, and (classification)
    the label names."""
    return task_of(cfg).examples(cfg, tok)


def generation_pairs(cfg: Config) -> tuple[dict[str, list[Pair]], dict[str, Any] | None]:
    """Prompt/completion pairs of every split of a generation recipe (plain, a mixture or SNI tasks), and the
    mixture's or the tasks' report (None for plain data)."""
    task = task_of(cfg)
    if not isinstance(task, GenerationTask):
        raise TunelabError(f"a {cfg.task} recipe has no prompt/completion pairs", "task")
    pairs, extra = task.pairs(cfg)
    return pairs, extra or None


def trainable_model(lm: PreTrainedModel, cfg: Config, labels: list[str] | None) -> nn.Module:
    """The loaded language model made ready to train: dropout override, then what the task trains (train.mode,
    LoRA, a classifier over it)."""
    if cfg.train.dropout is not None:
        set_dropout(lm, cfg.train.dropout)
    return task_of(cfg).trainable(lm, cfg, labels)


def objective(cfg: Config) -> tuple[LossFn, Count]:
    """(loss_sum(model, batch, chunk), count(batch)): what a step minimises, and what it is normalised by."""
    return task_of(cfg).objective(cfg)


def output_name(cfg: Config) -> str:
    """Where the trained weights go: adapter/ (LoRA), classifier/ (a classification head alone), model/."""
    return task_of(cfg).output_name(cfg)


def stop_ids(cfg: Config, tok) -> list[int]:
    """Token ids generation stops at besides EOS: a chat template's end-of-turn token."""
    return task_of(cfg).stop_ids(cfg, tok)


__all__ = ["CHAT", "CLASSIFICATION", "GENERATION", "INSTRUCT", "SNI", "SPLITS", "ChatTask", "ClassificationTask",
           "Count", "Example", "GenerationTask", "InstructTask", "LossFn", "SNITask", "Splits", "Task",
           "build_dataset", "generation_pairs", "objective", "output_name", "stop_ids", "supervised_weight",
           "task_of", "trainable_model"]
