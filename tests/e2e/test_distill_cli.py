"""Distillation end to end on tiny models: student cutting, token-level KD (live and cached teacher),
sequence-level KD through tunelab generate, and an augmented teacher (verifier filter, critic scores)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tunelab, write_recipe


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_model, names_file):
    d = tmp_path_factory.mktemp("teacher")
    recipe = write_recipe(d / "teacher.yaml", tiny_model, names_file, train={"max_steps": 8, "lr": 1e-2},
                          eval={"before": False}, output={"dir": str(d / "run")})
    tunelab("--quiet", "train", str(recipe))
    return d / "run"


def test_student_keeps_the_chosen_layers(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    tunelab("student", str(tiny_model), str(tmp_path / "all"), "--keep-every", "1")
    tunelab("student", str(tiny_model), str(tmp_path / "one"), "--layers", "1")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model)
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "all")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(teacher(ids).logits, same(ids).logits, atol=1e-6)
    assert one.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), one.state_dict()
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    with torch.no_grad():  # generation with the KV cache works on the cut model
        one.generate(ids, max_new_tokens=3, do_sample=False)


def test_token_level_kd_live_and_cached(tmp_path, tiny_model, names_file, teacher_run):
    tunelab("student", str(teacher_run), str(tmp_path / "student"), "--layers", "1")
    base = {"train": {"mode": "full", "max_steps": 4, "lr": 1e-3, "log_every": 1}, "eval": {"before": False}}
    kd = {"teacher": str(teacher_run), "alpha": 0.5, "temperature": 2.0}
    live = write_recipe(tmp_path / "live.yaml", tmp_path / "student", names_file, **base, kd=kd,
                        output={"dir": str(tmp_path / "live")})
    proc = tunelab("train", str(live), "train.eval_every=2")
    assert "distilling from" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in rows[1]  # validation mid-run is the plain cross-entropy, as at the end
    cache = tmp_path / "teacher.topk.safetensors"
    cached = write_recipe(tmp_path / "cached.yaml", tmp_path / "student", names_file, **base,
                          kd={**kd, "cache": str(cache), "top_k": 400}, output={"dir": str(tmp_path / "cached")})
    tunelab("train", str(cached))
    assert cache.exists()
    # with k = V the cached teacher gives the live teacher's losses
    a = [json.loads(x)["loss"] for x in (tmp_path / "live" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert b == pytest.approx(a, rel=1e-4)
    again = tunelab("train", str(cached), f"output.dir={tmp_path / 'again'}")
    assert "log-probabilities from" in again.stderr  # reused, not recomputed
    # alpha = 0 is plain SFT: the same losses as a run without a teacher
    sft = write_recipe(tmp_path / "sft.yaml", tmp_path / "student", names_file, **base,
                       output={"dir": str(tmp_path / "sft")})
    tunelab("--quiet", "train", str(sft))
    tunelab("--quiet", "train", str(live), "kd.alpha=0", f"output.dir={tmp_path / 'alpha0'}")
    c = [json.loads(x)["loss"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    d = [json.loads(x)["loss"] for x in (tmp_path / "alpha0" / "metrics.jsonl").read_text().splitlines()]
    assert d == pytest.approx(c, rel=1e-5)
    # a cache computed for other data is refused
    bad = tunelab("--quiet", "train", str(cached), "data.validation_size=50", f"output.dir={tmp_path / 'x'}",
                  check=False)
    assert bad.returncode == 2 and "computed for other data" in bad.stderr
    assert not (tmp_path / "x").exists()
    # and so is a cache computed with another teacher
    other = tunelab("--quiet", "train", str(cached), f"kd.teacher={tiny_model}", f"output.dir={tmp_path / 'y'}",
                    check=False)
    assert other.returncode == 2 and "or another teacher" in other.stderr


def test_sequence_level_and_augmented_teacher(tmp_path, tiny_model, names_file, teacher_run):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    out = tmp_path / "teacher.jsonl"
    tunelab("--quiet", "generate", str(teacher_run), "--recipe", str(recipe), "--limit", "30", "--out", str(out),
            "--max-new-tokens", "8")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 30 and all(r["prompt"].startswith("Reverse the name: ") for r in rows)
    assert all(set(r) >= {"name", "prompt", "completion", "sample"} for r in rows)
    # an augmented teacher: N samples a prompt, scored by a verifier; kept when correct, or weighted
    scored = tmp_path / "scored.jsonl"
    proc = tunelab("generate", str(teacher_run), "--recipe", str(recipe), "--limit", "10", "--n", "3",
                   "--temperature", "1.0", "--out", str(scored), "--verifier", "tunelab.verifiers:reversed_name",
                   "--max-new-tokens", "8")
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == 30 and {r["sample"] for r in rows} == {0, 1, 2}
    assert all(r["score"] == float(r["completion"].strip() == r["name"][::-1]) for r in rows)
    assert "mean score" in proc.stderr
    # the student trains on the teacher's outputs through the ordinary SFT path
    student = write_recipe(tmp_path / "s.yaml", tiny_model, names_file, data={
        "train": str(scored), "prompt": "{prompt}", "completion": "{completion}", "unique_by": None,
        "validation_size": 0, "empty_target": "drop"}, eval={"before": False, "generate": False},
        output={"dir": str(tmp_path / "seqkd")})
    tunelab("--quiet", "train", str(student))
    assert (tmp_path / "seqkd" / "adapter").exists()

    kept = tmp_path / "kept.jsonl"
    tunelab("--quiet", "generate", str(teacher_run), "--recipe", str(recipe), "--limit", "10", "--n", "3",
            "--temperature", "1.0", "--out", str(kept), "--verifier", "tunelab.verifiers:reversed_name",
            "--min-score", "1", "--max-new-tokens", "8")
    kept_rows = [json.loads(x) for x in kept.read_text().splitlines()]
    assert kept_rows == [r for r in rows if r["score"] >= 1]  # same seed: the same samples, filtered
    best = tmp_path / "best.jsonl"
    picked = tunelab("generate", str(teacher_run), "--recipe", str(recipe), "--limit", "10", "--n", "3",
                     "--temperature", "1.0", "--out", str(best), "--verifier", "tunelab.verifiers:reversed_name",
                     "--select", "best", "--max-new-tokens", "8")
    best_rows = [json.loads(x) for x in best.read_text().splitlines()]
    assert len(best_rows) == 10 and "pass@3" in picked.stderr and "best of 3 for 10 of 10 prompts" in picked.stderr
    for b in best_rows:  # the highest score among the prompt's three samples
        assert b["score"] == max(r["score"] for r in rows if r["name"] == b["name"])
    # tunelab score: the same selection from the samples already written, without a model
    again = tmp_path / "again.jsonl"
    rescored = tunelab("score", str(scored), "--verifier", "tunelab.verifiers:reversed_name", "--select", "best",
                       "--out", str(again))
    assert [json.loads(x) for x in again.read_text().splitlines()] == best_rows
    assert "pass@3" in rescored.stderr and "best of 3 for 10 of 10 prompts" in rescored.stderr
    # --skip: disjoint prompt sets (greedy, so the same completions as the first run's)
    tail = tmp_path / "tail.jsonl"
    tunelab("--quiet", "generate", str(teacher_run), "--recipe", str(recipe), "--skip", "20", "--limit", "10",
            "--out", str(tail), "--max-new-tokens", "8")
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert [json.loads(x) for x in tail.read_text().splitlines()] == first[20:30]
    weighted = write_recipe(tmp_path / "w.yaml", tiny_model, names_file, data={
        "train": str(scored), "prompt": "{prompt}", "completion": "{completion}", "unique_by": None,
        "validation_size": 0, "empty_target": "drop", "weight_field": "score"},
        eval={"before": False, "generate": False}, output={"dir": str(tmp_path / "weighted")})
    tunelab("--quiet", "train", str(weighted))


def test_first_accepted_tries_greedy_then_samples_only_the_unanswered(tmp_path, tiny_model, names_file, teacher_run):
    """--select first: the greedy answer when the verifier takes it, else the first accepted of up to --n samples."""
    (tmp_path / "tv.py").write_text(  # the tiny teacher answers nothing greedily: right for even names only
        "def even(record, output):\n    return len(record['name']) % 2 == 0 or len(output.strip()) % 2 == 1\n")
    env = {"PYTHONPATH": str(tmp_path)}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    greedy = tmp_path / "greedy.jsonl"
    tunelab("--quiet", "generate", str(teacher_run), "--recipe", str(recipe), "--limit", "16", "--out", str(greedy),
            "--max-new-tokens", "6", "--verifier", "tv:even", env=env)
    first = tmp_path / "first.jsonl"
    proc = tunelab("generate", str(teacher_run), "--recipe", str(recipe), "--limit", "16", "--out", str(first),
                   "--max-new-tokens", "6", "--verifier", "tv:even", "--select", "first", "--n", "4",
                   "--temperature", "1.5", "--min-score", "1", env=env)
    g = {r["name"]: r for r in map(json.loads, greedy.read_text().splitlines())}
    picked = [json.loads(x) for x in first.read_text().splitlines()]
    assert all(r["score"] == 1.0 and 0 <= r["sample"] <= 4 for r in picked)
    assert len({r["name"] for r in picked}) == len(picked)
    for r in picked:  # greedy first: kept when right, else a sample
        assert (r["sample"] == 0) == (g[r["name"]]["score"] == 1.0)
        if r["sample"] == 0:
            assert r["completion"] == g[r["name"]]["completion"]
    right = sum(r["score"] == 1.0 for r in g.values())
    assert right < len(picked)  # samples answered some prompts the greedy answer did not
    assert f"{len(picked)} of 16 prompts answered" in proc.stderr and f"({right} by the greedy answer" in proc.stderr
    bad = tunelab("generate", str(teacher_run), "--recipe", str(recipe), "--out", str(tmp_path / "x.jsonl"),
                  "--verifier", "tv:even", "--select", "first", "--temperature", "1", env=env, check=False)
    assert bad.returncode == 2 and "--min-score" in bad.stderr and not (tmp_path / "x.jsonl").exists()


def test_a_classifier_as_critic(tmp_path, tiny_model, names_file, teacher_run):
    data = tmp_path / "judge.jsonl"
    names = names_file.read_text().split()[:60]
    data.write_text("".join(json.dumps({"name": n, "output": n[::-1] if i % 2 else n, "ok": "yes" if i % 2 else "no"})
                            + "\n" for i, n in enumerate(names)))
    critic = write_recipe(tmp_path / "critic.yaml", tiny_model, names_file, task="classification", data={
        "train": str(data), "unique_by": None, "validation_size": 10, "max_length": 48},
        classify={"text": "{name} reversed is {output}. Correct?", "label": "{ok}"},
        train={"max_steps": 3}, eval={"before": False}, output={"dir": str(tmp_path / "critic")})
    tunelab("--quiet", "train", str(critic))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    out = tmp_path / "judged.jsonl"
    tunelab("--quiet", "generate", str(teacher_run), "--recipe", str(recipe), "--limit", "6", "--out", str(out),
            "--critic", str(tmp_path / "critic"), "--critic-label", "yes", "--max-new-tokens", "6")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert set(json.loads((tmp_path / "critic" / "eval.json").read_text())["per_class"]) == {"yes", "no"}
    # the same completions scored again by tunelab score: the same critic scores
    again = tmp_path / "again.jsonl"
    tunelab("--quiet", "score", str(out), "--critic", str(tmp_path / "critic"), "--out", str(again))
    assert [r["score"] for r in map(json.loads, again.read_text().splitlines())] == pytest.approx(
        [r["score"] for r in rows], abs=1e-5)
