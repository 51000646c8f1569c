"""tunelab export --format hf | gguf | ollama on tiny runs, as a subprocess: what each writes, and the bad input
(tests/llamacpp runs the exported files in llama.cpp itself)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import tunelab, write_recipe


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory, tiny_model, names_file):
    d = tmp_path_factory.mktemp("export")
    tunelab("--quiet", "train", str(write_recipe(d / "r.yaml", tiny_model, names_file, train={"max_steps": 2},
                                                 eval={"before": False, "max_examples": 4})))
    return d / "run"


def test_export_hf_is_one_merged_directory(tmp_path, reverse_run):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = tunelab("export", str(reverse_run), str(out), "--format", "hf")
    assert "merged transformers model written to" in proc.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "eos_token_id" in json.loads((out / "generation_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_export_gguf_and_its_bad_input(tmp_path, reverse_run):
    import gguf

    out = tmp_path / "m.gguf"
    proc = tunelab("export", str(reverse_run), str(out), "--format", "gguf", "--quant", "q8_0")
    assert "GGUF (q8_0) written to" in proc.stderr and proc.stdout == ""
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left
    again = tunelab("export", str(reverse_run), str(out), "--format", "gguf", check=False)
    assert again.returncode == 2 and "output file exists (--force replaces it)" in again.stderr
    wrong = tunelab("export", str(reverse_run), str(tmp_path / "m.bin"), "--format", "gguf", check=False)
    assert wrong.returncode == 2 and "give a path ending in .gguf" in wrong.stderr
    no_chat = tunelab("export", str(reverse_run), str(tmp_path / "o"), "--format", "ollama", check=False)
    assert no_chat.returncode == 2 and "an Ollama model needs a chat template" in no_chat.stderr
    assert len(no_chat.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_classification_run_is_not_exported_as_gguf(tmp_path, reverse_run):
    run = tmp_path / "cls"
    run.mkdir()
    cfg = yaml.safe_load((reverse_run / "config.yaml").read_text())
    cfg["task"] = "classification"
    cfg["classify"] = {"text": "Name: {name}", "label": "{name|vowels}"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = tunelab("export", str(run), str(tmp_path / "c.gguf"), "--format", "gguf", check=False)
    assert proc.returncode == 2 and "a classification run exports as a sequence-classification model" in proc.stderr


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_chat_model):
    d = tmp_path_factory.mktemp("export_chat")
    rows = [{"messages": [{"role": "user", "content": f"What is the first letter of {n}?"},
                          {"role": "assistant", "content": n[0]}]} for n in ("emma", "eva", "ethan", "elena")] * 5
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "r.yaml").write_text(yaml.safe_dump({
        "task": "chat", "model": str(tiny_chat_model),
        "data": {"train": str(d / "chat.jsonl"), "validation_size": 4, "max_length": 128},
        "chat": {"template": "chatml", "system": "Answer with one letter."},
        "train": {"mode": "lora", "max_steps": 2, "batch_size": 4},
        "eval": {"max_new_tokens": 4, "before": False}, "output": {"dir": str(d / "run")}}))
    tunelab("--quiet", "train", str(d / "r.yaml"))
    return d / "run"


def test_export_ollama_writes_gguf_modelfile_and_readme(tmp_path, chat_run):
    from tests.gotemplate import render as go_render
    from tunelab.data.chat import CHATML, ChatTemplate, render

    out = tmp_path / "ollama"
    tunelab("export", str(chat_run), str(out), "--format", "ollama")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".tunelab")) == [
        "Modelfile", "README.md", "model.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """Answer with one letter."""' in modelfile
    assert "ollama create NAME -f Modelfile" in (out / "README.md").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    messages = [{"role": "system", "content": "Answer with one letter."},
                {"role": "user", "content": "What is the first letter of emma?"}]

    class Tok:
        bos_token = eos_token = ""

    want = render(ChatTemplate("chatml", CHATML, "<|im_end|>"), messages, True, Tok(), "test")
    assert go_render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}) == want
