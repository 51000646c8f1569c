"""Fault injection: SIGKILL during steps and during checkpoint writes, a full disk, a NaN loss.

Faults are placed by TUNELAB_FAULT (see tunelab/faults.py) at seeded random points, so every run of this
test kills at the same places and a failure can be replayed.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file

from tunelab.train import checkpoint as ckpt

STEPS = 30


def fault_recipe(tmp_path: Path, tiny_model: Path, names_file: Path, run: Path, **train) -> Path:
    return write_recipe(tmp_path / f"{run.name}.yaml", tiny_model, names_file,
                        train={"max_steps": STEPS, "checkpoint_every": 1, "keep_checkpoints": 2, "batch_size": 4,
                               "lr": 2e-3, "log_every": 0, **train},
                        eval={"before": False, "generate": False}, output={"dir": str(run)})


def last_complete(run: Path) -> int:
    found = ckpt.latest_valid(run / "checkpoints")
    return 0 if found is None else int(found.name.split("-")[1])


def test_forty_kills_resume_to_the_same_weights(tmp_path, tiny_model, names_file):
    ref = tmp_path / "ref"
    tunelab("--quiet", "train", str(fault_recipe(tmp_path, tiny_model, names_file, ref)))

    run = tmp_path / "killed"
    recipe = fault_recipe(tmp_path, tiny_model, names_file, run)
    rng = random.Random(2026)
    faults = ["kill-step"] * 20 + ["kill-ckpt"] * 20
    rng.shuffle(faults)
    done = 0
    for i, kind in enumerate(faults):
        at = min(done + rng.randint(1, 2), STEPS)
        spec = f"{kind}:{at}" + (f":{rng.randint(0, 5)}" if kind == "kill-ckpt" else "")  # files written first
        args = ["train", str(recipe)] + (["--resume"] if i else [])
        proc = tunelab(*args, env={"TUNELAB_FAULT": spec}, check=False)
        assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        if done:
            assert f"(step {done} of {STEPS})" in proc.stderr, f"{spec}: did not resume from step {done}"
        # every complete checkpoint verifies; the one being written when killed is not taken for one
        assert last_complete(run) == at - 1, spec
        for _, path in ckpt.list_checkpoints(run / "checkpoints"):
            assert ckpt.verify(path), f"{spec}: {path} is listed as a checkpoint but is incomplete"
        done = at - 1
    proc = tunelab("train", str(recipe), "--resume")
    assert f"(step {done} of {STEPS})" in proc.stderr
    assert not list((run / "checkpoints").glob(".tmp-*")), "temporary checkpoint directories were left behind"

    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    losses = [json.loads(line)["loss"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(losses, abs=1e-6)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model, names_file):
    run = tmp_path / "disk"
    recipe = fault_recipe(tmp_path, tiny_model, names_file, run, max_steps=6, checkpoint_every=2)
    proc = tunelab("--quiet", "train", str(recipe), env={"TUNELAB_FAULT": "enospc-ckpt:4"}, check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tunelab: ") and "cannot write checkpoint step-4" in line and "No space left" in line
    assert "Traceback" not in proc.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2]
    assert ckpt.verify(run / "checkpoints" / "step-2")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    proc = tunelab("train", str(recipe), "--resume")
    assert "(step 2 of 6)" in proc.stderr and (run / "eval.json").exists()


def test_nan_loss_stops_or_is_skipped(tmp_path, tiny_model, names_file):
    run = tmp_path / "nan"
    recipe = fault_recipe(tmp_path, tiny_model, names_file, run, max_steps=5)
    proc = tunelab("--quiet", "train", str(recipe), env={"TUNELAB_FAULT": "nan-loss:3"}, check=False)
    assert proc.returncode == 2
    assert "non-finite loss (nan)" in proc.stderr and "at step 3" in proc.stderr
    assert max(s for s, _ in ckpt.list_checkpoints(run / "checkpoints")) == 2  # nothing written for step 3

    run2 = tmp_path / "nan_skip"
    recipe = fault_recipe(tmp_path, tiny_model, names_file, run2, max_steps=5, nonfinite="skip")
    tunelab("--quiet", "train", str(recipe), env={"TUNELAB_FAULT": "nan-loss:3"})
    rows = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False]
    assert json.loads((run2 / "eval.json").read_text())["skipped_steps"] == 1
    for _, path in ckpt.list_checkpoints(run2 / "checkpoints"):
        params = load_file(str(path / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in params.values())
