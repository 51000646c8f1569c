"""Instruction tuning: a mixture of tasks, each rendered with templates (FLAN-style), some templates and
tasks held out; generation examples, scored by exact match per task and template."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config, TaskConfig
from ..data.formats import split_records
from ..data.instruct import instruct_pairs, resolve_tasks
from ..data.types import Pair, Record
from .base import Splits
from .generation import GenerationTask


class InstructTask(GenerationTask):
    name = "instruct"

    def pairs(self, cfg: Config) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
        cache: dict[str, dict[str, list[Record]]] = {}

        def records_of(tc: TaskConfig) -> dict[str, list[Record]]:
            if tc.source is None:  # data.train, split as the recipe says (with data.validation/test if given)
                key, data = "data", cfg.data
            else:  # a task's own source is split by data.validation_size / test_size (data.unique_by and
                # data.train_size are about data.train's records; they say nothing of this file's fields)
                key = repr(tc.source)
                data = dataclasses.replace(cfg.data, train=tc.source, validation=None, test=None,
                                           unique_by=None, train_size=None)
            if key not in cache:
                cache[key] = split_records(data, cfg.train.seed)
            return cache[key]

        pairs, mixture = instruct_pairs(cfg, records_of)
        return pairs, {"mixture": mixture}

    def describe(self, stats: dict[str, Any], splits: Splits) -> None:
        kept: dict[str, int] = {}  # what each task contributes after length filtering
        for e in splits["train"]:
            task = (e.group or "").partition("/")[0]
            kept[task] = kept.get(task, 0) + 1
        for name, r in stats["mixture"]["tasks"].items():
            r["kept"] = kept.get(name, 0)

    def trained_templates(self, cfg: Config) -> set[tuple[str, str]]:
        return {(t.prompt, t.completion) for task in resolve_tasks(cfg)
                if task.name not in cfg.instruct.held_out_tasks for t in task.train_templates}

    def token_settings(self, cfg: Config) -> dict[str, Any]:
        return {"instruct": dataclasses.asdict(cfg.instruct)}  # the tasks, templates and mixture
