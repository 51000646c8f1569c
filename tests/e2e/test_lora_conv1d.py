"""End to end on a GPT-2-style model: LoRA on its Conv1D layers (c_attn, c_proj) trains through the CLI,
merges, and the merged model is the adapted one."""

from __future__ import annotations

import json

import torch
from conftest import tunelab, write_recipe


def test_lora_on_conv1d_trains_and_merges(tmp_path, tiny_gpt2, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_gpt2, names_file,
                          train={"max_steps": 6, "lr": 2e-2, "dropout": 0.0},  # 0: the shared-prefix path
                          lora={"r": 4, "alpha": 16, "targets": ["c_attn", "c_proj"]})
    proc = tunelab("train", str(recipe))
    run = tmp_path / "run"
    assert "trainable parameters: 2,816" in proc.stderr  # 2 blocks × 4·((32+96) + (32+32) + (128+32))
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["c_attn", "c_proj"] and adapter["fan_in_fan_out"] is True
    assert 0.0 <= json.loads((run / "eval.json").read_text())["exact_match"] <= 1.0

    out = tmp_path / "merged"
    tunelab("merge", str(run), str(out))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)("Reverse the name: emma. Answer:", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapter_logits = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # training changed something
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
