"""GGUF files and Ollama templates, checked without the runtimes (tests/llamacpp checks them with llama.cpp):
the GGUF read back with gguf's reader against the transformers weights and tokenizer; the Ollama TEMPLATE
rendered by a Go-template interpreter against the Jinja chat template."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import build_tiny_model
from tests.gotemplate import render as go_render
from tests.unit.test_chat_families import family_tokenizer
from tunelab.data import chat
from tunelab.errors import TunelabError
from tunelab.export import gguf_file, ollama


def test_interleave_halves_by_hand():
    # one head of 4 rows: halves (0, 1) and (2, 3) become pairs (0, 2), (1, 3)
    w = np.arange(8).reshape(4, 2)
    assert gguf_file.interleave_halves(w, 1)[:, 0].tolist() == [0, 4, 2, 6]
    two = np.arange(8).reshape(8, 1)  # two heads of 4 rows each
    assert gguf_file.interleave_halves(two, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("untied") / "model", tie=False, chat=True)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_holds_the_weights_and_tokenizer(tmp_path, tiny_untied, quant):
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "m.gguf"
    info = gguf_file.write_gguf(tiny_untied, out, quant, "tiny", end_of_turn=[7])
    r = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    cfg = json.loads((tiny_untied / "config.json").read_text())
    assert field["general.architecture"] == "llama" and field["llama.block_count"] == cfg["num_hidden_layers"]
    assert field["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert field["tokenizer.ggml.pre"] == info["pre_tokenizer"] == "gpt-2"
    tok = AutoTokenizer.from_pretrained(tiny_untied)
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert len(tokens) == cfg["vocab_size"] and tokens[tok.eos_token_id] == "<eos>"
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tok("Reverse", add_special_tokens=False)["input_ids"][0]] == gguf.TokenType.NORMAL
    assert field["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and field["tokenizer.ggml.eot_token_id"] == 7
    weights = load_file(tiny_untied / "model.safetensors")
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" in tensors  # untied: the head is its own tensor
    head = gguf.GGMLQuantizationType.F32 if quant == "f32" else gguf.GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == head  # (q8_0 keeps the output head in f16)
    q = weights["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    got = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_q.weight"].tensor_type)
    want = gguf_file.interleave_halves(q, cfg["num_attention_heads"])
    tol = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2, "q4_0": 0.15}[quant] * float(np.abs(q).max())
    assert np.abs(got.reshape(want.shape) - want).max() <= tol + 1e-9
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(np.array(norm.data)), weights["model.layers.0.input_layernorm.weight"])


def test_tied_embeddings_write_no_output_tensor(tmp_path, tiny_model):
    import gguf

    gguf_file.write_gguf(tiny_model, tmp_path / "m.gguf", "f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}


def test_unsupported_architecture_and_tokenizer_are_refused(tmp_path, tiny_model):
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(TunelabError, match="GGUF export supports LlamaForCausalLM, MistralForCausalLM; this model "
                                           "is GPT2LMHeadModel"):
        gguf_file.write_gguf(d, tmp_path / "m.gguf")
    (d / "config.json").write_text(json.dumps(cfg))
    tj = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**tj, "pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(TunelabError, match="pre-tokenizer .* is not one whose llama.cpp name is known"):
        gguf_file.write_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


OLLAMA_FAMILIES = ["llama3.1", "qwen2.5", "qwen3", "gemma3", "phi-3.5", "phi-4-mini", "smollm3"]


@pytest.mark.parametrize("family", OLLAMA_FAMILIES)
def test_ollama_template_renders_as_the_jinja_template(family):
    tok = family_tokenizer(family)
    tmpl = chat.resolve_template("model", tok)
    w = ollama.wrappers(tmpl, tok)
    ollama.check_wrappers(w, tmpl, tok)
    template = ollama.go_template(w)
    for messages in ollama.CHECKS + [[{"role": "user", "content": "Reverse the name Anna."},
                                      {"role": "assistant", "content": "annA"},
                                      {"role": "user", "content": "And Emma?"}]]:
        go = go_render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
        assert go == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), family


def test_a_template_that_is_not_role_wrapped_is_refused_for_ollama():
    tok = family_tokenizer("mistral-v0.3")  # puts the system prompt into the last user turn
    tmpl = chat.resolve_template("model", tok)
    with pytest.raises(TunelabError, match="does not wrap each message in text that depends only on its role"):
        ollama.check_wrappers(ollama.wrappers(tmpl, tok), tmpl, tok)


def test_modelfile_has_template_stop_and_system():
    tok = family_tokenizer("qwen2.5")
    tmpl = chat.resolve_template("model", tok)
    text = ollama.modelfile(ollama.wrappers(tmpl, tok), ["<|im_end|>"], "Answer in one word.", "model.gguf")
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf" and lines[1].startswith('TEMPLATE """{{ range $i, $m := .Messages }}')
    assert 'PARAMETER stop "<|im_end|>"' in lines and lines[-1] == 'SYSTEM """Answer in one word."""'


def test_rope_base_comes_from_the_config_in_either_spelling(tmp_path, tiny_model):
    import gguf

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    for spelling in ({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}},
                     {"rope_theta": 100000.0, "rope_parameters": None}):
        (d / "config.json").write_text(json.dumps({**cfg, **spelling}))
        gguf_file.write_gguf(d, tmp_path / "m.gguf", "f16")
        assert gguf.GGUFReader(tmp_path / "m.gguf").fields["llama.rope.freq_base"].contents() == 100000.0
