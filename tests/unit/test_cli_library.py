"""The library functions the command line calls, tested directly: each command only parses its arguments
and calls them, so what they return is what the command prints or writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file

import tunelab as tl
from tunelab.errors import TunelabError

# ---- students: the layers kept, and the model written


@pytest.mark.parametrize(("n", "keep_every", "layers", "keep"), [
    (30, 3, None, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]),  # the last layer is always kept
    (4, 2, None, [0, 2, 3]),
    (4, 3, None, [0, 3]),  # 3 is both a multiple and the last
    (4, 1, None, [0, 1, 2, 3]),
    (4, None, "0, 2,", [0, 2]),  # --layers text: blanks and a trailing comma are fine
    (4, None, [3, 1], [3, 1]),
])
def test_student_layers_by_hand(n, keep_every, layers, keep):
    from tunelab.teacher import student_layers

    assert student_layers(n, keep_every, layers) == keep


@pytest.mark.parametrize(("keep_every", "layers", "message"), [
    (None, None, "give --keep-every K or --layers"),
    (2, "1", "give --keep-every K or --layers"),
    (0, None, "--keep-every must be at least 1"),
    (None, "1,x", "--layers takes comma-separated integers, got '1,x'"),
])
def test_student_layers_refused(keep_every, layers, message):
    from tunelab.teacher import student_layers

    with pytest.raises(TunelabError, match=message):
        student_layers(4, keep_every, layers)


def test_cut_student_writes_what_the_command_writes(tmp_path, tiny_model):
    from tunelab.teacher import cut_student

    cut = cut_student(tiny_model, tmp_path / "lib", layers=[1])
    proc = tunelab("student", str(tiny_model), str(tmp_path / "cli"), "--layers", "1")
    assert cut.path == tmp_path / "lib" and cut.layers == [1] and cut.teacher_layers == 2
    assert 0 < cut.parameters < cut.teacher_parameters
    assert proc.stderr.strip().splitlines()[-1] == cut.summary().replace(str(tmp_path / "lib"), str(tmp_path / "cli"))
    lib, cli = load_file(tmp_path / "lib" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert lib.keys() == cli.keys() and all(torch.equal(lib[k], cli[k]) for k in lib)
    assert json.loads((tmp_path / "lib" / "config.json").read_text())["num_hidden_layers"] == 1


def test_tunelab_student_replaces_its_own_output_and_raises_tunelab_errors(tmp_path, tiny_model, capsys):
    out = tmp_path / "student"
    assert tl.student(tiny_model, out, keep_every=1) == out
    assert "student with layers [0, 1] of 2" in capsys.readouterr().err
    assert tl.student(str(tiny_model), str(out), layers=[0]) == str(out)  # force: the first one is replaced
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(TunelabError, match="layers to keep must be distinct indices in 0..1"):
        tl.student(tiny_model, out, layers=[5])
    (tmp_path / "file").write_text("x")
    with pytest.raises(TunelabError, match="exists and is not a directory"):
        tl.student(tiny_model, tmp_path / "file", keep_every=1)
    with pytest.raises(TunelabError, match="which this command reads"):
        tl.student(tiny_model, tiny_model, keep_every=1)


# ---- evaluation: what `tunelab eval` prints and writes, from the scores


def _sample(prompt: str, output: str, expected: str) -> dict:
    return {"prompt": prompt, "output": output, "expected": expected, "correct": output == expected}


def test_target_tables_name_the_base_model_and_the_target():
    from tunelab.evaluation import TargetEvaluation, target_record, target_tables

    after = {"val_loss": 0.5, "exact_match": 0.5, "n": 2,
             "samples": [_sample("emma", "amme", "amme"), _sample("bob", "bo", "bob")]}
    base = {"val_loss": 2.0, "exact_match": 0.0, "n": 2,
            "samples": [_sample("emma", "x", "amme"), _sample("bob", "y", "bob")]}
    ev = TargetEvaluation(Path("runs/x"), "validation", after, base)
    assert target_tables(ev, show=1) == [
        "base model:\n  emma → x (expected: amme) ✗\n  exact match: 0.0% over 2 held-out examples\n"
        "runs/x:\n  emma → amme (expected: amme) ✓\n  exact match: 50.0% over 2 held-out examples"]
    assert target_record(ev) == {"target": "runs/x", "split": "validation", "val_loss": 0.5, "exact_match": 0.5,
                                 "n": 2, "base": {"val_loss": 2.0, "exact_match": 0.0, "n": 2}}
    alone = TargetEvaluation(Path("runs/x"), "test", after)
    assert target_tables(alone, show=0) == ["runs/x:\n  exact match: 50.0% over 2 held-out examples"]
    assert "base" not in target_record(alone)


def test_target_tables_of_a_classifier_and_of_a_loss_only_run():
    from tunelab.evaluation import TargetEvaluation, target_tables

    res = {"accuracy": 0.75, "macro_f1": 0.5, "n": 4, "labels": ["a", "b"], "confusion": [[2, 1], [0, 1]]}
    assert target_tables(TargetEvaluation(Path("r"), "test", res), show=3) == [
        "accuracy 75.0%, macro-F1 0.500 over 4 examples",
        "true \\ predicted      a     b\na                     2     1\nb                     0     1"]
    assert target_tables(TargetEvaluation(Path("r"), "validation", {"val_loss": 1.0}), show=3) == []


def test_the_loop_prints_the_same_sample_tables(capsys):
    from tunelab.evaluation import print_before_after, sample_tables

    after = {"exact_match": 1.0, "n": 1, "samples": [_sample("emma", "amme", "amme")]}
    print_before_after(None, after, 5)
    assert capsys.readouterr().out == "\n".join(sample_tables(None, after, 5)) + "\n"
    assert sample_tables(None, after, 5) == [
        "after fine-tuning:\n  emma → amme (expected: amme) ✓\n  exact match: 100.0% over 1 held-out examples"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, names_file) -> Path:
    d = tmp_path_factory.mktemp("lora")
    recipe = write_recipe(d / "r.yaml", tiny_model, names_file, train={"max_steps": 2},
                          eval={"before": False, "max_examples": 4}, output={"dir": str(d / "run")})
    tunelab("--quiet", "train", str(recipe))
    return d / "run"


def test_evaluate_target_is_what_tunelab_eval_prints(lora_run):
    from tunelab.evaluation import evaluate_target, target_config, target_record

    ev = evaluate_target(lora_run, target_config(lora_run), base=True, quiet=True)
    printed = json.loads(tunelab("--quiet", "eval", str(lora_run), "--base").stdout.splitlines()[-1])
    assert target_record(ev) == printed
    assert ev.split == "validation" and len(ev.result["samples"]) == 4 and "samples" in ev.base
    with pytest.raises(TunelabError, match="not a run directory"):
        target_config(lora_run.parent.parent)


def test_merge_adapter_writes_what_tunelab_merge_writes(lora_run, tmp_path):
    from tunelab.export import export_classifier, merge_adapter

    assert merge_adapter(lora_run, tmp_path / "lib") == tmp_path / "lib"
    tunelab("merge", str(lora_run), str(tmp_path / "cli"))
    lib, cli = load_file(tmp_path / "lib" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert lib.keys() == cli.keys() and all(torch.equal(lib[k], cli[k]) for k in lib)
    with pytest.raises(TunelabError, match="output directory exists and is not empty"):
        merge_adapter(lora_run, tmp_path / "lib")
    merge_adapter(lora_run, tmp_path / "lib", force=True)  # tunelab made it
    with pytest.raises(TunelabError, match="export writes a sequence-classification model"):
        export_classifier(lora_run, tmp_path / "x")


# ---- generated data: scores and rows


class _Tok:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_completions_are_scored_and_filtered_in_order():
    from tunelab.gen_data import PromptItem, completion_rows, score_completions

    items = [PromptItem({"name": "emma"}, "Reverse emma:", "f:1"), PromptItem({"name": "bob"}, [1, 2], "f:2")]
    outputs = [["amme", "x"], ["bob"]]
    comps = score_completions(items, outputs, lambda rec, out: out == rec["name"][::-1], "m:f")
    assert [(c.item.where, c.sample, c.text, c.score) for c in comps] == [
        ("f:1", 0, "amme", 1.0), ("f:1", 1, "x", 0.0), ("f:2", 0, "bob", 1.0)]
    assert completion_rows(comps, _Tok(), min_score=1) == [
        {"name": "emma", "prompt": "Reverse emma:", "completion": "amme", "sample": 0, "score": 1.0},
        {"name": "bob", "prompt": "bc", "completion": "bob", "sample": 0, "score": 1.0}]  # ids decoded
    plain = completion_rows(score_completions(items, outputs), _Tok(), min_score=None)
    assert [set(r) for r in plain] == [{"name", "prompt", "completion", "sample"}] * 3


def test_a_verifier_that_raises_names_the_record():
    from tunelab.gen_data import PromptItem, score_completions

    def broken(rec, out):
        raise KeyError("output")

    with pytest.raises(TunelabError, match="f:7: verifier m:broken raised KeyError"):
        score_completions([PromptItem({}, "p", "f:7")], [["x"]], broken, "m:broken")


def test_check_critic(tmp_path, lora_run):
    from tunelab.gen_data import check_critic

    with pytest.raises(TunelabError, match="not a run directory"):
        check_critic(str(tmp_path))
    with pytest.raises(TunelabError, match="the critic must be a classification run"):
        check_critic(str(lora_run))


# ---- outputs, pages, texts


def test_output_file_and_free_out_dir(tmp_path):
    from tunelab import ownership

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    assert ownership.output_file(tmp_path / "new.jsonl", False, [str(data)]) == tmp_path / "new.jsonl"
    with pytest.raises(TunelabError, match="output file exists"):
        ownership.output_file(data / "train.jsonl", False)
    with pytest.raises(TunelabError, match="the output file is .*which this command reads"):
        ownership.output_file(data / "train.jsonl", True, [str(data / "train.jsonl")])
    with pytest.raises(TunelabError, match="holds files tunelab did not make"):
        ownership.free_out_dir(data, False, [])
    with pytest.raises(TunelabError, match="out_dir lies inside"):
        ownership.free_out_dir(data / "out", False, [str(data)])
    (tmp_path / "made").mkdir()
    ownership.mark(tmp_path / "made", "test")
    assert ownership.free_out_dir(tmp_path / "made", True, []) == tmp_path / "made"
    with pytest.raises(TunelabError, match="exists and is not empty"):
        ownership.free_out_dir(tmp_path / "made", False, [])


def test_is_report(tmp_path, lora_run):
    from tunelab.report import is_report, write_compare

    page = write_compare([lora_run, lora_run], tmp_path / "compare.html")
    (tmp_path / "mine.html").write_text("<html>mine</html>")
    os.mkfifo(tmp_path / "fifo")
    assert is_report(page)
    assert not is_report(tmp_path / "mine.html") and not is_report(tmp_path / "fifo")
    assert not is_report(tmp_path / "absent.html") and not is_report(tmp_path)


def test_run_config(tmp_path, lora_run):
    from tunelab.train.rundir import run_config

    assert run_config(lora_run).train.max_steps == 2
    with pytest.raises(TunelabError, match="not a run directory"):
        run_config(tmp_path)


def test_classifier_texts():
    from tunelab.classify import classifier_texts

    records = [({"name": "emma"}, "f:1"), (None, "a bare text")]
    assert classifier_texts("Name: {name}", records) == [("Name: emma", "f:1"), ("a bare text", "a bare text")]
    with pytest.raises(TunelabError, match="f:2: empty text"):
        classifier_texts("{name}", [({"name": " "}, "f:2")])


def test_marked_by_hand():
    from tunelab.data.formats import marked
    from tunelab.data.types import IGNORE

    ids, labels = [0, 1, 2, 3], [IGNORE, 1, 2, IGNORE]
    assert marked(_Tok(), ids, labels) == "a⟦bc⟧d"
    assert marked(_Tok(), ids[:3], labels[:3]) == "a⟦bc⟧"  # closed at the end
    assert marked(_Tok(), ids, labels, color=True) == "a\x1b[42;30mbc\x1b[0md"


# ---- a conversation


def test_a_conversation_replies_as_tunelab_chat_does(tiny_chat_model):
    from tunelab.conversation import open_conversation

    talk = open_conversation(str(tiny_chat_model), template="chatml", system="Be brief.")
    first = talk.reply("hello", max_new_tokens=3)
    assert [m["role"] for m in talk.history] == ["system", "user", "assistant"]
    second = talk.reply("bye", max_new_tokens=3)
    talk.reset()
    assert talk.history == [{"role": "system", "content": "Be brief."}]
    proc = tunelab("chat", str(tiny_chat_model), "--template", "chatml", "--system", "Be brief.",
                   "--max-new-tokens", "3", stdin="hello\nbye\n")
    assert proc.stdout == f"assistant> {first}\nassistant> {second}\n"
    with pytest.raises(TunelabError, match="not a recipe"):
        open_conversation("recipe.yaml")
