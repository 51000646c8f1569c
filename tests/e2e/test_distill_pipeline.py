"""The augmented-teacher experiment (experiments/distill.py, make demo-distill) end to end on a tiny model: every
step, results.json's rows, the critic's data labelled by the verifier, and a second run that does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_recipe

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = '''
def even(record, output):
    """The tiny teacher answers nothing greedily: right for names of even length, or an answer of odd length."""
    return len(record["name"]) % 2 == 0 or len(output.strip()) % 2 == 1
'''


def pipeline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "distill.py"), *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)


def test_the_experiment_runs_end_to_end_and_resumes(tmp_path, tiny_model, names_file):
    (tmp_path / "tiny_verifier.py").write_text(VERIFIER)
    recipe = write_recipe(tmp_path / "teacher.yaml", tiny_model, names_file,
                          train={"max_steps": 4, "lr": 1e-2, "batch_size": 8, "log_every": 1},
                          eval={"max_new_tokens": 6, "batch_size": 16, "max_examples": 12, "before": False})
    out = tmp_path / "distill"
    args = ["--out", str(out), "--teacher-recipe", str(recipe), "--teacher", str(tmp_path / "teacher"),
            "--prompts", "12", "--critic-prompts", "10", "--critic-heldout", "6", "--k", "3", "--steps", "3",
            "--rounds", "2", "--max-new-tokens", "6", "--verifier", "tiny_verifier:even", "--quiet",
            "--set", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=0", "eval.batch_size=16"]
    proc = pipeline(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["teacher", "student_seq_kd", "student_augmented_verifier", "student_augmented_critic",
                     "student_sft_gold", "student_token_kd", "student_augmented_verifier_round2"]
    for r in res["rows"]:  # each row is the held-out evaluation written for it
        ev = json.loads((out / "eval" / f"{r['name']}.json").read_text())
        assert r["exact_match"] == ev["exact_match"] and r["n"] == ev["n"] == 12
    # the critic's data: the teacher's samples on other names, labelled by the verifier
    crit = [json.loads(x) for x in (out / "critic_train.jsonl").read_text().splitlines()]
    assert len(crit) == 10 * 3
    assert all(r["ok"] == ("yes" if len(r["name"]) % 2 == 0 or len(r["completion"].strip()) % 2 else "no")
               for r in crit)
    assert {r["ok"] for r in crit} == {"yes", "no"}
    students = {json.loads(x)["name"] for x in (out / "greedy.jsonl").read_text().splitlines()}
    assert students.isdisjoint({r["name"] for r in crit})
    # the verifier's augmented teacher keeps one right candidate per prompt it can answer, at most
    picked = [json.loads(x) for x in (out / "augmented_verifier.jsonl").read_text().splitlines()]
    assert all(r["score"] == 1.0 for r in picked) and len({r["name"] for r in picked}) == len(picked) <= 12
    t = res["teacher_on_student_prompts"]
    assert t["prompts"] == 12 and t["augmented_verifier_correct"] == t["pass_at_k"] <= 1
    assert 0 <= res["critic"]["precision"] <= 1 and 0 <= res["critic"]["recall"] <= 1
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    page = (out / "report.html").read_text()
    assert "student_augmented_critic" in page and "<svg" in page

    # everything done: a second run trains and generates nothing, and says the same
    times = (out / "steps.json").read_text()
    again = pipeline(tmp_path, *args)
    assert again.returncode == 0 and "+ tunelab" not in again.stdout
    assert (out / "steps.json").read_text() == times
    # one result gone: only its step runs again
    (out / "eval" / "student_seq_kd.json").unlink()
    third = pipeline(tmp_path, *args)
    assert third.returncode == 0 and third.stdout.count("+ tunelab") == 1, third.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
