"""Classification: a head over the language model's hidden state at the last non-padding token, the
cross-entropy of the class, scored by accuracy (and macro-F1, the confusion matrix)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..classify import classifier_loss_sum
from ..config import ClassifyConfig, Config, DataConfig
from ..data.formats import EncodeStats, split_records
from ..data.lengths import token_bound
from ..data.templates import render
from ..data.types import IGNORE, Example, Record
from ..errors import TunelabError
from ..evaluate import classification_metrics
from ..train.trainable import make_classifier
from .base import SPLITS, Count, LossFn, Splits, Task, check_display

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ClassificationTask(Task):
    name = "classification"
    by_generation = False
    prompt_variations = False
    checks_answer_budget = False

    def examples(self, cfg: Config, tok) -> tuple[Splits, dict[str, Any], list[str]]:
        records = split_records(cfg.data, cfg.train.seed)
        labels = label_names(records["train"], cfg.classify)
        splits: Splits = {}
        stats: dict[str, Any] = {}
        for name in SPLITS:
            splits[name], st = encode_classification(records[name], tok, cfg.data, cfg.classify, labels, name)
            stats[name] = st.summary()
        check_display(cfg, splits)
        seen = {e.label for e in splits["train"]}
        if len(seen) < 2:
            where = cfg.data.train.path or cfg.data.train.dataset if cfg.data.train else "data.train"
            raise TunelabError(f"the training set has a single class ({labels[next(iter(seen))]!r}): "
                               "nothing to learn", where)
        return splits, stats, labels

    def objective(self, cfg: Config) -> tuple[LossFn, Count]:
        return classifier_loss_sum, lambda b: int(b["class_labels"].numel())

    def score(self, model, tok, cfg: Config, examples: list[Example], labels: list[str] | None,
              progress: bool) -> dict[str, Any]:
        if not examples:
            return {}
        return classification_metrics(model, examples, labels or [], tok.pad_token_id, cfg.eval.batch_size)

    def score_during(self, model, tok, cfg: Config, examples: list[Example],
                     labels: list[str] | None) -> dict[str, Any]:
        return {"accuracy": classification_metrics(model, examples, labels or [], tok.pad_token_id,
                                                   cfg.eval.batch_size)["accuracy"]}

    def output_name(self, cfg: Config) -> str:
        """classifier/ when the head alone trains; otherwise as any task (adapter/ or model/)."""
        return "classifier" if cfg.train.mode == "head" else super().output_name(cfg)

    def trainable(self, lm: PreTrainedModel, cfg: Config, labels: list[str] | None) -> nn.Module:
        return make_classifier(lm, cfg, labels)


def label_of(r: Record, ccfg: ClassifyConfig) -> str:
    """A record's class: classify.label rendered, never empty (a blank or null label is no class)."""
    value = render(ccfg.label, r.fields, r.where, "classify.label").strip()
    if not value:
        raise TunelabError(f"empty label (classify.label={ccfg.label!r} renders to nothing)", r.where)
    return value


def label_names(records: list[Record], ccfg: ClassifyConfig) -> list[str]:
    """The label set: declared in the recipe, or the training data's labels (numbers in numeric order)."""
    if ccfg.labels is not None:
        return list(ccfg.labels)
    values = {label_of(r, ccfg) for r in records}
    numeric = all(v.lstrip("-").isdigit() for v in values)
    return sorted(values, key=lambda v: (int(v), v) if numeric else (0, v))


def encode_classification(records: list[Record], tok, cfg: DataConfig, ccfg: ClassifyConfig,
                          labels: list[str], split: str) -> tuple[list[Example], EncodeStats]:
    """Records -> Examples whose input is the rendered text and whose target is a class index."""
    index = {name: i for i, name in enumerate(labels)}
    stats = EncodeStats(total=len(records))
    texts = [render(ccfg.text, r.fields, r.where, "classify.text") for r in records]
    bound = token_bound(tok) if cfg.truncation != "truncate" else None  # too long: known without tokenizing
    long = [bound is not None and bound.cannot_fit((t,), cfg.max_length) for t in texts]
    ids_all = tok(["" if lg else t for t, lg in zip(texts, long)], add_special_tokens=True)["input_ids"] \
        if records else []
    out = []
    for r, text, ids, lg in zip(records, texts, ids_all, long):
        if not text.strip():
            raise TunelabError("empty text: nothing to classify", r.where)
        value = label_of(r, ccfg)
        if value not in index:
            shown = ", ".join(labels[:12]) + (" ..." if len(labels) > 12 else "")
            raise TunelabError(f"label {value!r} is not in the label set ({shown})", r.where)
        if lg or len(ids) > cfg.max_length:
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                continue
            if cfg.truncation == "error":
                n = f"at least {bound.min_tokens((text,))}" if lg and bound else len(ids)
                raise TunelabError(f"text has {n} tokens, more than data.max_length={cfg.max_length}", r.where)
            ids = ids[: cfg.max_length]
            stats.truncated += 1
        out.append(Example(list(ids), [IGNORE] * len(ids), text, value, r.where, record=r.fields,
                           label=index[value]))
        stats.lengths.append(len(ids))
        stats.supervised.append(1)
    stats.kept = len(out)
    if not out and records:
        raise TunelabError(f"all {stats.total} examples dropped: longer than data.max_length={cfg.max_length}",
                           f"data.{split}")
    return out, stats
