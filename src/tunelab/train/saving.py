"""What a run writes and reads back besides its steps: the run files, checkpoints (and restoring one),
the best weights, and eval.json's record of the run."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .. import atomic, dist, ownership
from ..config import save_config
from ..console import say
from ..errors import TunelabError
from ..evaluation import without_samples
from . import checkpoint as ckpt
from . import rundir
from .run import Run
from .state import TrainState
from .trainable import trainable_state

log = logging.getLogger("tunelab")


def restore(run: Run, state: TrainState) -> None:
    """Load the checkpoint into the model, the optimizer, the RNGs and ``state``; tidy the directory."""
    cfg, d, model = run.cfg, run.d, run.model
    source = run.resume_from
    assert source is not None, "restore is called for a resume only"
    saved, opt_state, rng, saved_state = ckpt.load_checkpoint(source)
    rundir.check_resumable(saved_state, source, cfg, run.train_ex)
    named = dict(model.named_parameters())
    missing = [k for k in saved if k not in named]
    if missing or len(saved) != len(run.params):
        raise TunelabError("checkpoint does not match this configuration's trainable parameters "
                           "(was train.mode or lora changed?)", str(run.resume_from))
    shaped = [k for k, v in saved.items() if not run.fsdp and tuple(v.shape) != tuple(named[k].shape)]
    if shaped:
        k = shaped[0]
        raise TunelabError(f"checkpoint does not match this configuration's trainable parameters: {k} is "
                           f"{list(saved[k].shape)} there, {list(named[k].shape)} here (was lora.r changed?)",
                           str(run.resume_from))
    with torch.no_grad():
        for k, v in saved.items():
            dist.load_into(named[k], v.to(run.device))
    run.opt.load_state_dict(dist.shard_optimizer_state(opt_state, run.opt) if run.fsdp else opt_state)
    ckpt.set_rng_state(rng, d.rank)
    state.load_json(saved_state, run.steps)
    stopper = state.stopper
    d.barrier()  # every process has read the checkpoint before rank 0 tidies the directory
    if d.main:
        rundir.tidy_for_resume(run.dir, source, run.own, state.step,
                               stopper.best_step if stopper else None, stopper is not None)
    if stopper is not None and stopper.best_step == state.step:  # the weights resumed are the best so far
        best = dist.gather_full(trainable_state(model), d.main)
        if d.main and rundir.best_weights_step(run.dir / "best") != state.step:
            rundir.write_best(run.dir, best, state.step, cfg.train.best_metric, stopper.best)
    say(f"resuming from {run.resume_from} (step {state.step} of {run.steps})", run.quiet)


def write_run_files(run: Run) -> None:
    """The marker, config.yaml, the data statistics and samples, and the base model's evaluation."""
    run.dir.mkdir(parents=True, exist_ok=True)
    ownership.mark(run.dir, "run")
    atomic.write_file(run.dir / "config.yaml", lambda p: save_config(run.cfg, p))
    if run.resume_from is None or not (run.dir / "data_stats.json").exists():
        atomic.write_json(run.dir / "data_stats.json", run.data_stats)
        if "mixture" in run.data_stats:
            atomic.write_json(run.dir / "mixture.json", run.data_stats["mixture"])
        from ..report import data_samples

        atomic.write_json(run.dir / "data_samples.json", data_samples(run.train_ex, run.tok))
    if run.before is not None:
        atomic.write_json(run.dir / "before.json", {**run.before, "eval_key": run.before_key})


def checkpoint(run: Run, state: TrainState) -> None:
    """A checkpoint of this step (rank 0 writes it; FSDP gathers the whole state first)."""
    d = run.d
    params = trainable_state(run.model)
    opt: torch.optim.Optimizer | dict = run.opt
    if run.fsdp:  # gathered whole: the checkpoint is the same file as one process writes
        params, opt = dist.gather_full(params, d.main), dist.full_optimizer_state(run.opt, d.main)
    rngs = d.gather_object(ckpt.own_rng_state()) if d.on else None  # each process's generators
    if d.main:
        ckpt.save_checkpoint(run.dir / "checkpoints", state.step, params, opt,
                             state.to_json(run.fingerprint, run.content, d.world), run.cfg.train.keep_checkpoints,
                             rng=ckpt.rng_state(rngs))
    d.barrier()


def result(run: Run, state: TrainState, after: dict) -> dict[str, Any]:
    """eval.json: the final metrics, the run's times and sizes, early stopping, the base model's scores."""
    result = without_samples(after)
    result.update({"split": run.split_name, "steps": run.steps, "train_time_s": round(run.train_time, 1),
                   "total_time_s": round(time.time() - run.t_start, 1), "trainable_parameters": run.n_trainable,
                   "total_parameters": run.n_total, "skipped_steps": state.skipped, "peak_rss_mb": peak_rss_mb()})
    result["phase_times_s"] = {k: round(v, 1) for k, v in run.phases.items()}
    stopper = state.stopper
    if stopper is not None:
        result.update(best_step=stopper.best_step, best_value=stopper.best, best_metric=run.cfg.train.best_metric,
                      stopped_early_at=state.stopped_early)
    if run.device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
    if run.before is not None:
        result["before"] = without_samples(run.before)
    return result


PHASES = {"load": "loading", "eval_before": "evaluation before", "train": "training", "save": "saving",
          "eval_after": "evaluation after"}


def phase_line(result: dict[str, Any]) -> str:
    """eval.json's times as the log's last line: each phase of this process's run, and the total."""
    times = result.get("phase_times_s", {})
    parts = [f"{PHASES.get(k, k)} {v:.0f} s" for k, v in times.items()]
    return ", ".join(parts + [f"total {result['total_time_s']:.0f} s"])


def restore_best(run: Run, state: TrainState) -> None:
    """With early stopping, the model saved and evaluated is the best one seen."""
    stopper = state.stopper
    if stopper is None or stopper.best_step is None:
        return
    if rundir.best_weights_step(run.dir / "best") == stopper.best_step:
        from safetensors.torch import load_file

        named = dict(run.model.named_parameters())
        with torch.no_grad():
            for k, v in load_file(str(run.dir / "best" / "trainable.safetensors")).items():
                named[k].copy_(v.to(named[k].device))
        say(f"restored the best weights (step {stopper.best_step}, {run.cfg.train.best_metric} {stopper.best:.4f})",
            run.quiet)
    elif stopper.best_step != state.step:
        log.warning("the best weights (step %d) are not in %s (replaced by a later step that a resume from an "
                    "earlier checkpoint abandoned): the model saved is the one of step %d", stopper.best_step,
                    run.dir / "best", state.step)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
