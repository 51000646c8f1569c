"""Shared fixtures: a tiny Llama-architecture model and tokenizer built here, offline, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NAMES = ROOT / "data" / "names.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n auto: a worker a core. Each worker, and each tunelab process a test starts (they inherit this),
    # computes on one thread: tiny models gain nothing from a thread pool, and a pool a core per worker fights
    # the other workers' pools for the same cores. Read by torch when it starts, so before anything imports it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]


def build_tiny_model(path: Path, tie: bool = True, seed: int = 0, chat: bool = False) -> Path:
    """A 2-layer, 64-wide Llama with a small BPE tokenizer trained on names and prompt words.

    ``chat``: the tokenizer also knows the chatml and llama3 special tokens and has a BOS token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    names = NAMES.read_text().split()[:2000]
    corpus = [f"Reverse the name: {n}. Answer: {n[::-1]}" for n in names]
    corpus += ["What is the answer? yes no maybe Question: Translate this sentence"] * 10
    if chat:
        corpus += ["system user assistant What is the first letter of the name? Be brief. hello bye"] * 10
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<unk>"] + (["<s>"] + CHAT_TOKENS if chat else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  **({"bos_token": "<s>", "additional_special_tokens": CHAT_TOKENS} if chat else {}))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tinychat") / "model", chat=True)


@pytest.fixture(scope="session")
def names_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "names.txt"
    p.write_text("\n".join(NAMES.read_text().split()[:400]) + "\n")
    return p


def write_recipe(path: Path, model: Path, names: Path, **sections) -> Path:
    """A reverse-names recipe for the tiny model; keyword arguments update its sections."""
    recipe = {
        "model": str(model),
        "data": {"train": {"path": str(names), "text_field": "name"}, "unique_by": "name",
                 "validation_size": 40, "prompt": "Reverse the name: {name}. Answer:",
                 "completion": " {name|reverse}", "max_length": 48},
        "train": {"mode": "lora", "max_steps": 6, "batch_size": 8, "lr": 5e-3, "warmup_steps": 2,
                  "log_every": 1},
        "lora": {"r": 4, "alpha": 8},
        "eval": {"max_new_tokens": 8, "batch_size": 16, "max_examples": 20, "show": 3},
        "output": {"dir": str(path.parent / "run")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def recipe(tmp_path, tiny_model, names_file) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)


def tunelab(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a subprocess, as a user would (``env`` adds environment variables)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def build_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 (Conv1D layers c_attn, c_proj, c_fc; absolute position embeddings; the head
    tied to the input embeddings) with a small BPE tokenizer that, like GPT-2's, has no pad token and one
    special token, <|endoftext|>, for beginning, end and unknown."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    names = NAMES.read_text().split()[:2000]
    corpus = [f"Reverse the name: {n}. Answer: {n[::-1]}" for n in names]
    end = "<|endoftext|>"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[end], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=end, eos_token=end, unk_token=end)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tinygpt2") / "model")
