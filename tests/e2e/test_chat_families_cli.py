"""Chat runs with published templates that need more than one example per conversation (Qwen3) or refuse a
system message (Gemma 2), end to end: data show says what was done, training and evaluation run."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import tunelab
from tests.unit.test_chat_families import SHAPES, SYSTEM, family_tokenizer


def family_model(path, family: str):
    """A 2-layer Llama over the family's tokenizer (with its chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = family_tokenizer(family)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(("family", "expect"), [
    ("qwen3", "12 conversations trained turn by turn"),
    ("gemma2", "the template refuses a system message: 12 system prompts folded into the first user turn")])
def test_family_template_trains_with_data_show_saying_what_it_did(tmp_path, family, expect):
    model = family_model(tmp_path / "model", family)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [SYSTEM, *SHAPES["multi"]]}) + "\n" for _ in range(12)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "chat", "model": str(model),
        "data": {"train": str(data), "validation_size": 2, "max_length": 256},
        "train": {"mode": "lora", "max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1},
        "lora": {"r": 2, "alpha": 4}, "eval": {"max_new_tokens": 4, "batch_size": 4, "before": False},
        "output": {"dir": str(tmp_path / "run")}}))
    shown = tunelab("data", "show", str(recipe), "-n", "1")
    assert expect in shown.stdout  # (every split: 10 training conversations, 2 validation)
    run = tunelab("train", str(recipe))
    assert expect in run.stdout + run.stderr
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["chat"]["end_of_turn"] == {"qwen3": "<|im_end|>", "gemma2": "<end_of_turn>"}[family]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["n"] == (6 if family == "qwen3" else 2)  # Qwen3: each of the 3 turns of 2 conversations scored
