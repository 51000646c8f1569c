"""The data types every stage shares: a record as read, a (prompt, completion) pair, a tokenized example,
and IGNORE, the label of a token that carries no loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE = -100  # the label of a position that is not trained on (PyTorch's cross-entropy ignore_index)
BINARY = (bytes, bytearray, memoryview)  # field values that are binary data, never text


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "file:line" (or "dataset[index]")


@dataclass
class Pair:
    prompt: str
    completion: str
    where: str
    record: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # instruction tuning: "task/template"
    held_out: bool = False  # a held-out template or task (never trained on)
    references: list[str] | None = None  # several valid completions (scored as the best match)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str
    completion: str
    where: str
    weight: float = 1.0
    record: dict[str, Any] = field(default_factory=dict)  # the source record's fields (for display)
    label: int = -1  # classification: the class index (labels are then all -100)
    prompt_len: int | None = None  # generation: input_ids[:prompt_len] is the prompt to generate from
    shown: str | None = None  # what tables show as the input (default: the prompt)
    group: str | None = None  # instruction tuning: "task/template", scored separately
    held_out: bool = False
    references: list[str] | None = None  # every valid completion (default: the completion)

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)
