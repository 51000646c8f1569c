"""Super-NaturalInstructions-style tasks: reading task files, the prompt encodings, task-level splits,
scoring against several valid outputs, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from tunelab.config import SNIConfig, load_config
from tunelab.data.sni import encode_prompt, read_task, read_tasks, sni_pairs
from tunelab.errors import TunelabError

TASK = {
    "Definition": ["Reverse the name."],
    "Positive Examples": [{"input": "emma", "output": "amme", "explanation": "Read backwards."},
                          {"input": "noah", "output": "haon", "explanation": "Last letter first."}],
    "Negative Examples": [{"input": "liam", "output": "liam", "explanation": "Not reversed."}],
    "Instances": [{"id": "a", "input": "ava", "output": ["ava"]}, {"id": "b", "input": "mia", "output": ["aim"]}],
}


def write(tmp_path, name: str, doc) -> str:
    p = tmp_path / f"{name}.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_the_encodings_render_exactly_as_specified(tmp_path):
    task = read_task(write(tmp_path, "t", TASK))
    assert encode_prompt(task, "zoe", SNIConfig(positive=0)) == (
        "Definition: Reverse the name.\n\n"
        "Now complete the following example -\nInput: zoe\nOutput:")
    assert encode_prompt(task, "zoe", SNIConfig(positive=1)) == (
        "Definition: Reverse the name.\n\n"
        "Positive Example 1 -\nInput: emma\nOutput: amme\n\n"
        "Now complete the following example -\nInput: zoe\nOutput:")
    assert encode_prompt(task, "zoe", SNIConfig(positive=2, negative=1, explanations=True)) == (
        "Definition: Reverse the name.\n\n"
        "Positive Example 1 -\nInput: emma\nOutput: amme\nExplanation: Read backwards.\n\n"
        "Positive Example 2 -\nInput: noah\nOutput: haon\nExplanation: Last letter first.\n\n"
        "Negative Example 1 -\nInput: liam\nOutput: liam\nExplanation: Not reversed.\n\n"
        "Now complete the following example -\nInput: zoe\nOutput:")
    assert encode_prompt(task, "zoe", SNIConfig(definition=False, positive=1)) == (
        "Positive Example 1 -\nInput: emma\nOutput: amme\n\n"
        "Now complete the following example -\nInput: zoe\nOutput:")


def test_task_level_splits_and_valid_outputs(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write(d, "train_a", TASK)
    write(d, "train_b", {**TASK, "Definition": "Copy the name."})
    write(d, "unseen", {**TASK, "Instances": [{"input": "liam, noah", "output": ["liam", "noah"]}]})
    cfg = load_config(None, [f"sni.dir={d}", "sni.eval_tasks=[unseen]", "sni.positive=1"])
    pairs, report = sni_pairs(cfg)
    assert {p.record["task"] for p in pairs["train"]} == {"train_a", "train_b"}
    assert {p.record["task"] for p in pairs["validation"]} == {"unseen"}
    (held,) = pairs["validation"]
    assert held.held_out and held.references == ["liam", "noah"] and held.prompt.endswith("Input: liam, noah\nOutput:")
    assert report["eval_tasks"] == {"unseen": 1} and set(report["train_tasks"]) == {"train_a", "train_b"}
    assert all(p.completion in (" ava", " aim") for p in pairs["train"])
    # eval.max_examples caps each held-out task's instances, as it caps each instruction task's
    cfg = load_config(None, [f"sni.dir={d}", "sni.eval_tasks=[train_a,unseen]", "sni.train_tasks=[train_b]",
                             "sni.positive=1", "eval.max_examples=1"])
    pairs, report = sni_pairs(cfg)
    assert len(TASK["Instances"]) > 1 and report["eval_tasks"] == {"train_a": 1, "unseen": 1}
    assert len(pairs["validation"]) == 2


def test_several_valid_outputs_score_as_the_best_match(monkeypatch):
    """generation_metrics: a prediction equal to any reference is correct; ROUGE-L takes the best."""
    import tunelab.evaluate as ev
    from tunelab.data.formats import Example

    outputs = {"w:1": " noah", "w:2": " liam x"}  # what the model said, in place of generate()
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, **k: [[outputs[p]] for p in prompts])
    ex = [Example([1], [-100], w, " liam", w, references=["liam", "noah"], group="t/unseen", held_out=True)
          for w in ("w:1", "w:2")]
    for e in ex:
        e.prompt = e.where
    res = ev.generation_metrics(None, None, ex, 4, 2)
    assert [r["correct"] for r in res["samples"]] == [True, False]
    assert res["samples"][1]["rouge_l"] == pytest.approx(2 * 0.5 * 1 / 1.5)  # "liam x" vs "liam": P 1/2, R 1
    assert res["by_task"]["t"]["mean"] == 0.5 and res["held_out_exact_match"] == 0.5


@pytest.mark.parametrize("doc,message", [
    ({k: v for k, v in TASK.items() if k != "Definition"}, 'missing "Definition"'),
    ({k: v for k, v in TASK.items() if k != "Instances"}, 'missing "Instances"'),
    ({**TASK, "Instances": [{"input": "x", "output": []}]}, 'Instances"[0]: an instance without outputs'),
    ({**TASK, "Instances": [{"input": "x"}]}, 'Instances"[0]: an instance without outputs'),
    ({**TASK, "Definition": ""}, 'empty "Definition"'),
    ("{not json", "malformed JSON"),
])
def test_bad_task_files_name_the_file(tmp_path, doc, message):
    p = write(tmp_path, "bad_task", doc)
    with pytest.raises(TunelabError) as e:
        read_task(p)
    assert message in str(e.value) and "bad_task.json" in e.value.where


def test_k_larger_than_the_positive_examples_names_the_file(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    write(d, "a", TASK)
    write(d, "b", TASK)
    cfg = load_config(None, [f"sni.dir={d}", "sni.eval_tasks=[b]", "sni.positive=3"])
    with pytest.raises(TunelabError) as e:
        sni_pairs(cfg)
    assert "sni.positive=3, but the task has 2 positive examples" in str(e.value) and e.value.where.endswith("a.json")
    cfg = load_config(None, [f"sni.dir={d}", "sni.eval_tasks=[c]"])
    with pytest.raises(TunelabError, match="no task 'c'"):
        sni_pairs(cfg)
    with pytest.raises(TunelabError, match="no task files"):
        read_tasks(str(tmp_path))


def test_the_shipped_tasks_read_and_render():
    from pathlib import Path

    tasks = read_tasks(str(Path(__file__).resolve().parents[2] / "data" / "sni_names"))
    assert len(tasks) >= 10
    for t in tasks.values():
        assert len(t.positive) >= 2 and t.negative and len(t.instances) >= 500
        for inst in t.instances[:50]:
            assert inst.outputs
    assert any(len(i.outputs) > 1 for i in tasks["task012_longer_name"].instances)  # ties: either name
