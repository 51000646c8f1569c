"""Instruction tuning end to end on the tiny model: a task mixture with held-out templates and a held-out
task, prompt variations and a control set before/after, `tunelab eval --base`, model-generated data
read back for training, and Self-Instruct."""

from __future__ import annotations

import json

import pytest
from conftest import tunelab, write_recipe


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory, tiny_model, names_file):
    tmp = tmp_path_factory.mktemp("instruct")
    control = tmp / "control.jsonl"
    control.write_text(json.dumps({"prompt": "Reverse the name: emma. Answer:", "expected": "amme",
                                   "match": "exact", "kind": "other format"}) + "\n"
                       + json.dumps({"prompt": "Name:", "expected": ["a", "e"], "match": "rouge"}) + "\n")
    recipe = write_recipe(
        tmp / "recipe.yaml", tiny_model, names_file,
        data={"max_length": 64, "validation_size": 12},
        instruct={"tasks": [{"builtin": "reverse", "held_out_templates": [1, 3], "weight": 2},
                            {"builtin": "length"}, {"builtin": "uppercase"}],
                  "held_out_tasks": ["uppercase"], "mixing": "weighted", "total": 64},
        train={"max_steps": 4, "batch_size": 8},
        eval={"max_examples": 4, "variations": "reverse", "control": str(control), "max_new_tokens": 6},
        output={"dir": str(tmp / "run")})
    proc = tunelab("train", str(recipe))
    return tmp / "run", proc


def test_the_mixture_is_reported_and_written(instruct_run):
    run, proc = instruct_run
    assert "mixture (weighted, 64 training examples):" in proc.stderr
    mix = json.loads((run / "mixture.json").read_text())
    assert {k: v["examples"] for k, v in mix["tasks"].items()} == {"reverse": 43, "length": 21, "uppercase": 0}
    assert mix["tasks"]["reverse"]["held_out_templates"] == ["reverse/1", "reverse/3"]
    assert mix["tasks"]["uppercase"]["held_out_task"]


def test_per_task_variation_and_control_scores_before_and_after(instruct_run):
    run, proc = instruct_run
    ev = json.loads((run / "eval.json").read_text())
    for res in (ev, ev["before"]):
        cells = res["by_task"]["reverse"]["templates"]
        assert len(cells) == 8 and cells["1"]["held_out"] and not cells["0"]["held_out"]
        assert all(c["n"] == 4 for c in cells.values())
        assert set(res["by_task"]) == {"reverse", "length", "uppercase"}
        assert all(c["held_out"] for c in res["by_task"]["uppercase"]["templates"].values())
        assert "held_out_exact_match" in res and "seen_exact_match" in res
        var = res["variations"]
        assert len(var["templates"]) == 8 and var["worst"] <= var["mean"]
        assert [k for k, c in var["templates"].items() if c["held_out"]] == ["reverse/1", "reverse/3"]
        assert res["control"]["n"] == 2 and set(res["control"]["by_kind"]) == {"other format", "control"}
    for line in ("exact match per task and template:", "prompt variations (4 items each",
                 "control set (what else changed):", "reverse held out mean"):
        assert line in proc.stdout


def test_eval_scores_variations_for_the_base_and_the_tuned_model(instruct_run, tmp_path):
    run, _ = instruct_run
    out = tmp_path / "eval.json"
    proc = tunelab("eval", str(run), "eval.variations=length", "--base", "--out", str(out))
    res = json.loads(out.read_text())
    assert len(res["variations"]["templates"]) == 5 and len(res["base"]["variations"]["templates"]) == 5
    # length was trained on all its templates: none is held out
    assert not any(c["held_out"] for c in res["variations"]["templates"].values())
    header = [line for line in proc.stdout.splitlines() if line.strip().startswith("task/template")]
    assert header and header[0].split()[1:] == ["base", "tuned"]


def test_model_generated_alpaca_data_trains_a_model(tmp_path, tiny_model, names_file):
    """generate -> train round trip: a model's outputs, written as JSONL, read back as Alpaca records."""
    seeds = tmp_path / "tasks.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Reverse the name {n}.", "input": "", "output": "?"}) + "\n"
                             for n in ("emma", "olivia", "noah", "liam", "ava", "mia")))
    gen = tmp_path / "gen.jsonl"
    tunelab("generate", str(tiny_model), "--input", str(seeds), "--prompt-field", "instruction", "--out", str(gen),
            "--temperature", "1.0", "--n", "2", "--max-new-tokens", "6", "--top-p", "0.9")
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(rows) == 12 and all({"instruction", "input", "completion"} <= set(r) for r in rows)
    rows = [{**r, "completion": r["completion"] or "x"} for r in rows]  # a random tiny model may say nothing
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          data={"train": str(gen), "format": "alpaca", "columns": {"output": "completion"},
                                "validation_size": 2, "unique_by": None, "max_length": 256},
                          train={"max_steps": 2, "batch_size": 2}, eval={"generate": False})
    proc = tunelab("train", str(recipe), "eval.before=false")
    assert "data: 10 train, 2 validation" in proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_pool_re_answered_through_the_alpaca_recipe_trains(tmp_path, tiny_model):
    """The README's re-answering commands: generate --recipe recipes/alpaca_sft.yaml renders instruction and
    input as the Alpaca prompt; training takes the new answers from completion."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recipe, seeds = root / "recipes" / "alpaca_sft.yaml", root / "data" / "seed_tasks.jsonl"
    answers = tmp_path / "answers.jsonl"
    tunelab("--quiet", "generate", str(tiny_model), "--recipe", str(recipe), f"data.train={seeds}",
            "data.validation_size=0", "--max-new-tokens", "4", "--out", str(answers))
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 14 and all("### Instruction:\n" + r["instruction"] in r["prompt"] for r in rows)
    assert all("### Input:\n" + r["input"] in r["prompt"] for r in rows if r["input"])
    rows = [{**r, "completion": r["completion"].strip() or "x"} for r in rows]  # a random tiny model may say nothing
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tunelab("train", str(recipe), f"model={tiny_model}", f"data.train={answers}",
                   "data.columns.output=completion", "train.max_steps=2", "eval.before=false",
                   "eval.max_new_tokens=4", f"output.dir={tmp_path / 'run'}")
    assert "data: 11 train, 3 validation" in proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_self_instruct_runs_end_to_end(tmp_path, tiny_model):
    pool = tmp_path / "pool.jsonl"
    proc = tunelab("generate", str(tiny_model), "--self-instruct", "data/seed_tasks.jsonl", "--out", str(pool),
                   "--rounds", "2", "--per-round", "3", "--max-new-tokens", "24",
                   cwd=__import__("pathlib").Path(__file__).resolve().parents[2])
    assert "self-instruct: 6 generated," in proc.stderr
    kept = int(proc.stderr.split(" kept")[0].rsplit(" ", 1)[1])
    rows = [json.loads(line) for line in pool.read_text().splitlines()]
    assert len(rows) == kept and all({"instruction", "input", "output", "round"} <= set(r) for r in rows)


def test_sni_tasks_train_and_score_unseen_tasks(tmp_path, tiny_model):
    """Super-NaturalInstructions layout: train on some task files, evaluate on unseen ones."""
    import shutil
    from pathlib import Path

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shipped = Path(__file__).resolve().parents[2] / "data" / "sni_names"
    for name in ("task001_reverse_name", "task003_first_letter", "task012_longer_name"):
        shutil.copy(shipped / f"{name}.json", tasks)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_model}\n"
        f"sni: {{dir: {tasks}, eval_tasks: [task012_longer_name], positive: 0, train_instances: 8, "
        "eval_instances: 4}\n"
        "data: {max_length: 400}\ntrain: {max_steps: 2, batch_size: 4}\n"
        f"eval: {{max_new_tokens: 4}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    proc = tunelab("train", str(recipe))
    assert "held out (evaluated): task012_longer_name" in proc.stderr
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["by_task"]) == {"task012_longer_name"} and ev["n"] == 4
    assert 0 <= ev["rouge_l"] <= 1 and "held_out_exact_match" in ev
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["sni"]["train_tasks"] == {"task001_reverse_name": 8, "task003_first_letter": 8}
