"""What a chat run saves carries what it trained with: adapter/, model/ and a merged model hold the chat
template and a generation_config.json that stops at the end-of-turn token, so plain transformers stops
where tunelab chat does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.conftest import tunelab
from tunelab.data.chat import CHATML

NAMES = ["emma", "eva", "ethan", "elena"]
QUESTION = "What is the first letter of {}?"


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """Four conversations, twenty times each: short enough for the tiny model to learn to answer and stop."""
    rows = [{"messages": [{"role": "user", "content": QUESTION.format(n)}, {"role": "assistant", "content": n[0]}]}
            for n in NAMES] * 20
    p = tmp_path_factory.mktemp("saved_chat") / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def chat_recipe(d, model, data, template="chatml", train=None, **chat):
    recipe = {
        "task": "chat", "model": str(model),
        "data": {"train": str(data), "validation_size": 4, "max_length": 64},
        "chat": {"template": template, **chat},
        "train": {"mode": "lora", "max_steps": 4, "batch_size": 4, "lr": 2e-2, "warmup_steps": 0, "log_every": 0,
                  **(train or {})},
        "lora": {"r": 16, "alpha": 32, "targets": ["all-linear"]},
        "eval": {"max_new_tokens": 4, "batch_size": 16, "show": 0, "before": False},
        "output": {"dir": str(d / "run"), "report_to": ["none"]},
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "chat.yaml").write_text(yaml.safe_dump(recipe))
    return d / "chat.yaml"


def eos_ids(d):
    return json.loads((d / "generation_config.json").read_text())["eos_token_id"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_chat_model, conversations):
    """A LoRA chat run on the chatml template, trained until it answers and closes its turn."""
    d = tmp_path_factory.mktemp("lora_chat")
    tunelab("--quiet", "train", str(chat_recipe(d, tiny_chat_model, conversations, train={"max_steps": 100})))
    return d / "run"


def generate_plain(model_dir, max_new_tokens=40):
    """Each question answered by plain transformers from ``model_dir`` alone: (new tokens, their text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for name in NAMES:
        enc = tok.apply_chat_template([{"role": "user", "content": QUESTION.format(name)}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        out.append((new, tok.decode(new)))
    return out


def test_adapter_carries_the_template_and_its_stop(lora_run, tiny_chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    adapter = lora_run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "chat_template.jinja").read_text() == CHATML
    assert eos_ids(adapter) == [tok.eos_token_id, end]
    assert json.loads((lora_run / "eval.json").read_text())["exact_match"] == 1.0  # it answers, and stops
    from tunelab.config import load_config
    from tunelab.models import load_trained

    model, _ = load_trained(lora_run, load_config(lora_run).model)  # the adapter's stop tokens come with it
    assert model.generation_config.eos_token_id == [tok.eos_token_id, end]


def test_merged_model_stops_at_the_end_of_turn_in_plain_transformers(lora_run, tmp_path):
    merged = tmp_path / "merged"
    tunelab("merge", str(lora_run), str(merged))
    assert (merged / "chat_template.jinja").read_text() == CHATML
    from transformers import AutoTokenizer

    end = AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids("<|im_end|>")
    assert end in eos_ids(merged) and 1 in eos_ids(merged)  # (1: the tiny tokenizer's <eos>)
    for (new, text), name in zip(generate_plain(merged), NAMES):
        assert text == f"{name[0]}<|im_end|>", text  # answered, then stopped right after <|im_end|>
        assert len(new) == 2 < 40 and new[-1] == end


def test_a_run_saved_before_still_merges_and_chats(lora_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(lora_run, old)
    for name in ("chat_template.jinja", "generation_config.json"):
        (old / "adapter" / name).unlink()  # as tunelab saved an adapter before it kept them
    merged = tmp_path / "merged"
    tunelab("merge", str(old), str(merged))
    assert (merged / "chat_template.jinja").read_text() == CHATML  # from the run's config (chat.template=chatml)
    assert len(eos_ids(merged)) == 2
    talk = tunelab("chat", str(old), "--max-new-tokens", "4", stdin=f"{QUESTION.format('emma')}\n/exit\n")
    assert "assistant> e" in talk.stdout


def test_full_mode_model_dir_with_template_auto(tmp_path, tiny_chat_model, conversations):
    """chat.template=auto on a tokenizer without one is chatml: model/ carries it; tunelab still reads the run."""
    tunelab("--quiet", "train", str(chat_recipe(tmp_path, tiny_chat_model, conversations, "auto",
                                                train={"mode": "full", "max_steps": 30, "lr": 3e-3})))
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "chat_template.jinja").read_text() == CHATML
    assert len(eos_ids(model_dir)) == 2
    for (_, text), name in zip(generate_plain(model_dir), NAMES):
        assert text == f"{name[0]}<|im_end|>", text
    ev = json.loads(tunelab("eval", str(tmp_path / "run")).stdout.strip().splitlines()[-1])
    assert ev["exact_match"] == 1.0
    talk = tunelab("chat", str(tmp_path / "run"), "--max-new-tokens", "4", stdin=f"{QUESTION.format('eva')}\n")
    assert "assistant> e" in talk.stdout


def test_jinja_template_file_run(tmp_path, tiny_chat_model, conversations):
    """A template from a .jinja file is saved as trained; a merge takes that copy, not the file as it is now."""
    source = "{# mine #}" + CHATML  # (renders as chatml; the text differs)
    path = tmp_path / "mine.jinja"
    path.write_text(source)
    tunelab("--quiet", "train", str(chat_recipe(tmp_path, tiny_chat_model, conversations, str(path),
                                                stop="<|im_end|>")))
    run = tmp_path / "run"
    assert (run / "adapter" / "chat_template.jinja").read_text() == source
    path.write_text("{{ 'changed since' }}")
    tunelab("merge", str(run), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == source
    assert len(eos_ids(tmp_path / "merged")) == 2
