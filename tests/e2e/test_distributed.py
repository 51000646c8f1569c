"""Several processes (torchrun, gloo on the CPU): the same global batch on 1 and 2 processes gives the same
losses and weights, and a killed 2-process run resumes to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "tunelab.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:  # the workers' own lines first: torchrun's traceback says little
        ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank"))[-6000:]
        raise AssertionError(f"torchrun {' '.join(args)} exited {proc.returncode}\n{ranks}\n{proc.stderr[-3000:]}")
    return proc


def recipe(tmp_path: Path, tiny_model: Path, names_file: Path, mode: str, out: str) -> Path:
    lr = 5e-3 if mode == "lora" else 1e-3
    return write_recipe(tmp_path / f"{out}.yaml", tiny_model, names_file,
                        train={"mode": mode, "max_steps": 6, "batch_size": 8, "grad_accum": 2, "lr": lr,
                               "log_every": 1, "checkpoint_every": 3},
                        eval={"before": False, "generate": False}, output={"dir": str(tmp_path / out)})


def weights(run: Path) -> dict[str, torch.Tensor]:
    f = run / "adapter" / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else run / "model" / "model.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same(a: Path, b: Path) -> None:
    assert losses(b) == pytest.approx(losses(a), abs=1e-5)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_match_one(tmp_path, tiny_model, names_file, mode):
    tunelab("--quiet", "train", str(recipe(tmp_path, tiny_model, names_file, mode, "one")))
    proc = torchrun("train", str(recipe(tmp_path, tiny_model, names_file, mode, "two")))
    assert "data parallel over 2 processes" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["steps"] == 6


def test_a_killed_two_process_run_resumes(tmp_path, tiny_model, names_file):
    tunelab("--quiet", "train", str(recipe(tmp_path, tiny_model, names_file, "lora", "one")))
    r = recipe(tmp_path, tiny_model, names_file, "lora", "two")
    killed = torchrun("train", str(r), env={"TUNELAB_FAULT": "kill-step:5"}, check=False)
    assert killed.returncode != 0
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-3"]
    proc = torchrun("train", str(r), "--resume")
    assert "(step 3 of 6)" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "two")
    # resuming with another number of processes: the data position is global, so it continues exactly
    r1 = recipe(tmp_path, tiny_model, names_file, "lora", "three")
    torchrun("train", str(r1), env={"TUNELAB_FAULT": "kill-step:5"}, check=False)
    tunelab("train", str(r1), "--resume")
    assert_same(tmp_path / "one", tmp_path / "three")


def test_a_short_last_batch_leaves_a_process_without_rows(tmp_path, tiny_model, names_file):
    """361 training names in batches of 8: one batch of the epoch has a single row, for one process only."""
    def r(out):
        return write_recipe(tmp_path / f"{out}.yaml", tiny_model, names_file,
                            data={"validation_size": 39}, train={"max_steps": 24, "batch_size": 8, "grad_accum": 2,
                                                                 "lr": 5e-3, "log_every": 1},
                            eval={"before": False, "generate": False}, output={"dir": str(tmp_path / out)})
    tunelab("--quiet", "train", str(r("one")))
    torchrun("train", str(r("two")))
    assert_same(tmp_path / "one", tmp_path / "two")


def test_batch_must_divide_among_the_processes(tmp_path, tiny_model, names_file):
    r = recipe(tmp_path, tiny_model, names_file, "lora", "odd")
    proc = torchrun("--quiet", "train", str(r), "train.batch_size=7", check=False)
    assert proc.returncode != 0 and "must be a multiple of the 2 processes" in proc.stderr


def test_accelerate_launch_runs_the_same_training(tmp_path, tiny_model, names_file):
    """`accelerate launch --multi_gpu` starts its processes through torchrun; on a CPU they talk gloo.
    (`accelerate launch --cpu` starts one process unless MPI is set up: that path is not data-parallel.)"""
    tunelab("--quiet", "train", str(recipe(tmp_path, tiny_model, names_file, "lora", "one")))
    r = recipe(tmp_path, tiny_model, names_file, "lora", "acc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as s:  # a free port: accelerate's default (29500) may be taken
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "tunelab.cli", "train", str(r)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel over 2 processes" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "acc")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_matches_one_process(tmp_path, tiny_model, names_file, mode):
    """train.parallel=fsdp (FSDP2: each decoder layer a unit, parameters/gradients/optimizer state sharded)
    gives the losses, validation losses and weights of one process, and writes the same files."""
    def r(out):  # evaluation mid-run (validation loss, generation, the best weights kept) under FSDP too
        p = recipe(tmp_path, tiny_model, names_file, mode, out)
        return [str(p), "train.eval_every=3", "train.parallel=fsdp", "eval.generate=true", "eval.max_examples=8",
                "eval.during_training=true", "train.early_stopping_patience=5"]
    tunelab("--quiet", "train", *r("one"))
    proc = torchrun("train", *r("two"))
    assert "FSDP over 2 processes" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "two")
    rows = {x: [json.loads(line) for line in (tmp_path / x / "metrics.jsonl").read_text().splitlines()]
            for x in ("one", "two")}
    assert rows["one"][2]["val_loss"] == pytest.approx(rows["two"][2]["val_loss"], abs=1e-5)
    assert rows["one"][2]["exact_match"] == rows["two"][2]["exact_match"]
    one, two = (json.loads((tmp_path / x / "eval.json").read_text()) for x in ("one", "two"))
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert two["exact_match"] == one["exact_match"]
    best = [load_file(str(tmp_path / x / "best" / "trainable.safetensors")) for x in ("one", "two")]
    assert best[0].keys() == best[1].keys() and all(torch.allclose(best[0][k], best[1][k], atol=1e-5) for k in best[0])


def test_a_killed_fsdp_run_resumes_with_any_number_of_processes(tmp_path, tiny_model, names_file):
    """FSDP checkpoints hold the whole state (gathered), the same files as one process writes."""
    tunelab("--quiet", "train", str(recipe(tmp_path, tiny_model, names_file, "full", "one")))
    r = recipe(tmp_path, tiny_model, names_file, "full", "two")
    killed = torchrun("train", str(r), "train.parallel=fsdp", env={"TUNELAB_FAULT": "kill-step:5"}, check=False)
    assert killed.returncode != 0
    torchrun("train", str(r), "train.parallel=fsdp", "--resume")
    assert_same(tmp_path / "one", tmp_path / "two")
    r3 = recipe(tmp_path, tiny_model, names_file, "full", "three")  # FSDP to one process
    torchrun("train", str(r3), "train.parallel=fsdp", env={"TUNELAB_FAULT": "kill-step:5"}, check=False)
    tunelab("train", str(r3), "--resume")
    assert_same(tmp_path / "one", tmp_path / "three")


def test_distillation_with_a_teacher_on_every_process(tmp_path, tiny_model, names_file):
    """Token-level KD from a live teacher under FSDP (the student sharded): each process loads the teacher
    (frozen, not wrapped) and scores its own rows; the losses and weights are those of one process."""
    def r(out):
        return write_recipe(tmp_path / f"{out}.yaml", tiny_model, names_file,
                            train={"mode": "full", "max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1,
                                   "parallel": "fsdp"},
                            kd={"teacher": str(tiny_model), "alpha": 0.5, "temperature": 2.0},
                            eval={"before": False, "generate": False}, output={"dir": str(tmp_path / out)})
    tunelab("--quiet", "train", str(r("one")))
    proc = torchrun("train", str(r("two")))
    assert "distilling from" in proc.stderr
    assert_same(tmp_path / "one", tmp_path / "two")


def test_fsdp_classifier(tmp_path, tiny_model, names_file):
    """A classification head (owned by the FSDP root) over a LoRA model: one process's losses and accuracy."""
    def r(out):
        return write_recipe(
            tmp_path / f"{out}.yaml", tiny_model, names_file, task="classification",
            data={"prompt": "{prompt}", "completion": "{completion}", "max_length": 24},
            classify={"text": "Name: {name}", "label": "{name|vowels}", "bias": True},
            train={"mode": "lora", "max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "parallel": "fsdp"},
            eval={"before": False, "batch_size": 32}, output={"dir": str(tmp_path / out)})
    tunelab("--quiet", "train", str(r("one")))
    torchrun("train", str(r("two")))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    one, two = (json.loads((tmp_path / x / "eval.json").read_text()) for x in ("one", "two"))
    assert two["accuracy"] == one["accuracy"] and two["confusion"] == one["confusion"]
