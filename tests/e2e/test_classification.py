"""Classification end to end: train (head, LoRA + head, full), eval, predict, export, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file


def _recipe(tmp_path: Path, tiny_model: Path, names_file: Path, **train) -> Path:
    return write_recipe(
        tmp_path / "r.yaml", tiny_model, names_file, task="classification",
        data={"prompt": "{prompt}", "completion": "{completion}", "max_length": 24},
        classify={"text": "Name: {name}", "label": "{name|vowels}", "pooling": "last", "bias": True},
        train={"max_steps": 8, "batch_size": 16, "lr": 1e-2, "checkpoint_every": 4, **train},
        eval={"max_examples": None, "batch_size": 32},
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["head", "lora", "full"])
def test_train_eval_predict(tmp_path, tiny_model, names_file, mode):
    recipe = _recipe(tmp_path, tiny_model, names_file, mode=mode, max_steps=30 if mode != "lora" else 8)
    proc = tunelab("train", str(recipe))
    run = tmp_path / "run"
    result = json.loads((run / "eval.json").read_text())
    labels = result["labels"]
    assert labels == sorted(labels, key=int) and len(labels) >= 3
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1 and result["n"] == 40
    assert len(result["confusion"]) == len(labels) and sum(map(sum, result["confusion"])) == 40
    assert "confusion matrix after fine-tuning:" in proc.stdout and "accuracy" in proc.stdout
    k = len(labels)
    if mode == "head":
        assert f"trainable parameters: {k * 64 + k:,} of" in proc.stderr
        saved = load_file(run / "checkpoints" / "step-30" / "trainable.safetensors")
        assert set(saved) == {"head.weight", "head.bias"}  # nothing of the language model trains
        assert (run / "classifier" / "classifier_head.safetensors").exists() and not (run / "model").exists()
    if mode == "lora":
        assert (run / "adapter" / "adapter_model.safetensors").exists()
        assert (run / "adapter" / "classifier_head.safetensors").exists()
    if mode != "lora":
        rows = _metrics(run)
        assert sum(r["loss"] for r in rows[-5:]) / 5 < sum(r["loss"] for r in rows[:5]) / 5

    again = json.loads(tunelab("eval", str(run)).stdout.strip().splitlines()[-1])
    assert again["accuracy"] == result["accuracy"] and again["confusion"] == result["confusion"]

    out = tunelab("predict", str(run), "emma", "christopher").stdout.strip().splitlines()
    preds = [json.loads(line) for line in out]
    assert [p["text"] for p in preds] == ["Name: emma", "Name: christopher"]
    for p in preds:
        assert set(p["probs"]) == set(labels) and abs(sum(p["probs"].values()) - 1) < 1e-4
        assert p["label"] == max(p["probs"], key=p["probs"].get)
    (tmp_path / "in.jsonl").write_text('{"name": "ava"}\n{"name": "olivia"}\n')
    tunelab("predict", str(run), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl"))
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
    # a record without the template's field is an error at its line (not its location taken as the text)
    (tmp_path / "bad.jsonl").write_text('{"name": "ava"}\n{}\n')
    bad = tunelab("predict", str(run), "--input", str(tmp_path / "bad.jsonl"), check=False)
    assert bad.returncode == 2 and "bad.jsonl:2" in bad.stderr and "name" in bad.stderr and not bad.stdout
    isdir = tunelab("predict", str(run), "emma", "--output", str(tmp_path), check=False)
    assert isdir.returncode == 2 and "is a directory" in isdir.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("pad", ["own", "eos"])
def test_export_gives_the_same_logits(tmp_path, tiny_model, names_file, pad):
    """pad == eos (SmolLM2's tokenizer) with texts ending in EOS: transformers pools the rightmost token that
    is not the pad token, so the export gets a pad token of its own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, text = tiny_model, "Name: {name}"
    if pad == "eos":
        import shutil

        model = tmp_path / "m"
        shutil.copytree(tiny_model, model)
        t = AutoTokenizer.from_pretrained(model)
        t.pad_token = t.eos_token
        t.save_pretrained(model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "pad_token_id": t.eos_token_id}))
        text = "Name: {name}<eos>"
    recipe = write_recipe(
        tmp_path / "r.yaml", model, names_file, task="classification",
        data={"max_length": 24}, classify={"text": text, "label": "{name|vowels}"},
        train={"max_steps": 4, "batch_size": 16, "lr": 1e-2}, eval={"before": False, "max_examples": None})
    tunelab("train", str(recipe))
    tunelab("export", str(tmp_path / "run"), str(tmp_path / "hf"))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    if pad == "eos":
        assert tok.pad_token == "<|tunelab_pad|>" and hf.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    enc = tok([text.format(name="emma"), text.format(name="christopher")], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = hf(**enc).logits
    preds = [json.loads(line) for line in
             tunelab("predict", str(tmp_path / "run"), "emma", "christopher").stdout.strip().splitlines()]
    for row, p in zip(logits.softmax(-1), preds):
        ours = torch.tensor([p["probs"][hf.config.id2label[i]] for i in range(len(row))])
        assert torch.allclose(row, ours, atol=1e-4)


def _bad(tmp_path, tiny_model, names_file, case):
    if case == "label outside the label set":
        _recipe(tmp_path, tiny_model, names_file)
        return ['classify.labels=["0","1","2"]'], "is not in the label set (0, 1, 2)"
    if case == "one class":
        _recipe(tmp_path, tiny_model, names_file)
        return ["classify.label=x"], "the training set has a single class ('x')"
    if case == "empty text":
        (tmp_path / "d.jsonl").write_text('{"t": "a", "y": "p"}\n{"t": "", "y": "q"}\n')
        write_recipe(tmp_path / "r.yaml", tiny_model, names_file, task="classification",
                     data={"train": str(tmp_path / "d.jsonl"), "unique_by": None, "validation_size": 0},
                     classify={"text": "{t}", "label": "{y}"})
        return [], "d.jsonl:2: empty text"
    if case in ("empty label", "null label"):
        rows = [{"t": "a", "y": "1"}, {"t": "b", "y": "2"}, {"t": "c", "y": "" if case == "empty label" else None}]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_recipe(tmp_path / "r.yaml", tiny_model, names_file, task="classification",
                     data={"train": str(tmp_path / "d.jsonl"), "unique_by": None, "validation_size": 0},
                     classify={"text": "{t}", "label": "{y}"})
        return [], "d.jsonl:3: empty label"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["label outside the label set", "one class", "empty text", "empty label",
                                  "null label"])
def test_bad_classification_input(tmp_path, tiny_model, names_file, case):
    args, expected = _bad(tmp_path, tiny_model, names_file, case)
    proc = tunelab("--quiet", "train", str(tmp_path / "r.yaml"), *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tunelab: ") and expected in last, last
    assert not (tmp_path / "run").exists()


def test_k_mismatch_on_reload(tmp_path, tiny_model, names_file):
    recipe = _recipe(tmp_path, tiny_model, names_file, mode="head", max_steps=2)
    tunelab("train", str(recipe), "eval.before=false")
    proc = tunelab("eval", str(tmp_path / "run"), "classify.label={name|len}", check=False)
    assert proc.returncode == 2
    assert "the run's head has" in proc.stderr.strip().splitlines()[-1]
