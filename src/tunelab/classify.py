"""A causal language model with a classification head: p(y|x) = softmax(W h + b).

h is the final hidden state of the last non-padding token (found from the attention mask, never by
looking for a token id, so it is right under left padding, right padding and pad == eos), or of the
first token, or the mean over non-padding tokens (for encoder models). W is K x d.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data.batching import collate
from .data.types import Example
from .errors import TunelabError
from .train.forward import split_head

HEAD_FILE = "classifier_head.safetensors"
LABELS_FILE = "classifier.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last 1: right or left padding alike."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "last") -> torch.Tensor:
    """(B, T, D) hidden states -> (B, D)."""
    B = hidden.shape[0]
    rows = torch.arange(B, device=hidden.device)
    if how == "last":
        return hidden[rows, last_token_index(attention_mask)]
    if how == "first":
        first = attention_mask.long().argmax(dim=1)  # the first 1 of each row (left padding too)
        return hidden[rows, first]
    if how == "mean":
        m = attention_mask.float()[..., None]  # (B, T, 1); sums in float32 whatever the model's dtype
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {how!r}")


def classification_ce_sum(logits: torch.Tensor, labels: torch.Tensor,
                          weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum over examples of -log p(y|x), and the number of examples. logits (B, K), labels (B,)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    if weight is not None:
        ce = ce * weight.to(ce.dtype)
    return ce.sum(), labels.numel()


def classifier_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, int]:
    """The classification objective for the training loop (chunk is unused: K is small)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return classification_ce_sum(logits, batch["class_labels"], batch.get("weight"))


class SequenceClassifier(nn.Module):
    """``lm`` (a causal LM, plain or PEFT-wrapped) without its output head, plus a K-way head."""

    def __init__(self, lm: nn.Module, labels: list[str], pooling: str = "last", bias: bool = False):
        super().__init__()
        parts = split_head(lm)
        if parts is None:
            raise TunelabError("this model's body cannot be separated from its head for classification",
                               "model.name")
        self.lm = lm
        self.labels = list(labels)
        self.pooling = pooling
        # (an int: the config's and the head's own attributes, which torch's types give as Tensor | Module)
        hidden = cast(int, lm.config.hidden_size if hasattr(lm.config, "hidden_size") else parts[1].in_features)
        ref = next(lm.parameters())
        self.head = nn.Linear(hidden, len(labels), bias=bias, device=ref.device, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=hidden ** -0.5 / 4)
        if bias:
            nn.init.zeros_(self.head.bias)

    @property
    def body(self) -> nn.Module:
        parts = split_head(self.lm)
        assert parts is not None, "checked in __init__"
        return parts[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling).float())  # (B, K)

    def save_head(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        tensors = {"weight": self.head.weight.detach().cpu().contiguous()}
        if self.head.bias is not None:
            tensors["bias"] = self.head.bias.detach().cpu().contiguous()
        save_file(tensors, str(out_dir / HEAD_FILE))
        meta = {"labels": self.labels, "pooling": self.pooling, "bias": self.head.bias is not None,
                "num_labels": len(self.labels), "hidden_size": self.head.in_features}
        (out_dir / LABELS_FILE).write_text(json.dumps(meta, indent=1))

    def load_head(self, src_dir: Path) -> None:
        """The head saved by save_head; one that does not fit this classifier, or a damaged file, is a one-line
        error (never a partial or broadcast copy)."""
        src_dir = Path(src_dir)
        meta = read_head_meta(src_dir)
        if meta["num_labels"] != len(self.labels) or meta["labels"] != self.labels:
            raise TunelabError(f"the saved head has {meta['num_labels']} classes {meta['labels'][:5]}, the "
                               f"recipe's data {len(self.labels)} {self.labels[:5]}", str(src_dir / LABELS_FILE))
        path = src_dir / HEAD_FILE
        if not path.is_file():
            raise TunelabError(f"no classifier head weights here ({HEAD_FILE} is missing)", str(src_dir))
        tensors = load_file(str(path))
        want = {"weight": tuple(self.head.weight.shape)}
        if self.head.bias is not None:
            want["bias"] = tuple(self.head.bias.shape)
        if set(tensors) != set(want):
            raise TunelabError(f"holds the tensors {sorted(tensors)}, a head of {LABELS_FILE}'s kind {sorted(want)}: "
                               "the file is damaged", str(path))
        for name, shape in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise TunelabError(f"{name} is {t.dtype} {list(t.shape)}, this model's head is {list(shape)} floats "
                                   "(the head of a model of another width, or a damaged file)", str(path))
            if not bool(torch.isfinite(t).all()):
                raise TunelabError(f"head weights hold NaN or inf: {name} (the file is damaged, or was saved from a "
                                   "diverged run)", str(path))
        with torch.no_grad():
            self.head.weight.copy_(tensors["weight"])
            if self.head.bias is not None:
                self.head.bias.copy_(tensors["bias"])


POOLINGS = ("last", "first", "mean")


def read_head_meta(src_dir: Path) -> dict:
    """classifier.json, checked: the labels (distinct texts), the pooling, whether the head has a bias."""
    path = Path(src_dir) / LABELS_FILE
    if not path.exists():
        raise TunelabError("no classifier head here", str(path))
    meta = json.loads(path.read_text(encoding="utf-8"))  # not JSON: the caller's "corrupt or truncated" error

    def bad(problem: str) -> TunelabError:
        return TunelabError(f"{problem}: the file is damaged", str(path))

    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not an object")
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise bad(f"labels must be a list of at least two class names, got {str(labels)[:60]}")
    if len(set(labels)) != len(labels):
        raise bad("labels has duplicates")
    if meta.get("pooling") not in POOLINGS:
        raise bad(f"pooling must be one of {', '.join(POOLINGS)}, got {meta.get('pooling')!r}")
    if not isinstance(meta.get("bias"), bool):
        raise bad(f"bias must be true or false, got {meta.get('bias')!r}")
    n = meta.setdefault("num_labels", len(labels))
    if type(n) is not int or n != len(labels):
        raise bad(f"num_labels is {n!r}, but labels lists {len(labels)} classes")
    return meta


EXPORT_PAD = "<|tunelab_pad|>"


def export_sequence_classification(clf: SequenceClassifier, out_dir: Path, tokenizer) -> None:
    """Write a transformers *ForSequenceClassification directory with the same logits.

    transformers pools the rightmost token that is not the pad token and its score layer has no bias,
    so export needs last-token pooling and no bias; LoRA is merged first. Where the pad token is also a
    token that texts hold (pad == eos, as SmolLM2's), a text ending in it would be pooled one token early:
    the export gets a pad token of its own (EXPORT_PAD, one embedding row more, never attended to). The
    tokenizer pads on the right, as training did.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    if clf.pooling != "last":
        raise TunelabError("export needs classify.pooling=last (what transformers' classes do)", "classify.pooling")
    if clf.head.bias is not None:
        raise TunelabError("transformers' sequence-classification heads have no bias; train with "
                           "classify.bias=false to export", "classify.bias")
    lm = clf.lm.merge_and_unload() if hasattr(clf.lm, "merge_and_unload") else clf.lm
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = len(clf.labels)
    config.id2label = dict(enumerate(clf.labels))
    config.label2id = {name: i for i, name in enumerate(clf.labels)}
    config.pad_token_id = tokenizer.pad_token_id
    shared = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id} - {None}
    tokenizer = copy.deepcopy(tokenizer)  # (the run's is left as it is)
    # padded as the classifier trained (collate pads on the right): left padding would shift every position,
    # and the logits with it. save_pretrained writes an attribute only if it was an argument: set both.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "right"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in shared:
        tokenizer.add_special_tokens({"pad_token": EXPORT_PAD})
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise TunelabError(f"transformers has no sequence-classification class for {config.model_type}: {e}",
                           "model.name") from None
    body_state = split_head(lm)[0].state_dict()
    prefix = model.base_model_prefix
    missing, unexpected = getattr(model, prefix).load_state_dict(body_state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise TunelabError(f"cannot map the body's weights onto {type(model).__name__}", "model.name")
    with torch.no_grad():
        model.score.weight.copy_(clf.head.weight.to(model.score.weight.dtype))
    if tokenizer.pad_token_id != config.pad_token_id:  # the export's own pad token
        if tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def classifier_texts(template: str, records: list[tuple[dict | None, str]]) -> list[tuple[str, str]]:
    """(text, where) of each record to classify: its fields rendered by the run's text template (``None``
    fields: a bare text, classified as it is); an empty text is an error."""
    from .data.templates import render

    texts = []
    for rec, where in records:
        text = where if rec is None else render(template, rec, where, "classify.text")
        if not text.strip():
            raise TunelabError("empty text: nothing to classify", "predict" if rec is None else where)
        texts.append((text, where))
    return texts


def predict(model: SequenceClassifier, tok, texts: list[tuple[str, str]], max_length: int,
            batch_size: int) -> list[dict]:
    """Each text's most probable label and every label's probability (rounded to 6 places)."""
    from .data.formats import Example
    from .data.types import IGNORE

    examples = []
    for text, where in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"][:max_length]
        examples.append(Example(ids, [IGNORE] * len(ids), text, "", where))
    probs = class_probabilities(model, examples, tok.pad_token_id, batch_size)
    rows = []
    for e, p in zip(examples, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        rows.append({"text": e.prompt, "label": model.labels[best],
                     "probs": {name: round(v, 6) for name, v in zip(model.labels, p)}})
    return rows


@torch.no_grad()  # (without it every batch's graph stayed alive through its probabilities: 24 GB for 1200 texts)
def class_probabilities(model, examples: list[Example], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N, K) class probabilities of a SequenceClassifier, in the examples' order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[torch.Tensor | None] = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = collate([examples[i] for i in idx], pad_id)
        probs = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).softmax(-1).cpu()
        for j, i in enumerate(idx):
            out[i] = probs[j]
    model.train(was_training)
    rows = [p for p in out if p is not None]  # (every example's: ``order`` covers them all)
    return torch.stack(rows) if rows else torch.zeros(0, 0)
