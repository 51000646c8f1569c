"""A transformers model directory (a merged run) -> one GGUF file that llama.cpp, Ollama and LM Studio load,
written with the ``gguf`` package (llama.cpp's own Python library).

What a correct file holds, as llama.cpp reads it:

- the architecture's hyper-parameters under ``<arch>.*`` (context length, widths, heads, RoPE base, norm
  epsilon) and ``general.file_type``;
- the tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...: gguf's TensorNameMap). The
  query and key projections are reordered: transformers' Llama rotates the two halves of each head
  (``rotate_half``), llama.cpp rotates adjacent pairs, so each head's rows (0..d/2, d/2..d) are interleaved.
  Norms stay float32; the other matrices are f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (the block
  types gguf's own quantizers write as llama.cpp does; a matrix whose rows are not a whole number of blocks
  stays f16, and so does the output head: its rounding goes straight into the logits;
  on the main job's model it is the difference between 1.2 and 0.8 points of exact match below float32).
  Tied embeddings write no ``output`` tensor: llama.cpp reuses ``token_embd`` as the head;
- the tokenizer: every token as its byte-level text, its type (normal, control for special tokens,
  user-defined for other added ones, unused for padding rows), the merges, the pre-tokenizer's name (how
  llama.cpp splits text before BPE: it must match the tokenizer's, or outputs are quietly worse), the
  BOS/EOS/pad ids and whether BOS is added (gguf's SpecialVocab reads them), the end-of-turn token, and
  the chat template.

Architectures: Llama-family (LlamaForCausalLM, MistralForCausalLM without sliding windows; this covers the
built-in SmolLM2). Others are refused with a one-line error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import TunelabError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f32")  # what gguf's quantizers write exactly

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# the pre-tokenizers (tokenizer.json "pre_tokenizer") whose llama.cpp name is known, each checked against
# llama.cpp's own tokenization (tests/slow/test_llamacpp.py)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: list[tuple[str, Any]] = [
    ("gpt-2", _BYTE_LEVEL),  # GPT-2, and SmolLM2 as transformers converts it from its GGUF
    ("smollm", {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       _BYTE_LEVEL]}),  # SmolLM / SmolLM2 from the hub
    ("llama-bpe", {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}),  # Llama 3.x
]


def _matches(pattern: Any, actual: Any) -> bool:
    """``actual`` has every key of ``pattern`` with the same value (lists item by item)."""
    if isinstance(pattern, dict):
        return isinstance(actual, dict) and all(k in actual and _matches(v, actual[k]) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(actual, list) and len(actual) == len(pattern) and all(
            _matches(p, a) for p, a in zip(pattern, actual))
    return pattern == actual


def pre_tokenizer_name(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a one-line error for one it is not known for."""
    pre = tokenizer_json.get("pre_tokenizer")
    for name, pattern in PRE_TOKENIZERS:
        if _matches(pattern, pre):
            return name
    shown = json.dumps(pre)[:100]
    raise TunelabError(f"GGUF export: this tokenizer's pre-tokenizer ({shown}) is not one whose llama.cpp name is "
                       f"known ({', '.join(n for n, _ in PRE_TOKENIZERS)}): llama.cpp would split text differently "
                       "and the model would be quietly worse (use --format hf)", where)


def check_architecture(config: dict, where: str) -> str:
    """The GGUF architecture name of a transformers config, or a one-line error for one not supported."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = ARCHITECTURES.get(archs[0])
    if arch is None:
        raise TunelabError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this model is {archs[0]} "
                           "(use --format hf, and llama.cpp's convert_hf_to_gguf.py on it)", where)
    if config.get("sliding_window") not in (None, 0) and archs[0] == "MistralForCausalLM":
        raise TunelabError("GGUF export: Mistral with sliding-window attention is not supported (use --format hf)",
                           where)
    kind = rope(config)[1]
    if kind not in ("default", "linear"):
        raise TunelabError(f"GGUF export: RoPE scaling {kind!r} is not supported (use --format hf)", where)
    return arch


def rope(config: dict) -> tuple[float, str, float]:
    """RoPE's base, scaling kind and factor from a config: transformers 5 keeps them in ``rope_parameters``,
    earlier versions in ``rope_theta`` and ``rope_scaling``."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type")) or "default"
    return float(theta), kind, float(params.get("factor", 1.0))


def interleave_halves(w, n_heads: int):
    """(heads·d, in) rows of a query or key projection, each head's two halves (0..d/2, d/2..d) interleaved
    into pairs (0, d/2, 1, d/2+1, ...): transformers' rotate_half layout -> llama.cpp's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokens(tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Every token's text by id and its GGUF type; ids past the tokenizer's (embedding rows it never uses) are
    unused padding tokens."""
    import gguf

    texts: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in texts}
    for added in tokenizer_json.get("added_tokens", []):
        texts[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(texts) >= n_vocab:
        raise TunelabError(f"GGUF export: the tokenizer has token id {max(texts)} but the model only {n_vocab} "
                           "embedding rows", "tokenizer.json")
    return ([texts.get(i, f"[PAD{i}]") for i in range(n_vocab)],
            [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)])


def write_gguf(model_dir: Path, out: Path, quant: str = "f16", name: str | None = None,
               end_of_turn: list[int] | None = None) -> dict[str, Any]:
    """Write ``model_dir`` (config.json, safetensors weights, tokenizer.json) as the GGUF file ``out``; returns
    what was written (architecture, pre-tokenizer, tensor types)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    logging.getLogger("gguf").setLevel(logging.WARNING)  # (its writer logs every file it writes)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = check_architecture(config, str(model_dir / "config.json"))
    tok_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tok_json.get("model", {}).get("type") != "BPE" or tok_json["model"].get("byte_fallback"):
        raise TunelabError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM); this one is "
                           f"{tok_json.get('model', {}).get('type')} (use --format hf)", str(model_dir))
    pre = pre_tokenizer_name(tok_json, str(model_dir / "tokenizer.json"))
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_heads
    n_vocab = config["vocab_size"]
    tied = config.get("tie_word_embeddings", False)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    ftype = gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]
    blocky = quant.startswith("q")

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or model_dir.name)
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    theta, rope_kind, factor = rope(config)
    w.add_rope_freq_base(theta)
    if rope_kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)

    tokens, types = _tokens(tok_json, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(w, quiet=True)  # merges, bos/eos/unk/pad ids, add_bos_token, the chat template
    eos = special.special_token_ids.get("eos")
    turn_ends = [i for i in (end_of_turn or []) if i != eos]
    if turn_ends:
        w.add_eot_token_id(turn_ends[0])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    written: dict[str, str] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TunelabError("no safetensors weights to export", str(model_dir))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue
                gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gname is None:
                    raise TunelabError(f"GGUF export: no llama.cpp name for the tensor {key}", str(file))
                data = f.get_tensor(key).float().numpy()
                if key.endswith("self_attn.q_proj.weight"):
                    data = interleave_halves(data, n_heads)
                elif key.endswith("self_attn.k_proj.weight"):
                    data = interleave_halves(data, n_kv)
                kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
                if blocky and kind == qtype and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
                    kind = gguf.GGMLQuantizationType.F16  # the output head: its errors go straight into the logits
                try:
                    packed = gguf.quants.quantize(data, kind)
                except gguf.QuantError:  # rows not a whole number of blocks
                    kind = gguf.GGMLQuantizationType.F16
                    packed = gguf.quants.quantize(data, kind)
                w.add_tensor(gname, np.ascontiguousarray(packed), raw_dtype=kind)
                written[gname] = kind.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "pre_tokenizer": pre, "quant": quant, "tensors": written}
