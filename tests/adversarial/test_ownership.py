"""Ownership: tunelab deletes or replaces only what it made. Never a directory holding what it reads, never
a directory it did not make, never a run's own files as an output, never a device node; one writer per run
directory; a resume refuses data whose text changed. Each case: one line, exit 2, and the tree unchanged."""

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
import yaml
from conftest import tunelab, write_recipe
from guard import changes, one_line, refused, run_cli, snapshot


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, names_file) -> Path:
    """A finished LoRA run (each test copies it before changing anything)."""
    tmp = tmp_path_factory.mktemp("lora_run")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_model, names_file, train={"max_steps": 2},
                          eval={"max_examples": 4, "max_new_tokens": 4, "before": False})
    tunelab("--quiet", "train", str(recipe))
    return tmp / "run"


@pytest.fixture
def run(tmp_path, lora_run) -> Path:
    return Path(shutil.copytree(lora_run, tmp_path / "run", symlinks=True))


@pytest.fixture
def user_dir(tmp_path, tiny_model, names_file) -> Path:
    """A user's project folder: a recipe, its data and notes, nothing tunelab made."""
    d = tmp_path / "project"
    d.mkdir()
    data = d / "names.txt"
    shutil.copy(names_file, data)
    (d / "notes.md").write_text("my notes\n")
    write_recipe(d / "recipe.yaml", tiny_model, data, train={"max_steps": 2}, eval={"before": False})
    return d


# ---- output.overwrite and output.dir


def test_overwrite_refuses_the_recipes_own_folder(user_dir, capfd):
    line = refused(user_dir, ["train", str(user_dir / "recipe.yaml"), f"output.dir={user_dir}",
                                 "output.overwrite=true"], "which this command reads", capfd)
    assert "overwrite" not in line.split(str(user_dir))[-1]


def test_overwrite_refuses_the_base_models_folder(tmp_path, tiny_model, names_file, capfd):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    recipe = write_recipe(tmp_path / "r" / "recipe.yaml", model, names_file)
    refused(tmp_path, ["train", str(recipe), f"output.dir={model}", "output.overwrite=true"],
               "which this command reads", capfd)


def test_overwrite_refuses_a_folder_tunelab_did_not_make(tmp_path, tiny_model, names_file, capfd):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("chapter 1")
    recipe = write_recipe(tmp_path / "r" / "recipe.yaml", tiny_model, names_file)
    line = refused(tmp_path, ["train", str(recipe), f"output.dir={theirs}", "output.overwrite=true"],
                      "not made by tunelab (it holds thesis.tex)", capfd)
    assert "choose another directory" in line
    # without the flag, the refusal does not recommend it
    line = refused(tmp_path, ["train", str(recipe), f"output.dir={theirs}"], "did not make", capfd)
    assert "overwrite" not in line.split(str(theirs))[1]


def test_overwrite_replaces_a_run_tunelab_made(run, tmp_path, capfd):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (run / ".tunelab").exists()
    (run / "eval.json").write_text("{}")  # replaced by the new run's
    code, err = run_cli(["train", str(run), f"output.dir={run}", "output.overwrite=true", "train.max_steps=1"],
                        capfd)
    assert code == 0, err
    assert json.loads((run / "eval.json").read_text())["steps"] == 1 and cfg["train"]["max_steps"] == 2


def test_overwrite_replaces_a_run_written_before_the_marker(run, capfd):
    (run / ".tunelab").unlink()  # a run directory of an earlier release: only a run's own entries
    code, err = run_cli(["train", str(run), f"output.dir={run}", "output.overwrite=true", "train.max_steps=1"],
                        capfd)
    assert code == 0, err
    (run / "notes.md").write_text("mine")  # now marked again, but a foreign file in an unmarked one is refused
    (run / ".tunelab").unlink()
    refused(run.parent, ["train", str(run), f"output.dir={run}", "output.overwrite=true"],
               "not made by tunelab (it holds", capfd)


def test_output_dir_holding_the_data_is_refused_even_when_marked(run, names_file, capfd):
    data = run / "names.txt"
    shutil.copy(names_file, data)
    recipe = write_recipe(run.parent / "r2" / "recipe.yaml", Path(yaml.safe_load((run / "config.yaml")
                                                                                 .read_text())["model"]["name"]), data)
    refused(run.parent, ["train", str(recipe), f"output.dir={run}", "output.overwrite=true"],
               "holds " + str(data), capfd)


def test_output_dir_that_is_a_dangling_link_or_below_a_file(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "r" / "recipe.yaml", tiny_model, names_file)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(tmp_path, ["train", str(recipe), f"output.dir={tmp_path / 'dangling'}"], "symbolic link to nothing",
               capfd)
    (tmp_path / "afile").write_text("x")
    refused(tmp_path, ["train", str(recipe), f"output.dir={tmp_path / 'afile' / 'run'}"], "afile", capfd)


# ---- merge, student, export: outputs are never inputs, --force replaces only what tunelab made


@pytest.mark.parametrize("out", ["run", "run/adapter", "model", "run/sub"])
def test_merge_never_writes_over_what_it_reads(run, tiny_model, tmp_path, out, capfd):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = str(model)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(tmp_path, ["merge", str(run), str(tmp_path / out), "--force"], "which this command reads", capfd)


def test_merge_force_replaces_only_its_own_output(run, tmp_path, capfd):
    out = tmp_path / "merged"
    code, err = run_cli(["merge", str(run), str(out)], capfd)
    assert code == 0, err
    assert (out / ".tunelab").exists() and (out / "config.json").exists()
    code, err = run_cli(["merge", str(run), str(out), "--force"], capfd)  # its own: replaced
    assert code == 0, err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    refused(tmp_path, ["merge", str(run), str(theirs), "--force"], "not made by tunelab", capfd)
    line = refused(tmp_path, ["merge", str(run), str(theirs)], "holds files tunelab did not make", capfd)
    assert "--force" not in line.split(str(theirs))[1]


def test_student_onto_its_teacher(tiny_model, tmp_path, capfd):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    refused(tmp_path, ["student", str(model), str(model), "--layers", "0", "--force"], "which this command reads",
               capfd)


def _classification_run(tmp_path: Path) -> Path:
    """A directory holding only a classification run's config.yaml (the commands refuse before loading)."""
    run = tmp_path / "cls"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "classification", "model": "/nonexistent/m",
                                                     "data": {"train": str(tmp_path / "x.txt")},
                                                     "classify": {"text": "{text}", "label": "{text}"}}))
    return run


def test_export_onto_its_run(tmp_path, capfd):
    run = _classification_run(tmp_path)
    refused(tmp_path, ["export", str(run), str(run), "--force"], "which this command reads", capfd)


# ---- output files


@pytest.mark.parametrize("name", ["config.yaml", "adapter/adapter_model.safetensors", "eval.json"])
def test_eval_out_never_replaces_a_runs_own_file(run, name, capfd):
    refused(run.parent, ["eval", str(run), "--out", str(run / name)], "which this command reads", capfd)


def test_eval_out_through_a_link_into_the_run(run, tmp_path, capfd):
    (tmp_path / "link.yaml").symlink_to(run / "config.yaml")
    refused(tmp_path, ["eval", str(run), "--out", str(tmp_path / "link.yaml")], "which this command reads", capfd)


def test_report_out_into_a_compared_run(run, lora_run, capfd):
    refused(run.parent, ["report", str(run), str(lora_run), "--out", str(run / "eval.json")],
               "which this command reads", capfd)


def test_predict_output_is_its_input(tmp_path, capfd):
    run = _classification_run(tmp_path)
    f = tmp_path / "texts.jsonl"
    f.write_text('{"text": "emma"}\n')
    refused(tmp_path, ["predict", str(run), "--input", str(f), "--output", str(f)], "which this command reads",
               capfd)


def test_output_files_are_never_devices_or_fifos(run, tmp_path, capfd):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(tmp_path, ["eval", str(run), "--out", str(fifo)], "not a regular file", capfd)
    refused(tmp_path, ["report", str(run), str(run), "--out", str(fifo)], "not a regular file", capfd)
    before = os.stat("/dev/null")
    code, err = run_cli(["eval", str(run), "--out", "/dev/null"], capfd)
    one_line(code, err, "not a regular file")
    after = os.stat("/dev/null")
    assert (before.st_mode, before.st_rdev) == (after.st_mode, after.st_rdev)


def test_atomic_writes_refuse_special_files(tmp_path):
    from tunelab import atomic
    from tunelab.errors import TunelabError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TunelabError, match="not a regular file"):
        atomic.write_text(fifo, "x")
    assert fifo.is_fifo()
    target = tmp_path / "real.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    atomic.write_text(tmp_path / "link.json", "new")  # the file the link names is replaced, the link stays
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"


# ---- one writer per run directory; resume checks content


def _start_training(recipe: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_FAULT": ""}
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "--quiet", "train", str(recipe), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int = 1) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(lines) >= step:
            return
        time.sleep(0.2)
    err = proc.stderr.read() if proc.poll() is not None else ""
    raise AssertionError(f"training did not reach step {step}: exit {proc.poll()} {err}")


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file,
                          train={"max_steps": 100000, "checkpoint_every": 1, "keep_checkpoints": 1},
                          eval={"before": False})
    run = tmp_path / "run"
    first = _start_training(recipe)
    try:
        _wait_for_step(run, first)
        for extra in ([], ["train.lr=1e-3", "output.overwrite=true"], ["--resume"]):
            code, err = run_cli(["train", str(recipe), *extra], capfd)
            line = one_line(code, err, "another tunelab process is writing this run directory (pid")
            assert str(first.pid) in line
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel dropped the lock with the process: the run resumes
    code, err = run_cli(["train", str(recipe), "train.max_steps=2", "--resume"], capfd)
    assert code in (0, 2), err  # (max_steps changed: the schedule differs; either way not "another process")
    assert "another tunelab process" not in err


def test_resume_refuses_data_whose_text_changed(tmp_path, tiny_model, names_file, capfd):
    data = tmp_path / "names.txt"
    shutil.copy(names_file, data)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, data, train={"max_steps": 4, "checkpoint_every": 2},
                          eval={"before": False})
    env = {"TUNELAB_FAULT": "kill-step:3"}
    proc = tunelab("--quiet", "train", str(recipe), check=False, env=env)
    assert proc.returncode == -signal.SIGKILL
    lines = data.read_text().splitlines()
    data.write_text("\n".join(x[::-1] for x in lines) + "\n")  # same number of records, other text
    run = tmp_path / "run"
    before = snapshot(run)
    code, err = run_cli(["train", str(recipe), "--resume"], capfd)
    one_line(code, err, "the training data changed since this checkpoint was written")
    assert changes(before, snapshot(run)) == []
    data.write_text("\n".join(lines) + "\n")  # the original text: resumes
    code, err = run_cli(["train", str(recipe), "--resume"], capfd)
    assert code == 0, err


def test_before_json_is_rescored_when_the_evaluation_text_changes(tmp_path):
    from tunelab.config import Config
    from tunelab.data.formats import Example
    from tunelab.evaluation import before_key

    cfg = Config()
    a = [Example([1, 2, 3], [-100, 2, 3], "p", "c", "f:1")]
    b = [Example([1, 2, 4], [-100, 2, 4], "p", "d", "f:1")]  # same place, other text
    assert before_key(cfg, "validation", a) != before_key(cfg, "validation", b)
    assert before_key(cfg, "validation", a) == before_key(cfg, "validation", list(a))


def test_resume_with_another_lora_rank_is_one_line(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file,
                          train={"max_steps": 4, "checkpoint_every": 2}, eval={"before": False})
    proc = tunelab("--quiet", "train", str(recipe), check=False, env={"TUNELAB_FAULT": "kill-step:3"})
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    before = snapshot(run)
    code, err = run_cli(["train", str(recipe), "--resume", "lora.r=8"], capfd)
    one_line(code, err, "(was lora.r changed?)")
    assert changes(before, snapshot(run)) == []


# ---- cases a review found (each destroyed or overwrote a file, or gave a traceback)


def test_a_tilde_output_dir_is_the_folder_named_tilde(run, names_file, tmp_path, monkeypatch, capfd):
    """`~` in output.dir is a folder's name here (as for open()): the check and the write agree on it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "~").mkdir()
    theirs = Path(shutil.copytree(run, tmp_path / "~" / "r"))
    data = theirs / "names.txt"
    shutil.copy(names_file, data)
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]
    recipe = write_recipe(tmp_path / "r2" / "recipe.yaml", Path(model), data)
    refused(tmp_path / "~", ["train", str(recipe), "output.dir=~/r", "output.overwrite=true"], "holds", capfd)


def test_force_never_replaces_a_directory_being_trained(run, tmp_path, capfd):
    from tunelab import ownership

    target = tmp_path / "training"
    lock = ownership.RunLock(target).acquire()  # as a training process holds it
    try:
        ownership.mark(target, "run")
        (target / "config.yaml").write_text("name: x\n")
        refused(target, ["merge", str(run), str(target), "--force"], "another tunelab process is writing", capfd)
    finally:
        lock.release()


def test_a_symbolic_link_loop_as_data_is_one_line(tmp_path, tiny_model, names_file, capfd):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    refused(tmp_path, ["train", str(recipe), f"data.train.path={tmp_path / 'loop1'}"], "loop1", capfd)
    recipe.write_text(recipe.read_text().replace(str(names_file), str(tmp_path / "loop1")))
    refused(tmp_path, ["train", str(recipe)], "loop1", capfd)


def test_an_output_dir_that_is_not_utf8_is_one_line(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    refused(tmp_path, ["train", str(recipe), f"output.dir={tmp_path}/r\udcff\udcfe"], "not valid UTF-8", capfd)


def test_sweep_never_overwrites_tables_it_did_not_write(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "r" / "recipe.yaml", tiny_model, names_file)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("my notes")
    (mine / "sweep.csv").write_text("name\nalice\n")
    refused(tmp_path, ["sweep", str(recipe), "--over", "lora.r=2", "--out", str(mine)], "sweep.", capfd)
    data = tmp_path / "data" / "names.txt"
    data.parent.mkdir()
    shutil.copy(names_file, data)
    recipe = write_recipe(tmp_path / "r" / "recipe.yaml", tiny_model, data)
    refused(tmp_path, ["sweep", str(recipe), "--over", "lora.r=2", "--out", str(data.parent)],
               "which this command reads", capfd)


def test_output_files_of_the_user_need_force(run, tmp_path, capfd):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for argv in (["eval", str(run), "--out", str(notes)], ["report", str(run), str(run), "--out", str(notes)]):
        refused(tmp_path, argv, "output file exists (--force replaces it)", capfd)
    page = tmp_path / "compare.html"
    for _ in range(2):  # a page tunelab's report wrote is replaced without --force
        code, err = run_cli(["report", str(run), str(run), "--out", str(page)], capfd)
        assert code == 0, err


def test_a_run_of_an_earlier_release_killed_mid_write_is_still_a_run(tmp_path):
    from tunelab import ownership

    run = tmp_path / "old"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", ".eval.json.tmp-4242"):
        (run / name).write_text("x")
    (run / ".adapter-k2j4").mkdir()
    assert ownership.is_legacy_run(run) and ownership.foreign_entries(run) == []
    (run / ".notes").write_text("mine")  # a hidden file of the user's is not a leftover
    assert not ownership.is_legacy_run(run)
    assert ownership.foreign_entries(run) == [".adapter-k2j4", ".eval.json.tmp-4242", ".notes", "config.yaml",
                                              "metrics.jsonl"]
