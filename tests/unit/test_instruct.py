"""Instruction tuning: templates and options, held-out templates and tasks, mixtures, formats, ROUGE-L,
Self-Instruct parsing and filtering, prompt variations and control sets."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from tunelab.config import load_config
from tunelab.data.formats import instruction_pair, to_pairs
from tunelab.data.instruct import builtin_tasks, choose, resolve_tasks
from tunelab.data.mixture import mixture_counts, take
from tunelab.data.readers import Record
from tunelab.data.templates import render, render_options
from tunelab.errors import TunelabError
from tunelab.metrics import best_of, exact_match, lcs_length, rouge_l
from tunelab.selfinstruct import bootstrap_prompt, parse_task, reject_reason
from tunelab.tasks import generation_pairs


def recipe(tmp_path, names_file, instruct: dict, **extra) -> str:
    import yaml

    p = tmp_path / "r.yaml"
    data = {"train": {"path": str(names_file), "text_field": "name"}, "unique_by": "name", "validation_size": 30}
    data.update(extra.pop("data", {}))
    p.write_text(yaml.safe_dump({"model": "x", "data": data, "instruct": instruct, **extra}))
    return str(p)


# ---- templates and options


def test_options_render_as_flan_writes_them():
    assert render_options(["yes", "no"]) == "OPTIONS:\n- yes\n- no"
    assert render_options(["yes", "no", "maybe"], "letter") == "OPTIONS:\n(A) yes\n(B) no\n(C) maybe"
    assert render_options(["red", "blue"], "number", header="") == "1. red\n2. blue"


def test_filters_for_the_names_tasks():
    rec = {"name": "emma"}
    assert render("{name|reverse}|{name|upper}|{name|len}|{name|vowels}|{name|chars}", rec, "x") == \
        "amme|EMMA|4|2|e m m a"
    assert render("{name|first|isvowel} {name|sorted} {name|capitalize}", rec, "x") == "yes aemm Emma"
    assert render("{name|first|isvowel}", {"name": "noah"}, "x") == "no"


def test_an_options_task_renders_options_answer_and_key(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [
        {"name": "vowel", "options": ["yes", "no"], "answer": "{name|first|isvowel}", "options_style": "letter",
         "templates": [{"prompt": "{name}?\n{options}\nAnswer:", "completion": " {option_key}"}]}]}))
    pairs, _ = generation_pairs(cfg)
    for p in pairs["train"][:20]:
        name = p.record["name"]
        assert p.prompt == f"{name}?\nOPTIONS:\n(A) yes\n(B) no\nAnswer:"
        assert p.completion == (" A" if name[0] in "aeiou" else " B")


def test_shuffled_options_keep_the_answer_key_right(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [
        {"name": "v", "options": ["yes", "no", "maybe"], "answer": "{name|first|isvowel}", "options_style": "number",
         "shuffle_options": True, "templates": [{"prompt": "{name} {options}", "completion": " {option_key}"}]}]}))
    orders = set()
    for p in generation_pairs(cfg)[0]["train"]:
        lines = p.prompt.split("\n")[1:]
        orders.add(tuple(lines))
        key = int(p.completion)
        assert lines[key - 1].split(". ", 1)[1] == ("yes" if p.record["name"][0] in "aeiou" else "no")
    assert len(orders) > 1  # shuffled


def test_builtin_tasks_each_have_at_least_five_templates():
    tasks = builtin_tasks()
    assert {"reverse", "count_vowels", "first_letter", "last_letter", "uppercase", "length"} <= set(tasks)
    for name, spec in tasks.items():
        assert len(spec["templates"]) >= 5, name
    # template 0 of reverse is the main recipe's prompt
    assert tasks["reverse"]["templates"][0] == {"prompt": "Reverse the name: {name}. Answer:",
                                                "completion": " {name|reverse}"}


def test_every_builtin_template_renders_a_correct_target():
    from tunelab.config import TaskConfig
    from tunelab.data.instruct import resolve_task

    rec = Record({"name": "olivia"}, "x:1")
    expected = {"reverse": "aivilo", "count_vowels": "4", "first_letter": "o", "last_letter": "a",
                "uppercase": "OLIVIA", "length": "6", "spell": "o l i v i a", "starts_with_vowel": "yes"}
    for name in builtin_tasks():
        task = resolve_task(TaskConfig(builtin=name), 0)
        from tunelab.data.instruct import render_pair

        for t in task.templates:
            p = render_pair(task, t, rec, random.Random(0))
            assert "olivia" in p.prompt and p.completion.strip() == expected[name], (name, t.name)


def test_a_task_with_its_own_source_takes_neither_unique_by_nor_train_size(tmp_path, names_file):
    """data.unique_by (name) and data.train_size are about data.train: a task's own file (with no name field)
    is read whole and split by data.validation_size."""
    nli = tmp_path / "nli.jsonl"
    nli.write_text("".join(json.dumps({"premise": f"p{i}", "label": "yes"}) + "\n" for i in range(40)))
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [
        {"builtin": "reverse"},
        {"name": "nli", "source": {"path": str(nli)}, "options": ["yes", "no"], "answer": "{label}",
         "templates": [{"prompt": "{premise}?\n{options}", "completion": " {answer}"}]}]},
        data={"train_size": 10}))
    pairs, extra = generation_pairs(cfg)
    assert extra["mixture"]["tasks"]["nli"]["records"] == 40 - 30  # 30 held out by data.validation_size
    assert len({p.record["name"] for p in pairs["train"] if p.group.startswith("reverse/")}) == 10


def test_generate_takes_an_instruction_recipes_prompts(tmp_path, names_file):
    """tunelab generate --recipe on a mixture: the prompts training renders, each with its record."""
    from tunelab.gen_data import prompts_from_recipe

    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [{"builtin": "reverse"}, {"builtin": "length"}]}))
    pairs, _ = generation_pairs(cfg)
    items = prompts_from_recipe(cfg, None, "validation", 7)
    assert [(i.prompt, i.record, i.where) for i in items] == [(p.prompt, p.record, p.where)
                                                              for p in pairs["validation"][:7]]


# ---- held-out templates and tasks


def test_held_out_templates_and_tasks_never_reach_training(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {
        "tasks": [{"builtin": "reverse", "held_out_templates": [1, "3"]}, {"builtin": "length"},
                  {"builtin": "uppercase"}],
        "held_out_tasks": ["uppercase"]}))
    pairs, extra = generation_pairs(cfg)
    report = extra["mixture"]
    train_groups = Counter(p.group for p in pairs["train"])
    assert "reverse/1" not in train_groups and "reverse/3" not in train_groups
    assert not any(g.startswith("uppercase/") for g in train_groups)
    assert not any(p.held_out for p in pairs["train"])
    held_prompts = {render(t["prompt"], p.record, "x") for p in pairs["train"]
                    for i, t in enumerate(builtin_tasks()["reverse"]["templates"]) if i in (1, 3)}
    assert not held_prompts & {p.prompt for p in pairs["train"]}
    # the training templates are all used
    assert {g for g in train_groups if g.startswith("reverse/")} == {f"reverse/{i}" for i in (0, 2, 4, 5, 6, 7)}
    # evaluation covers the held-out templates and task, marked held out
    val = {(p.group, p.held_out) for p in pairs["validation"]}
    assert ("reverse/1", True) in val and ("reverse/0", False) in val and ("uppercase/0", True) in val
    assert report["tasks"]["uppercase"]["examples"] == 0 and report["tasks"]["uppercase"]["held_out_task"]
    # held-out names: no validation record is a training record
    assert not {p.record["name"] for p in pairs["train"]} & {p.record["name"] for p in pairs["validation"]}


def test_the_training_batches_of_a_run_hold_no_held_out_template(tmp_path, tiny_model, names_file):
    """Through the real data path: build_dataset's training examples, every batch of two epochs."""
    from tunelab.data.batching import epoch_batches
    from tunelab.models import load_tokenizer
    from tunelab.tasks import build_dataset

    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [{"builtin": "reverse", "held_out_templates": [0, 2]}]},
                             data={"max_length": 64}), [f"model={tiny_model}"])
    splits, _, _ = build_dataset(cfg, load_tokenizer(cfg.model))
    train = splits["train"]
    for epoch in range(2):
        for batch in epoch_batches([len(e.input_ids) for e in train], 8, 0, epoch):
            for i in batch:
                assert train[i].group not in ("reverse/0", "reverse/2") and not train[i].held_out
                assert not train[i].prompt.startswith("Reverse the name:")


def test_round_robin_and_random_choice():
    ts = ["a", "b", "c"]
    assert choose(ts, 7, "round_robin", random.Random(0)) == ["a", "b", "c", "a", "b", "c", "a"]
    counts = Counter(choose(ts, 3000, "random", random.Random(0)))
    assert all(abs(v - 1000) < 100 for v in counts.values())
    assert choose(ts, 50, "random", random.Random(1)) == choose(ts, 50, "random", random.Random(1))


# ---- mixtures


def test_examples_proportional_mixing_with_a_cap():
    assert mixture_counts({"a": 100, "b": 5000, "c": 30}, {}, {"a": None, "b": None, "c": None}, "proportional") == \
        {"a": 100, "b": 5000, "c": 30}
    assert mixture_counts({"a": 100, "b": 5000, "c": 30}, {}, {"a": 1000, "b": 1000, "c": 1000}, "proportional") == \
        {"a": 100, "b": 1000, "c": 30}


def test_weighted_mixing_adds_up_exactly():
    counts = mixture_counts({"a": 10, "b": 10, "c": 10}, {"a": 1, "b": 1, "c": 1}, {}, "weighted", total=100)
    assert sum(counts.values()) == 100 and sorted(counts.values()) == [33, 33, 34]
    assert mixture_counts({"a": 5, "b": 5}, {"a": 3, "b": 1}, {}, "weighted", total=8) == {"a": 6, "b": 2}


def test_mixture_proportions_within_tolerance_for_a_fixed_seed(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {
        "mixing": "weighted", "total": 400,
        "tasks": [{"builtin": "reverse", "weight": 2}, {"builtin": "length", "weight": 1},
                  {"builtin": "uppercase", "weight": 1}]}))
    pairs, extra = generation_pairs(cfg)
    report = extra["mixture"]
    counts = Counter(p.group.split("/")[0] for p in pairs["train"])
    assert abs(counts["reverse"] / 400 - 0.5) <= 0.01
    assert abs(counts["length"] / 400 - 0.25) <= 0.01 and abs(counts["uppercase"] / 400 - 0.25) <= 0.01
    assert {k: v["examples"] for k, v in report["tasks"].items()} == dict(counts)
    again, _ = generation_pairs(cfg)  # reproducible
    assert [(p.prompt, p.completion) for p in again["train"]] == [(p.prompt, p.completion) for p in pairs["train"]]
    other, _ = generation_pairs(load_config(recipe(tmp_path, names_file, {
        "mixing": "weighted", "total": 400,
        "tasks": [{"builtin": "reverse", "weight": 2}, {"builtin": "length", "weight": 1},
                  {"builtin": "uppercase", "weight": 1}]}, train={"seed": 1})))
    assert [p.prompt for p in other["train"]] != [p.prompt for p in pairs["train"]]


def test_take_repeats_records_in_fresh_orders_when_upsampling():
    out = take(list(range(5)), 12, None, random.Random(0))
    assert len(out) == 12 and sorted(out[:5]) == list(range(5)) and sorted(out[5:10]) == list(range(5))
    assert sorted(take(list(range(100)), 10, 10, random.Random(0))) == sorted(take(list(range(100)), 10, 10,
                                                                                    random.Random(0)))
    assert len(set(take(list(range(100)), 30, 10, random.Random(0)))) == 10  # the cap bounds distinct records


# ---- bad input


@pytest.mark.parametrize("instruct,message", [
    ({"tasks": [{"builtin": "reverse", "held_out_templates": list(range(8))}]}, "covers all 8 templates"),
    ({"tasks": [{"builtin": "reverse", "held_out_templates": [9]}]}, "no template 9"),
    ({"tasks": [{"builtin": "reverse", "held_out_templates": ["zz"]}]}, "no template named 'zz'"),
    ({"tasks": [{"builtin": "reverse"}, {"builtin": "reverse"}]}, "duplicate task names"),
    ({"tasks": [{"builtin": "reverse"}], "held_out_tasks": ["length"]}, "no task named 'length'"),
    ({"mixing": "weighted", "tasks": [{"builtin": "reverse", "weight": -2}]}, "weight must be non-negative"),
    ({"mixing": "weighted", "tasks": [{"builtin": "reverse", "weight": 0}]}, "all mixture weights are zero"),
    ({"tasks": [{"builtin": "reverse", "weight": 8}, {"builtin": "length"}]},
     "weight 8 has no effect with instruct.mixing: proportional"),
    ({"tasks": [{"builtin": "length"}], "eval_templates": "held_out"}, "no task has a held-out template or task"),
    ({"tasks": [{"name": "t"}]}, "the task has no templates"),
    ({"tasks": [{"name": "t", "templates": [{"prompt": "{name|rev}", "completion": "x"}]}]}, "unknown filter 'rev'"),
    ({"tasks": [{"name": "t", "templates": [{"prompt": "", "completion": "x"}]}]}, "empty prompt"),
    ({"tasks": [{"name": "t", "options": ["a"], "templates": [{"prompt": "{name}", "completion": "x"}]}]},
     "needs at least two"),
])
def test_bad_tasks_are_one_line_errors(tmp_path, names_file, instruct, message):
    cfg = load_config(recipe(tmp_path, names_file, instruct))
    with pytest.raises(TunelabError, match=message.replace("(", r"\(")):
        generation_pairs(cfg)


def test_an_answer_outside_the_options_names_the_record(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [
        {"name": "v", "options": ["yes", "no"], "answer": "{name|first}",
         "templates": [{"prompt": "{name} {options}", "completion": " {answer}"}]}]}))
    with pytest.raises(TunelabError, match=r"names.txt:\d+: the answer '.' is not one of the options"):
        generation_pairs(cfg)


# ---- Alpaca and OpenOrca records


def test_alpaca_records_with_and_without_input(tmp_path):
    cfg = load_config(None, ["data.train=x.jsonl", "data.format=alpaca"])
    with_input = instruction_pair(Record({"instruction": "Reverse it.", "input": "emma", "output": "amme"}, "f:1"),
                                  cfg.data)
    assert with_input.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nReverse it.\n\n"
        "### Input:\nemma\n\n### Response:\n")
    assert with_input.completion == "amme"
    for empty in ({"input": ""}, {"input": None}, {}):
        p = instruction_pair(Record({"instruction": "Name a color.", "output": "red", **empty}, "f:2"), cfg.data)
        assert p.prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    with pytest.raises(TunelabError, match="f:3: empty instruction"):
        instruction_pair(Record({"instruction": "  ", "output": "x"}, "f:3"), cfg.data)
    with pytest.raises(TunelabError, match="f:4: missing field 'output'"):
        instruction_pair(Record({"instruction": "Do it."}, "f:4"), cfg.data)


def test_openorca_records_and_column_mapping():
    cfg = load_config(None, ["data.train=x.jsonl", "data.format=openorca", "data.columns.question=q"])
    p = instruction_pair(Record({"system_prompt": "Be brief.", "q": "2+2?", "response": "4"}, "f:1"), cfg.data)
    assert p.prompt == "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n" and p.completion == "4"
    p = instruction_pair(Record({"system_prompt": "", "q": "2+2?", "response": "4"}, "f:1"), cfg.data)
    assert p.prompt == "### User:\n2+2?\n\n### Assistant:\n"
    cfg = load_config(None, ["data.train=x.jsonl", "data.format=alpaca", "data.columns.instruction=task",
                             "data.columns.output=answer"])
    assert to_pairs([Record({"task": "Say hi.", "answer": "hi"}, "f:1")], cfg.data)[0].completion == "hi"


# ---- ROUGE-L and matching


def test_rouge_l_against_a_hand_computation():
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5
    assert lcs_length("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 2/3, R = 2/4: F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c", "a x c y") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert rouge_l("The Cat!", "the cat") == 1.0  # lower-cased, punctuation dropped
    assert rouge_l("", "x") == 0.0 and rouge_l("dog", "cat") == 0.0


def test_rouge_l_matches_the_reference_implementation():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rougeL"])
    rng = random.Random(0)
    words = "a b c d e f g".split()
    for _ in range(200):
        x = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        y = " ".join(rng.choices(words, k=rng.randint(1, 9)))
        assert rouge_l(x, y) == pytest.approx(scorer.score(y, x)["rougeL"].fmeasure)


def test_several_valid_outputs_score_as_the_best_match():
    assert best_of(exact_match, "amme", ["emma", "amme"]) == 1.0
    assert best_of(rouge_l, "red and blue", ["green", "red blue", "red and blue and yellow"]) == pytest.approx(
        max(rouge_l("red and blue", r) for r in ["green", "red blue", "red and blue and yellow"]))


# ---- Self-Instruct


def test_the_bootstrap_prompt_and_parsing_a_task():
    demos = [{"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"},
             {"instruction": "Name a color.", "input": "", "output": "red"}]
    prompt = bootstrap_prompt(demos)
    assert prompt.endswith("Task 2\nInstruction: Name a color.\nInput: <noinput>\nOutput: red\n\nTask 3\nInstruction:")
    assert parse_task(" Double the number.\nInput: 21\nOutput: 42\n\nTask 4\nInstruction: more") == \
        {"instruction": "Double the number.", "input": "21", "output": "42"}
    assert parse_task(" Say hello.\nInput: <noinput>\nOutput: hello") == \
        {"instruction": "Say hello.", "input": "", "output": "hello"}
    assert parse_task(" just some words") is None


def test_generated_tasks_are_filtered_by_rouge_l_against_the_pool():
    pool = ["Reverse the letters of the given name."]
    ok = {"instruction": "Count the words in the sentence.", "input": "a b", "output": "2"}
    assert reject_reason(ok, pool, 0.7) is None
    near = {"instruction": "Reverse the letters of the name.", "input": "x", "output": "x"}
    assert rouge_l(near["instruction"], pool[0]) >= 0.7 and reject_reason(near, pool, 0.7) == "too similar"
    assert reject_reason(None, pool, 0.7) == "unparsable"
    assert reject_reason({"instruction": "Do.", "input": "", "output": "x"}, pool, 0.7) == "instruction too short"
    assert reject_reason({**ok, "output": ""}, pool, 0.7) == "no output"


# ---- prompt variations and the control set


def test_variations_from_a_file(tmp_path):
    from tunelab.probes import load_variations

    f = tmp_path / "v.yaml"
    f.write_text("- {prompt: 'Flip {name}:', completion: ' {name|reverse}'}\n"
                 "- {name: backwards, prompt: '{name} backwards:', completion: ' {name|reverse}'}\n")
    task = load_variations(str(f))
    assert [t.name for t in task.templates] == ["v/0", "v/backwards"]
    f.write_text("- {prompt: 'Flip {name|bogus}:', completion: ' {name|reverse}'}\n")
    with pytest.raises(TunelabError) as e:
        load_variations(str(f))
    assert "unknown filter 'bogus'" in str(e.value) and e.value.where.startswith(str(f))
    assert len(load_variations("reverse").templates) == 8
    f.write_text("prompt: x\n")
    with pytest.raises(TunelabError, match="expected a list of templates"):
        load_variations(str(f))


def test_every_variation_is_scored_on_the_same_items(tmp_path, tiny_model, capsys):
    """An item too long for data.max_length under one template is left out of every template (and said)."""
    from transformers import AutoTokenizer

    from tunelab.data.formats import Example
    from tunelab.probes import variation_examples

    f = tmp_path / "v.yaml"
    f.write_text("- {name: short, prompt: 'Flip {name}:', completion: ' {name|reverse}'}\n"
                 "- {name: long, prompt: 'Please write the letters of {name}, {name}, {name} backwards:', "
                 "completion: ' {name|reverse}'}\n")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    names = ["ab", "emma", "christopherson", "bo"]
    items = [Example([1], [-100], n, n[::-1], f"n.txt:{i + 1}", record={"name": n}) for i, n in enumerate(names)]
    longest = len(tok("Please write the letters of christopherson, christopherson, christopherson backwards:")
                  ["input_ids"])
    cfg = load_config(None, ["data.train=n.txt", f"eval.variations={f}", f"data.max_length={longest}"])
    out = variation_examples(cfg, tok, items, quiet=False)
    by = Counter(e.group for e in out)
    assert by == {"variations/v/short": 3, "variations/v/long": 3}  # christopherson fits "short" only: out of both
    assert {e.where for e in out} == {"n.txt:1", "n.txt:2", "n.txt:4"}
    assert "1 of 4 items are longer than data.max_length" in capsys.readouterr().err
    assert len(variation_examples(load_config(None, ["data.train=n.txt", f"eval.variations={f}"]), tok, items)) == 8


def test_control_items_and_their_errors(tmp_path):
    from tunelab.probes import load_control

    f = tmp_path / "c.jsonl"
    rows = [{"prompt": "2+2=", "expected": "4", "match": "exact"},
            {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": ["Paris"], "kind": "chat"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_control(str(f))
    assert [i.kind for i in items] == ["control", "chat"] and items[1].match == "contains"
    for bad, msg in [({"question": "x", "expected": "y"}, "c.jsonl:1: unknown control item format"),
                     ({"prompt": "x"}, "c.jsonl:1: field 'expected'"),
                     ({"prompt": "x", "expected": "y", "match": "fuzzy"}, "c.jsonl:1: field 'match'")]:
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(TunelabError, match=msg):
            load_control(str(f))


def test_choose_keeps_round_robin_independent_of_the_rng():
    assert choose(["a"], 3, "round_robin", random.Random(5)) == ["a"] * 3


def test_resolve_tasks_names_held_out_templates():
    cfg = load_config(None, ["data.train=x.txt"])
    cfg.instruct.tasks = []
    from tunelab.config import TaskConfig

    cfg.instruct.tasks = [TaskConfig(builtin="reverse", held_out_templates=["reverse/2", 3])]
    (task,) = resolve_tasks(cfg)
    assert [t.name for t in task.templates if t.held_out] == ["reverse/2", "reverse/3"]


def test_a_task_with_its_own_source_is_split_by_itself(tmp_path, names_file):
    other = tmp_path / "colors.jsonl"
    other.write_text("".join(json.dumps({"name": c}) + "\n" for c in ["red", "blue", "green", "pink", "cyan"] * 10))
    val = tmp_path / "val.txt"
    val.write_text("emma\nolivia\n")
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [
        {"builtin": "reverse"}, {"name": "colors", "source": str(other), "held_out_templates": [1],
                                 "templates": [{"prompt": "{name}?", "completion": " {name|upper}"},
                                               {"prompt": "Shout {name}:", "completion": " {name|upper}"}]}]},
        data={"validation": {"path": str(val), "text_field": "name"}, "validation_size": 2}))
    pairs, _ = generation_pairs(cfg)
    colors_val = [p for p in pairs["validation"] if p.group.startswith("colors/")]
    assert colors_val and all(p.record["name"] in {"red", "blue", "green", "pink", "cyan"} for p in colors_val)
    reverse_val = {p.record["name"] for p in pairs["validation"] if p.group.startswith("reverse/")}
    assert reverse_val == {"emma", "olivia"}  # data.validation serves the tasks reading data.train


def test_held_out_templates_with_nothing_to_score_them_on_are_an_error(tmp_path, names_file):
    cfg = load_config(recipe(tmp_path, names_file, {"tasks": [{"builtin": "reverse", "held_out_templates": [1]}]},
                             data={"validation_size": 0}))
    with pytest.raises(TunelabError, match="reverse/1 held out, but the task has no validation or test records"):
        generation_pairs(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["task=chat"], "instruction-tuning tasks are a generation task"),
    (["train.early_stopping_patience=2", "train.eval_every=5"], "early stopping would choose the checkpoint"),
])
def test_instruct_config_rules(tmp_path, names_file, overrides, message):
    with pytest.raises(TunelabError, match=message):
        load_config(recipe(tmp_path, names_file, {"tasks": [{"builtin": "reverse"}]}), overrides)


def test_task_and_template_names_cannot_collide(tmp_path, names_file):
    bad = [{"name": "a/b", "templates": [{"prompt": "{name}", "completion": "x"}]},
           {"name": "t", "templates": [{"prompt": "{name}", "completion": "x"},
                                       {"name": "0", "prompt": "{name}!", "completion": "x"}]}]
    for task, msg in zip(bad, ["cannot hold '/'", "duplicate template names"]):
        with pytest.raises(TunelabError, match=msg):
            generation_pairs(load_config(recipe(tmp_path, names_file, {"tasks": [task]})))


def test_sni_exact_match_normalises_case_and_punctuation():
    from tunelab.metrics import answer_match

    assert answer_match("Paris.", "paris") and answer_match(" Yes!", "yes") and not answer_match("no", "yes")


def test_a_generation_cut_off_by_the_token_budget_is_not_kept():
    from tunelab.selfinstruct import cut_off

    def tok(text, add_special_tokens=False):  # one token a word
        return {"input_ids": text.split()}

    assert cut_off(" Add them.\nInput: 1 2\nOutput: the sum is", tok, 8)  # 8 words: ran out of tokens
    assert not cut_off(" Add them.\nInput: 1 2\nOutput: 3\n\nTask 4\nInstruction: more words here", tok, 8)
    assert not cut_off(" Add them.\nInput: 1\nOutput: 3", tok, 20)  # stopped by itself


def test_each_control_item_generates_its_own_token_budget(tmp_path, tiny_model):
    """Items of different budgets are not generated at the largest one and cut back (re-tokenizing a
    decoded text can merge tokens and keep too much): each equals its own generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.generate import generate
    from tunelab.probes import ControlItem, score_control

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(recipe(tmp_path, tiny_model, {"tasks": [{"builtin": "reverse"}]}))
    prompts = ["Reverse the name: emma. Answer:", "Reverse the name: olivia. Answer:", "What is the answer?"]
    items = [ControlItem(p, ["x"], "contains", "k", n, f"c.jsonl:{i}") for i, (p, n) in
             enumerate(zip(prompts, (1, 3, 7)))]
    got = [r["output"] for r in score_control(model, tok, cfg, items)["samples"]]
    assert got == [generate(model, tok, [it.prompt], max_new_tokens=it.max_new_tokens)[0][0] for it in items]


def test_a_conversation_control_item_is_rendered_by_the_chat_template_and_stops_on_its_turn(tmp_path,
                                                                                            tiny_chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data import chat
    from tunelab.generate import generate
    from tunelab.probes import ControlItem, score_control

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    (tmp_path / "r.yaml").write_text("task: chat\ndata: {train: c.jsonl}\nchat: {template: chatml}\n")
    cfg = load_config(tmp_path / "r.yaml")
    msgs = [{"role": "user", "content": "What is the first letter of the name?"}]
    items = [ControlItem(msgs, ["x"], "contains", "k", 5, "c.jsonl:1"),
             ControlItem("What is the answer?", ["x"], "contains", "k", 5, "c.jsonl:2")]
    got = [r["output"] for r in score_control(model, tok, cfg, items)["samples"]]
    tmpl = chat.resolve_template("chatml", tok)
    ids = tok(chat.render(tmpl, msgs, True, tok, "c"), add_special_tokens=False)["input_ids"]
    assert got == [generate(model, tok, [ids], max_new_tokens=5, stop_ids=[chat.stop_id(tmpl, tok)])[0][0],
                   generate(model, tok, ["What is the answer?"], max_new_tokens=5)[0][0]]
