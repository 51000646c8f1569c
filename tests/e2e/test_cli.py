"""End to end: the real `tunelab` CLI as a subprocess on a tiny Llama built in the test."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_lora_writes_the_run_directory(recipe: Path):
    proc = tunelab("train", str(recipe), "train.max_steps=4", "eval.display={name}")
    run = recipe.parent / "run"
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "before.json", "predictions.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/step-4"):
        assert (run / name).exists(), name
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("loss" in r and r["loss"] > 0 for r in rows)
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["exact_match"] <= 1.0 and result["n"] == 20
    assert "val_loss" in result and "before" in result
    phases = result["phase_times_s"]  # each phase's seconds, also the log's last time line
    assert list(phases) == ["load", "eval_before", "train", "save", "eval_after"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= result["total_time_s"] + 0.5
    assert f"training {phases['train']:.0f} s" in proc.stderr and f"total {result['total_time_s']:.0f} s" in proc.stderr
    assert "before fine-tuning:" in proc.stdout and "after fine-tuning:" in proc.stdout
    assert "(expected: " in proc.stdout
    table = [line for line in proc.stdout.splitlines() if "(expected: " in line]
    first = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])
    assert table[3].strip().startswith(first["input"] + " → ") and "Reverse" not in table[3]
    assert "trainable parameters:" in proc.stderr
    # a second run into the same directory refuses rather than clobbering it
    again = tunelab("train", str(recipe), "train.max_steps=4", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_full_training_lowers_the_loss(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"mode": "full", "max_steps": 30, "lr": 3e-3, "batch_size": 16, "eval_every": 10},
                          eval={"before": False, "during_training": True, "max_examples": 8})
    tunelab("train", str(recipe))
    run = tmp_path / "run"
    rows = _metrics(run)
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert all(0 <= r["exact_match"] <= 1 for r in rows if "val_loss" in r)
    assert rows[19]["val_loss"] < rows[9]["val_loss"]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5
    assert (run / "model" / "config.json").exists() and not (run / "adapter").exists()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_mid_run_matches_the_uninterrupted_run(tmp_path, tiny_model, names_file, mode):
    common = {"mode": mode, "max_steps": 8, "batch_size": 8, "grad_accum": 2, "checkpoint_every": 3,
              "keep_checkpoints": 5, "lr": 3e-3, "dropout": 0.1}
    a = write_recipe(tmp_path / "a" / "r.yaml", tiny_model, names_file, train=common,
                     eval={"before": False, "generate": False})
    b = write_recipe(tmp_path / "b" / "r.yaml", tiny_model, names_file, train=common,
                     eval={"before": False, "generate": False})
    tunelab("train", str(a))
    tunelab("train", str(b))
    run_b = tmp_path / "b" / "run"
    # Simulate a crash after step 5: only the step-3 checkpoint had been written; metrics ran ahead.
    for name in ("checkpoints/step-6", "checkpoints/step-8", "adapter", "model", "eval.json"):
        shutil.rmtree(run_b / name, ignore_errors=True) if (run_b / name).is_dir() else (run_b / name).unlink(
            missing_ok=True)
    lines = (run_b / "metrics.jsonl").read_text().splitlines()[:5]
    (run_b / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = tunelab("train", str(b), "--resume")
    assert "resuming from" in proc.stderr and "step-3" in proc.stderr
    ra, rb = _metrics(tmp_path / "a" / "run"), _metrics(run_b)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
    name = "adapter/adapter_model.safetensors" if mode == "lora" else "model/model.safetensors"
    wa, wb = load_file(tmp_path / "a" / "run" / name), load_file(run_b / name)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


def test_eval_merge_and_plain_peft_loading(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"max_steps": 6, "lr": 2e-2}, lora={"r": 4, "alpha": 16, "targets": ["all-linear"]})
    tunelab("train", str(recipe))
    run = tmp_path / "run"
    proc = tunelab("eval", str(run), "--out", str(tmp_path / "m.json"))
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = json.loads((run / "eval.json").read_text())
    assert metrics["exact_match"] == saved["exact_match"]
    assert abs(metrics["val_loss"] - saved["val_loss"]) < 1e-5
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 20
    assert "test_loss" not in metrics  # scored on the validation split: its loss is val_loss
    # another file scored as the test split: its own loss beside the validation split's
    scored = {}
    for name, words in (("a", ["zynwakurgi", "dehysgy", "brotam"]), ("b", ["ab", "cd", "ef", "gh"])):
        (tmp_path / f"{name}.txt").write_text("\n".join(words) + "\n")
        proc = tunelab("eval", str(run), f"data.test.path={tmp_path / name}.txt", "data.test.text_field=name")
        scored[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["a"]["split"] == "test" and scored["a"]["n"] == 3 and scored["b"]["n"] == 4
    assert scored["a"]["val_loss"] == scored["b"]["val_loss"] == metrics["val_loss"]
    assert scored["a"]["test_loss"] != scored["b"]["test_loss"]
    assert all(s["test_loss"] != s["val_loss"] for s in scored.values())

    out = tmp_path / "merged"
    tunelab("merge", str(run), str(out))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
        adapter_logits = peft_model(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # training changed something
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
    # merging again into a non-empty directory needs --force
    assert tunelab("merge", str(run), str(out), check=False).returncode == 2
    tunelab("merge", str(run), str(out), "--force")


def test_eval_on_a_recipe_evaluates_its_model(recipe: Path):
    proc = tunelab("eval", str(recipe), "eval.max_examples=5", "eval.max_new_tokens=1")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 5 and "val_loss" in metrics
    # one new token cannot hold a reversed name: said up front, not silently scored as wrong
    assert "warning: 5 of 5 evaluation completions have more tokens than eval.max_new_tokens=1" in proc.stderr


def test_data_show_marks_supervised_tokens(recipe: Path):
    proc = tunelab("data", "show", str(recipe), "-n", "3", "--ids")
    header, out = proc.stdout.split("\n", 1)
    assert "⟦ ⟧" in header
    assert out.count("⟦") == 3 and out.count("⟧") == 3
    first = out.split("--- ")[1]
    assert "Reverse the name:" in first.split("⟦")[0]  # the prompt is outside the marks
    assert "<eos>⟧" in out  # EOS carries loss
    assert "length_mean=" in out and "supervised_tokens=" in out
    # data.synthetic adds name-like training records; the statistics say how many
    # (overrides may also come after the options)
    out = tunelab("data", "show", str(recipe), "data.synthetic.field=name", "-n", "1", "data.synthetic.count=40",
                  "data.synthetic.order=3").stdout
    assert "synthetic: field=name, order=3, asked=40, records=" in out
    # data.completion_tokens=chars: the same answers, one token a letter, so more supervised tokens
    def supervised(*extra):
        text = tunelab("data", "show", str(recipe), "-n", "1", *extra).stdout
        return int(re.search(r"train: .*supervised_tokens=(\d+)", text).group(1))

    assert supervised("data.completion_tokens=chars") > supervised()
    bad = tunelab("data", "show", str(recipe), "-n", "1", "--nope", check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --nope" in bad.stderr


def test_split_seed_holds_out_the_same_names_whatever_the_seed(recipe: Path):
    def held_out(*extra):
        return tunelab("data", "show", str(recipe), "--split", "validation", "-n", "40", *extra).stdout

    assert held_out("train.seed=1", "data.split_seed=0") == held_out()
    assert held_out("train.seed=1") != held_out()
    bad = tunelab("data", "show", str(recipe), "--split", "validation", "data.split_seed=1.5", check=False)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip() == "tunelab: override data.split_seed=1.5: data.split_seed: expected an integer, got 1.5"


def test_overrides_work_on_every_recipe(recipe: Path, tmp_path):
    out = tmp_path / "elsewhere"
    tunelab("train", str(recipe), f"output.dir={out}", "train.max_steps=2", "train.seed=3",
            "eval.before=false", "eval.generate=false")
    cfg = (out / "config.yaml").read_text()
    assert "max_steps: 2" in cfg and "seed: 3" in cfg
    assert len(_metrics(out)) == 2


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_resumes(tmp_path, tiny_model, names_file, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"max_steps": 400, "batch_size": 4, "checkpoint_every": 0},
                          eval={"before": False, "generate": False})
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(recipe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("tunelab: "), err
    done = _metrics(run)[-1]["step"]
    assert 3 <= done < 400
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{done}"]
    resumed = tunelab("train", str(recipe), "--resume")
    assert f"step-{done}" in resumed.stderr
    assert [r["step"] for r in _metrics(run)] == list(range(1, 401))


def test_recipes_lists_the_shipped_recipes():
    out = tunelab("recipes").stdout
    for name in ("reverse_names.yaml", "reverse_names_long.yaml", "vowel_count.yaml"):
        line = next(x for x in out.splitlines() if name in x)
        assert len(line.split(name, 1)[1].strip()) > 10  # with its description


def test_resume_never_deletes_a_directory_that_is_not_a_run(tmp_path, tiny_model, names_file):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    proc = tunelab("train", str(recipe), f"output.dir={keep}", "--resume", check=False)
    assert proc.returncode == 2 and "holds files tunelab did not make" in proc.stderr
    assert (keep / "notes.txt").read_text() == "mine"


def test_resume_refuses_other_data_and_resumes_a_path_into_a_new_directory(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 5},
                          eval={"before": False, "generate": False})
    tunelab("train", str(recipe))
    run = tmp_path / "run"
    other = tunelab("train", str(recipe), "train.seed=7", "--resume", check=False)
    assert other.returncode == 2 and "trained on other data" in other.stderr
    # resume an earlier checkpoint into a fresh directory
    fresh = tmp_path / "branch"
    tunelab("train", str(recipe), f"train.resume={run / 'checkpoints' / 'step-2'}", f"output.dir={fresh}")
    assert (fresh / "config.yaml").exists() and (fresh / "data_stats.json").exists()
    assert [r["step"] for r in _metrics(fresh)] == [3, 4, 5, 6]
    assert _metrics(fresh)[-1]["loss"] == pytest.approx(_metrics(run)[-1]["loss"], abs=1e-6)
    # ... but never into a directory that holds another run
    again = tunelab("train", str(recipe), f"train.resume={run / 'checkpoints' / 'step-2'}", f"output.dir={fresh}",
                    check=False)
    assert again.returncode == 2 and "holds another run" in again.stderr
    assert [r["step"] for r in _metrics(fresh)] == [3, 4, 5, 6]
    # resuming an older checkpoint of the same run drops the later, abandoned ones
    tunelab("train", str(recipe), f"train.resume={run / 'checkpoints' / 'step-4'}", "train.keep_checkpoints=1")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6"]


def test_early_stopping_keeps_the_best_weights(tmp_path, tiny_model, names_file):
    # min_delta is so large that nothing after the first evaluation counts as better: stop after 2 more
    r = write_recipe(tmp_path / "es.yaml", tiny_model, names_file,
                     train={"max_steps": 10, "eval_every": 1, "early_stopping_patience": 2, "min_delta": 100.0,
                            "log_every": 1},
                     eval={"before": False, "generate": False})
    proc = tunelab("train", str(r))
    assert "early stopping at step 3" in proc.stderr
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["stopped_early_at"] == 3 and ev["best_step"] == 1 and ev["best_metric"] == "val_loss"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    best = load_file(str(tmp_path / "run" / "best" / "trainable.safetensors"))
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert len(best) == len(saved)
    for k, v in best.items():  # the adapter written is the best one (step 1), not the last
        assert torch.equal(saved[k.replace(".default", "")], v), k


def test_bos_token_trains_evaluates_and_is_saved_with_the_run(tmp_path, tiny_chat_model, names_file):
    """model.bos_token: every prompt starts with the token in training and generation, and the run's saved
    tokenizer does the same (loading it again with the option adds no second one)."""
    from transformers import AutoTokenizer

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_chat_model, names_file,
                          train={"max_steps": 2, "lr": 5e-3, "batch_size": 8, "log_every": 1},
                          eval={"before": False, "max_examples": 10, "max_new_tokens": 4, "show": 1})
    shown = tunelab("data", "show", str(recipe), "-n", "1", "model.bos_token=<s>").stdout
    assert "<s>Reverse the name: " in shown
    tunelab("train", str(recipe), "model.bos_token=<s>")
    run = tmp_path / "run"
    saved = AutoTokenizer.from_pretrained(run / "adapter")
    assert saved("ava")["input_ids"][0] == saved.convert_tokens_to_ids("<s>")
    first = json.loads((run / "eval.json").read_text())["exact_match"]
    tunelab("eval", str(run))
    assert json.loads((run / "eval.json").read_text())["exact_match"] == first
