"""Super-NaturalInstructions-style tasks: a definition and demonstrations before each instance, whole tasks
held out for evaluation; generation examples, scored by exact match and ROUGE-L per task."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import Config
from ..data.sni import sni_pairs
from ..data.types import Pair
from .generation import GenerationTask


class SNITask(GenerationTask):
    name = "sni"

    def pairs(self, cfg: Config) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
        pairs, report = sni_pairs(cfg)
        return pairs, {"sni": report}

    def token_settings(self, cfg: Config) -> dict[str, Any]:
        return {"sni": dataclasses.asdict(cfg.sni)}
