"""Exported GGUF files run in llama.cpp itself (llama-cpp-python, built from its source distribution:
``make test-llamacpp``): the same greedy outputs as transformers, the same tokenization for every
pre-tokenizer tunelab names, and a chat run that stops at the end of its turn through llama.cpp's own chat
formatting with the embedded template. Marked ``llamacpp``: the ordinary test run leaves them out."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import tunelab, write_recipe
from tunelab.export import gguf_file

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

TEXTS = ["Reverse the name: Emma. Answer:", "hello world 123 4567 89 x", " multiple   spaces\n\nnew\r\nlines\t tab",
         "Ünïcödé naïve café ß 東京", "it's we'll they've I'M DON'T", "a1b22c333 3.14159 -42 1,000,000", "  leading"]


def llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kw)


def greedy(llm, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        if llm_is_end(llm, t) or len(out) >= n:
            break
        out.append(t)
    return out


def llm_is_end(llm, t: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, t))


def pre_tokenizer(name: str):
    """The pre-tokenizer that gguf_file.PRE_TOKENIZERS describes as ``name``, as the tokenizers library builds it."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return {"gpt-2": byte_level,
            "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
            "llama-bpe": pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(gguf_file._LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])}[name]


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory, tiny_model, names_file):
    d = tmp_path_factory.mktemp("llamacpp")
    tunelab("--quiet", "train", str(write_recipe(d / "r.yaml", tiny_model, names_file, train={"max_steps": 30},
                                                 eval={"before": False})))
    tunelab("export", str(d / "run"), str(d / "hf"), "--format", "hf")
    return d


@pytest.mark.parametrize(("quant", "share"), [("f16", 0.98), ("q8_0", 0.9), ("q4_0", 0.5)])
def test_gguf_generates_what_transformers_generates(reverse_run, names_file, quant, share):
    """f16: the same text (rounding may flip a near tie); the block types: mostly the same."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = reverse_run / f"m-{quant}.gguf"
    tunelab("export", str(reverse_run / "run"), str(out), "--format", "gguf", "--quant", quant, "--force")
    tok = AutoTokenizer.from_pretrained(reverse_run / "hf")
    model = AutoModelForCausalLM.from_pretrained(reverse_run / "hf").eval()
    llm = llama(out)
    names = names_file.read_text().split()[-50:]
    same = 0
    for name in names:
        ids = tok(f"Reverse the name: {name}. Answer:", add_special_tokens=False)["input_ids"]
        assert llm.tokenize(f"Reverse the name: {name}. Answer:".encode(), add_bos=False, special=True) == ids
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        hf = hf[:hf.index(tok.eos_token_id)] if tok.eos_token_id in hf else hf
        same += hf == greedy(llm, ids, 8)
    assert same >= share * len(names), f"{same} of {len(names)} the same"


@pytest.mark.parametrize("name", [n for n, _ in gguf_file.PRE_TOKENIZERS])
def test_each_named_pre_tokenizer_splits_as_llamacpp_does(tmp_path, tiny_model, name):
    """The tiny model's vocabulary under each pre-tokenizer tunelab knows a llama.cpp name for: llama.cpp,
    loading the export with that name, tokenizes every text exactly as transformers does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.pre_tokenizer = pre_tokenizer(name)
    tk.save(str(d / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(d)
    out = tmp_path / "m.gguf"
    assert gguf_file.write_gguf(d, out)["pre_tokenizer"] == name
    llm = llama(out, vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(
            text, add_special_tokens=False)["input_ids"], (name, text)


def test_chat_run_stops_at_the_end_of_its_turn_in_llamacpp(tmp_path, tiny_chat_model):
    """Through llama.cpp's chat formatting (the template embedded in the GGUF), the answer ends where the
    assistant's turn ends (<|im_end|>), as tunelab eval scores it."""
    names = ["emma", "eva", "ethan", "elena"]
    rows = [{"messages": [{"role": "user", "content": f"What is the first letter of {n}?"},
                          {"role": "assistant", "content": n[0]}]} for n in names] * 20
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "task": "chat", "model": str(tiny_chat_model),
        "data": {"train": str(tmp_path / "chat.jsonl"), "validation_size": 4, "max_length": 64},
        "chat": {"template": "chatml"},
        "train": {"mode": "lora", "max_steps": 100, "batch_size": 4, "lr": 2e-2, "warmup_steps": 0},
        "lora": {"r": 16, "alpha": 32, "targets": ["all-linear"]},
        "eval": {"max_new_tokens": 4, "before": False}, "output": {"dir": str(tmp_path / "run")}}))
    tunelab("--quiet", "train", str(tmp_path / "r.yaml"))
    scored = json.loads((tmp_path / "run" / "eval.json").read_text())["exact_match"]
    tunelab("export", str(tmp_path / "run"), str(tmp_path / "m.gguf"), "--format", "gguf")
    llm = llama(tmp_path / "m.gguf")
    right = 0
    for n in names:
        out = llm.create_chat_completion([{"role": "user", "content": f"What is the first letter of {n}?"}],
                                         temperature=0.0, max_tokens=20)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # stopped at <|im_end|>, not at max_tokens
        right += choice["message"]["content"].strip() == n[0]
    assert abs(right / len(names) - scored) <= 0.25


def test_f32_logits_equal_transformers_at_every_position(tmp_path, tiny_model):
    """Logits at every position of a longer prompt, for a model with a RoPE base other than the default
    (SmolLM2's is 100000): a wrong base or a wrong head layout grows with the position."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    gguf_file.write_gguf(d, tmp_path / "m.gguf", "f32")
    ids = tok("Reverse the name: Maximilian. Answer: nailimixaM Reverse the name: Anna.",
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama(tmp_path / "m.gguf", logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("quant", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_block_types_are_byte_for_byte_llamacpps_own_quantization(tmp_path, tiny_model, quant):
    """tunelab's q8_0 ... q4_0 tensors equal what llama.cpp's quantizer writes from the same float32 file."""
    import ctypes

    import gguf
    import numpy as np

    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    gguf_file.write_gguf(tiny_model, f32, "f32")
    gguf_file.write_gguf(tiny_model, ours, quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.attn_v.weight"):
        assert a[name].tensor_type == b[name].tensor_type == gguf.GGMLQuantizationType[quant.upper()]
        assert np.array_equal(np.array(a[name].data), np.array(b[name].data)), name
