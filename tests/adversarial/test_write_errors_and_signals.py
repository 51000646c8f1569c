"""Every write path: a full disk or a read-only file system is one line, earlier state stays intact, and a
run that fails before its first checkpoint leaves no run directory. Signals are honoured in every phase."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tunelab, write_recipe
from guard import changes, one_line, run_cli, snapshot


def _recipe(tmp_path: Path, tiny_model: Path, names_file: Path, **train) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file,
                        train={"max_steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2, **train},
                        eval={"before": False, "max_examples": 4, "max_new_tokens": 4})


@pytest.mark.parametrize("fault,reason", [("enospc-file:adapter", "No space left on device"),
                                          ("enospc-file:eval.json", "No space left on device"),
                                          ("erofs-file:eval.json", "Read-only file system"),
                                          ("enospc-file:report.html", "No space left on device")])
def test_a_refused_final_write_is_one_line_and_the_run_resumes(tmp_path, tiny_model, names_file, fault, reason):
    recipe = _recipe(tmp_path, tiny_model, names_file)
    proc = tunelab("--quiet", "train", str(recipe), check=False, env={"TUNELAB_FAULT": fault})
    name = fault.split(":")[1]
    line = one_line(proc.returncode, proc.stderr, f"{name}: cannot write: {reason}")
    assert line
    run = tmp_path / "run"
    assert not list(run.glob(f".{name}*")), "no temporary file left behind"
    assert (run / "checkpoints" / "step-3").is_dir()  # the trained state is intact: the run finishes on resume
    proc = tunelab("--quiet", "train", str(recipe), "--resume")
    assert json.loads((run / "eval.json").read_text())["steps"] == 3


def test_a_refused_write_keeps_the_file_that_was_there(tmp_path):
    from tunelab import atomic, faults
    from tunelab.errors import TunelabError

    target = tmp_path / "eval.json"
    target.write_text('{"old": 1}')
    faults._faults.cache_clear()
    os.environ["TUNELAB_FAULT"] = "enospc-file:eval.json"
    try:
        with pytest.raises(TunelabError, match="cannot write: No space left on device"):
            atomic.write_json(target, {"new": 2})
    finally:
        del os.environ["TUNELAB_FAULT"]
        faults._faults.cache_clear()
    assert json.loads(target.read_text()) == {"old": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_directory_replaced_half_way_is_put_back(tmp_path):
    from tunelab import atomic

    d = tmp_path / "model"
    d.mkdir()
    (d / "weights").write_text("old")

    def fail(tmp: Path) -> None:
        (tmp / "weights").write_text("new, half")
        raise OSError(28, "No space left on device")

    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="model: cannot write: No space left on device"):
        atomic.write_dir(d, fail)
    assert (d / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_run_failing_at_its_first_step_leaves_no_directory(tmp_path, tiny_model, names_file, capfd):
    recipe = _recipe(tmp_path, tiny_model, names_file)
    before = snapshot(tmp_path)
    os.environ["TUNELAB_FAULT"] = "nan-loss:1"
    from tunelab import faults

    faults._faults.cache_clear()
    try:
        code, err = run_cli(["train", str(recipe), f"output.dir={tmp_path / 'runs' / 'deep' / 'run'}"], capfd)
    finally:
        del os.environ["TUNELAB_FAULT"]
        faults._faults.cache_clear()
    one_line(code, err, "non-finite loss (nan)")
    assert changes(before, snapshot(tmp_path)) == []  # nor the folders made for it


def test_overwriting_a_run_that_then_fails_early_leaves_no_half_run(tmp_path, tiny_model, names_file, capfd):
    from tunelab import faults

    recipe = _recipe(tmp_path, tiny_model, names_file, max_steps=1)
    code, err = run_cli(["train", str(recipe)], capfd)
    assert code == 0, err
    code, err = run_cli(["train", str(recipe), "output.overwrite=true", "train.max_length=abc"], capfd)
    assert code == 2  # refused before the run directory is touched: the old run is intact
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["steps"] == 1
    os.environ["TUNELAB_FAULT"] = "nan-loss:1"
    faults._faults.cache_clear()
    try:  # replaced, then failing at its first step: neither the old run nor half a new one is left
        code, err = run_cli(["train", str(recipe), "output.overwrite=true"], capfd)
    finally:
        del os.environ["TUNELAB_FAULT"]
        faults._faults.cache_clear()
    one_line(code, err, "non-finite loss")
    assert not (tmp_path / "run").exists()


def _popen(recipe: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "--quiet", "train", str(recipe), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_sigterm_during_the_last_step_stops_with_130_and_resume_finishes(tmp_path, tiny_model, names_file):
    recipe = _recipe(tmp_path, tiny_model, names_file)
    proc = tunelab("--quiet", "train", str(recipe), check=False, env={"TUNELAB_FAULT": "term-step:3"})
    assert proc.returncode == 130, proc.stderr
    assert "stopped by SIGTERM after step 3 of 3" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-3").is_dir() and not (run / "eval.json").exists()
    tunelab("--quiet", "train", str(recipe), "--resume")
    assert json.loads((run / "eval.json").read_text())["steps"] == 3


def test_sigterm_before_the_first_step_stops_and_leaves_nothing(tmp_path, tiny_model, names_file):
    """While the model and data load (before the training loop), SIGTERM stops like Ctrl-C: 130, no run dir."""
    recipe = _recipe(tmp_path, tiny_model, names_file)
    shutil.copy(names_file, tmp_path / "big.txt")
    before = snapshot(tmp_path)
    proc = _popen(recipe)
    deadline = time.time() + 60
    while not (tmp_path / "run").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)  # the run directory's lock is taken first: setup is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # (the tiny run finished before the signal arrived: nothing to check)
        pytest.skip("the run finished before SIGTERM")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    left = changes(before, snapshot(tmp_path))
    assert left == [] or all(x.startswith("+run") for x in left) and (tmp_path / "run" / "checkpoints").exists(), left


def test_sigterm_while_the_run_directory_is_made_leaves_nothing(tmp_path, tiny_model, names_file, capfd, monkeypatch):
    """The window CI once hit: SIGTERM after the run directory and its lock file exist, before the caller holds
    the lock. The signal waits until the lock is taken, then the run stops with 130 and leaves nothing."""
    import threading

    from tunelab import ownership

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")
    recipe = _recipe(tmp_path, tiny_model, names_file)
    before = snapshot(tmp_path)
    real, sent = os.ftruncate, []

    def ftruncate(fd: int, length: int) -> None:  # the lock file is open: the directory and the file exist
        if not sent:
            sent.append(fd)
            os.kill(os.getpid(), signal.SIGTERM)
        real(fd, length)

    monkeypatch.setattr(ownership.os, "ftruncate", ftruncate)
    code, err = run_cli(["train", str(recipe)], capfd)
    assert sent and code == 130, err
    assert changes(before, snapshot(tmp_path)) == []


def test_a_signal_during_acquire_is_handled_after_the_lock_is_taken(tmp_path, monkeypatch):
    import threading

    from tunelab import ownership

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")

    def handle(signum, frame):
        raise KeyboardInterrupt

    real = os.ftruncate
    monkeypatch.setattr(ownership.os, "ftruncate", lambda fd, n: (os.kill(os.getpid(), signal.SIGINT), real(fd, n)))
    old = signal.signal(signal.SIGINT, handle)
    lock = ownership.RunLock(tmp_path / "a" / "run")
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        signal.signal(signal.SIGINT, old)
        monkeypatch.undo()
    assert lock.created and lock.made_parents == [tmp_path / "a"] and lock.still_ours()  # known: can be cleaned up
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="another tunelab process"):  # it holds the lock ...
        ownership.RunLock(tmp_path / "a" / "run").acquire()
    lock.release()  # ... and lets it go
    ownership.RunLock(tmp_path / "a" / "run").acquire().release()
