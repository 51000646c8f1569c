"""Chat tuning end to end on a tiny model: train, data show, eval, chat."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from tests.conftest import NAMES, tunelab


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for name in NAMES.read_text().split()[:120]:
        msgs = [{"role": "user", "content": f"What is the first letter of {name}?"},
                {"role": "assistant", "content": name[0]}]
        if rng.random() < 0.5:
            msgs += [{"role": "user", "content": "And the last?"}, {"role": "assistant", "content": name[-1]}]
        rows.append({"messages": msgs})
    p = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def chat_recipe(tmp_path, model, data, **chat):
    recipe = {
        "task": "chat", "model": str(model),
        "data": {"train": str(data), "validation_size": 20, "max_length": 160},
        "chat": {"template": "chatml", "system": "Answer with one letter.", **chat},
        "train": {"mode": "lora", "max_steps": 4, "batch_size": 8, "lr": 5e-3, "log_every": 1},
        "lora": {"r": 4, "alpha": 8},
        "eval": {"max_new_tokens": 4, "batch_size": 16, "show": 3},
        "output": {"dir": str(tmp_path / "run")},
    }
    p = tmp_path / "chat.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def test_chat_train_eval_and_talk(tmp_path, tiny_chat_model, chat_data):
    recipe = chat_recipe(tmp_path, tiny_chat_model, chat_data)
    proc = tunelab("train", str(recipe))
    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert 0.0 <= ev["exact_match"] <= 1.0 and ev["n"] == 20
    assert (run / "adapter" / "adapter_config.json").exists()
    assert "before fine-tuning" in proc.stdout and "after fine-tuning" in proc.stdout
    # eval on the run directory goes through the same template
    out = tunelab("eval", str(run))
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 20
    # chat reads turns from stdin and answers each through the template
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    talk = subprocess.run([sys.executable, "-m", "tunelab.cli", "chat", str(run), "--max-new-tokens", "3"],
                          input="What is the first letter of emma?\n/reset\nAnd the last?\n/exit\nnever read\n",
                          capture_output=True, text=True, env=env, timeout=300)
    assert talk.returncode == 0, talk.stderr
    replies = [line for line in talk.stdout.splitlines() if line.startswith("assistant>")]
    assert len(replies) == 2


def test_chat_data_show_marks_assistant_tokens(tmp_path, tiny_chat_model, chat_data):
    recipe = chat_recipe(tmp_path, tiny_chat_model, chat_data)
    out = tunelab("data", "show", str(recipe), "-n", "2").stdout
    assert "⟦" in out and "<|im_end|>⟧" in out
    assert "⟦<|im_start|>" not in out  # template tokens before an answer carry no loss
    assert "<|im_start|>system\nAnswer with one letter.<|im_end|>" in out


def test_chat_bad_input(tmp_path, tiny_chat_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                 "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    recipe = chat_recipe(tmp_path, tiny_chat_model, bad)
    proc = tunelab("train", str(recipe), "data.validation_size=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tunelab: {bad}:2: no assistant turn: nothing to train on"
    assert not (tmp_path / "run").exists()
    plain = tunelab("chat", str(tiny_chat_model), "--template", "nope", check=False)
    assert plain.returncode == 2 and "unknown chat template 'nope'" in plain.stderr
