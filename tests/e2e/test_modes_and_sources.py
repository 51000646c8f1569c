"""What trains (head, freeze), formatter hooks, dataset sources, hub errors — through the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from conftest import tunelab, write_recipe
from safetensors.torch import load_file


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_head_mode_unties_and_trains_only_the_head(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"mode": "head", "max_steps": 5, "lr": 1e-2},
                          eval={"before": False, "generate": False})
    proc = tunelab("train", str(recipe))
    assert "trainable parameters:" in proc.stderr
    n_head = json.loads((tiny_model / "config.json").read_text())["vocab_size"] * 64
    assert f"trainable parameters: {n_head:,} of" in proc.stderr
    before, after = _weights(tiny_model), _weights(tmp_path / "run" / "model")
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    for k, v in before.items():
        if k == "lm_head.weight":
            continue
        assert torch.equal(v, after[k]), f"{k} changed in head mode"
    # the tied original had no separate lm_head tensor; the untied head moved away from the embeddings
    assert not torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(m.lm_head.weight.detach(), after["lm_head.weight"])


def test_freeze_mode_trains_only_matching_parameters(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          train={"mode": "freeze", "trainable": ["model.layers.1.mlp.*"], "max_steps": 4,
                                 "lr": 1e-2}, eval={"before": False, "generate": False})
    tunelab("train", str(recipe))
    before, after = _weights(tiny_model), _weights(tmp_path / "run" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.mlp.") for k in changed), changed


def test_formatter_hook_and_jsonl_with_validation_file(tmp_path, tiny_model, names_file):
    (tmp_path / "myfmt.py").write_text(textwrap.dedent("""
        def fmt(record):
            return {"prompt": "Q: " + record["q"] + " A:", "completion": " " + record["a"]}
    """))
    rows = [{"q": n, "a": n.upper()} for n in names_file.read_text().split()[:60]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          data={"train": "train.jsonl", "validation": "val.jsonl", "formatter": "myfmt:fmt",
                                "unique_by": None, "validation_size": 0},
                          train={"max_steps": 2}, eval={"max_examples": None})
    tunelab("train", str(recipe), cwd=tmp_path)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n"] == 10
    first = json.loads((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Q: ") and first["prompt"].endswith(" A:")


def test_local_hf_dataset_directory(tmp_path, tiny_model, names_file):
    ds = tmp_path / "ds"
    ds.mkdir()
    rows = [{"name": n} for n in names_file.read_text().split()[:80]]
    (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file,
                          data={"train": {"dataset": str(ds), "split": "train"}, "validation_size": 10},
                          train={"max_steps": 2}, eval={"before": False})
    tunelab("train", str(recipe))
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["train"]["examples"] == 70 and stats["validation"]["examples"] == 10


def test_hub_id_offline_is_a_one_line_error(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", "no-such-org/no-such-model", names_file)
    proc = tunelab("train", str(recipe), check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tunelab: model.name: cannot load 'no-such-org/no-such-model'"), last
    assert "not reachable (offline?)" in last
    assert "Traceback" not in proc.stderr


def test_packing_trains_the_same_as_padded_batches(tmp_path, tiny_model, names_file):
    """train.packing=true (examples end to end, each attending only to itself) is exact: the same losses,
    validation loss and weights as the default path; model.attention picks the attention kernel."""
    import pytest

    def run(out, *extra):
        r = write_recipe(tmp_path / f"{out}.yaml", tiny_model, names_file,
                         train={"mode": "full", "max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1},
                         eval={"before": False, "generate": False}, output={"dir": str(tmp_path / out)})
        tunelab("--quiet", "train", str(r), *extra)
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return ([r["loss"] for r in rows], json.loads((tmp_path / out / "eval.json").read_text())["val_loss"],
                load_file(str(tmp_path / out / "model" / "model.safetensors")))

    a = run("padded")
    b = run("packed", "train.packing=true", "train.pack_length=40", "model.attention=sdpa")
    assert b[0] == pytest.approx(a[0], abs=1e-5) and b[1] == pytest.approx(a[1], abs=1e-5)
    assert all(torch.allclose(a[2][k], b[2][k], atol=1e-5) for k in a[2])
    proc = tunelab("train", str(tmp_path / "packed.yaml"), "task=classification", "train.packing=true", check=False)
    assert proc.returncode == 2 and "train.packing" in proc.stderr
