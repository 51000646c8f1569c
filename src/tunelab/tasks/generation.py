"""Generation: a prompt and its completion, the MLE loss on the completion's tokens only, scored by exact
match of the greedy answer. Instruction mixtures and SNI tasks are generation tasks that build their pairs
otherwise (``tasks.instruct``, ``tasks.sni``)."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..data.formats import encode, split_records, to_pairs
from ..data.types import Pair
from .base import SPLITS, Splits, Task, check_display, synthetic_stats


class GenerationTask(Task):
    name = "generation"

    def pairs(self, cfg: Config) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
        """Prompt/completion pairs of every split, and what data_stats.json says of how they were made."""
        records = split_records(cfg.data, cfg.train.seed)
        return {name: to_pairs(records[name], cfg.data) for name in SPLITS}, {}

    def examples(self, cfg: Config, tok) -> tuple[Splits, dict[str, Any], None]:
        pairs, stats = self.pairs(cfg)
        splits: Splits = {}
        for name in SPLITS:
            splits[name], st = encode(pairs[name], tok, cfg.data, name)
            stats[name] = st.summary()
        self.describe(stats, splits)
        if cfg.data.synthetic.count:
            stats["synthetic"] = synthetic_stats(cfg, splits)
        check_display(cfg, splits)
        return splits, stats, None

    def trained_templates(self, cfg: Config) -> set[tuple[str, str]]:
        if cfg.data.format == "template" and not cfg.data.formatter:
            return {(cfg.data.prompt, cfg.data.completion)}
        return set()

    def describe(self, stats: dict[str, Any], splits: Splits) -> None:
        """What data_stats.json adds once the examples exist (a mixture: what each task kept)."""
