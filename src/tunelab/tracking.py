"""Experiment tracking beside metrics.jsonl (which is always written): TensorBoard event files, and
Weights & Biases or MLflow when installed and asked for (``output.report_to``).

W&B runs offline unless WANDB_MODE says otherwise, into the run directory; MLflow logs to a file store
in the run directory unless MLFLOW_TRACKING_URI is set. Only the main process tracks.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .config import flatten
from .errors import TunelabError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULE[name]) is not None


def check(report_to: list[str]) -> list[str]:
    """The trackers to use: unknown names are errors; tensorboard is skipped quietly when it is not
    installed (it is on by default), wandb and mlflow must be installed when asked for."""
    out = []
    for name in report_to:
        if name == "none":
            continue
        if name not in TRACKERS:
            raise TunelabError(f"unknown tracker {name!r} (tensorboard, wandb, mlflow, none)", "output.report_to")
        if not installed(name):
            if name == "tensorboard":
                continue
            raise TunelabError(f"{name} is not installed (pip install {name}), or drop it from output.report_to",
                               "output.report_to")
        out.append(name)
    return out


def _numbers(rec: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


IDS_FILE = "trackers.json"  # in the run directory: the W&B and MLflow run ids, so that a resume continues them


class Trackers:
    def __init__(self, names: list[str], run: Path, config: dict[str, Any], name: str) -> None:
        """The trackers of ``run``; a resumed run (its ids saved in IDS_FILE) continues the same tracker runs
        (a fresh run's directory was cleared first, so it starts new ones)."""
        import json
        import uuid

        from . import atomic

        self.tb = self.wandb = self.mlflow = None
        ids_path = run / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        known = dict(ids)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"))
            self.tb.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in flatten(config).items()) + "\n```")
        if "wandb" in names:
            import wandb

            ids.setdefault("wandb", f"{name}-{uuid.uuid4().hex[:8]}")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), name=name, dir=str(run),
                                    config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                                    id=ids["wandb"], resume="allow")
        if "mlflow" in names:
            import mlflow

            if "MLFLOW_TRACKING_URI" not in os.environ:
                mlflow.set_tracking_uri((run / "mlruns").resolve().as_uri())
            mlflow.set_experiment("tunelab")
            if "mlflow" in ids:  # resumed: the same MLflow run (its parameters are logged already)
                mlflow.start_run(run_id=ids["mlflow"])
            else:
                ids["mlflow"] = mlflow.start_run(run_name=name).info.run_id
                params = {k: str(v)[:250] for k, v in flatten(config).items()}
                items = list(params.items())
                for i in range(0, len(items), 100):
                    mlflow.log_params(dict(items[i:i + 100]))
            self.mlflow = mlflow
        if ids != known:
            atomic.write_json(ids_path, ids)

    def log(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        values = _numbers(rec)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def summary(self, result: dict[str, Any], step: int) -> None:
        values = {f"eval/{k}": v for k, v in _numbers(flatten({k: v for k, v in result.items()
                                                                 if k not in ("by_task", "confusion")})).items()}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.summary.update(values)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
