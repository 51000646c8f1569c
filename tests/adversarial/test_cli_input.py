"""What reaches the commands besides recipes and data: interactive input, texts to classify, the files of a
run that `report` reads. Each is bounded and refused in one line, never a hang or a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tunelab, write_recipe
from guard import changes, one_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model, names_file) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_model, names_file, train={"max_steps": 1},
                          eval={"max_examples": 2, "max_new_tokens": 2})
    tunelab("--quiet", "train", str(recipe))
    return tmp / "run"


def _chat(model: Path, data: bytes) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "--quiet", "chat", str(model), "--template", "chatml",
                           "--max-new-tokens", "2"], input=data, capture_output=True, timeout=120)
    proc.seconds = time.time() - t0  # type: ignore[attr-defined]
    return proc


def test_chat_refuses_a_line_of_megabytes_at_once(tiny_chat_model):
    proc = _chat(tiny_chat_model, b"a" * 5_000_000 + b"\nhello\n")
    one_line(proc.returncode, proc.stderr.decode(), "chat: an input line is longer than 20000 characters")
    assert proc.seconds < 60  # type: ignore[attr-defined]


def test_chat_refuses_bytes_that_are_not_utf8(tiny_chat_model):
    proc = _chat(tiny_chat_model, b"hello \xff\xfe there\n")
    one_line(proc.returncode, proc.stderr.decode(), "chat: the input is not UTF-8 text")


def test_chat_still_answers_ordinary_lines(tiny_chat_model):
    proc = _chat(tiny_chat_model, b"hello\nbye\n")
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().count("assistant>") == 2


def test_predict_refuses_an_empty_text(tmp_path, capfd):
    import yaml

    run = tmp_path / "cls"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "classification", "model": "/nonexistent/m",
                                                     "data": {"train": str(tmp_path / "x.txt")},
                                                     "classify": {"text": "Name: {name}.", "label": "{name}"}}))
    for text in ("", "   "):
        code, err = run_cli(["predict", str(run), text], capfd)
        one_line(code, err, "predict: empty text: nothing to classify")


GARBAGE = [b"", b"{", b"\xff\xfe", b"[]", b"null", b"1e999999", b'{"exact_match": "x", "n": []}',
           b'{"before": 3, "steps": "many"}', b"[" * 100_000 + b"]" * 100_000, b'{"accuracy": 0.5, "labels": 7}']


@pytest.mark.parametrize("name", ["eval.json", "before.json", "data_stats.json", "data_samples.json",
                                  "metrics.jsonl", "predictions.jsonl", "config.yaml"])
@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_report_on_a_damaged_run_file(finished_run, tmp_path, name, data, capfd):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / name).write_bytes(data)
    before = snapshot(tmp_path, skip=(run,))
    code, err = run_cli(["report", str(run), "--out", str(tmp_path / "r.html")], capfd)
    if code != 0:
        one_line(code, err, "")
    assert changes(before, snapshot(tmp_path, skip=(run,))) in ([], ["+r.html"])


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                    max_leaves=20)
KEYS = st.sampled_from(["exact_match", "accuracy", "n", "steps", "before", "val_loss", "by_task", "variations",
                        "control", "confusion", "labels", "macro_f1", "split", "train_time_s", "samples"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(KEYS, JSON, max_size=6), st.sampled_from(["eval.json", "before.json"]))
def test_report_on_any_json_in_a_run_file_is_a_page_or_one_line(finished_run, tmp_path_factory, obj, name):
    """Property: whatever JSON object a run's eval.json holds, report writes its page or says one line."""
    from tunelab.errors import TunelabError
    from tunelab.report import render_run

    run = Path(shutil.copytree(finished_run, tmp_path_factory.mktemp("h") / "run"))
    (run / name).write_text(json.dumps(obj))
    try:
        render_run(run)
    except TunelabError as e:
        assert "\n" not in str(e)
