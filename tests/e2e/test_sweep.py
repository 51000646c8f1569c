"""tunelab sweep: a grid of runs, resumable, collected into one table; model.init=random."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tunelab, write_recipe


def test_sweep_runs_the_grid_and_resumes(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file, train={"max_steps": 2, "batch_size": 4},
                          eval={"before": False, "max_examples": 8})
    out = tmp_path / "sweep"
    args = ["sweep", str(recipe), "--over", "data.train_size=20,40", "--over", "model.init=pretrained,random",
            "--out", str(out)]
    proc = tunelab("--quiet", *args)
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["data.train_size"], r["model.init"]) for r in rows] == [
        ("20", "pretrained"), ("20", "random"), ("40", "pretrained"), ("40", "random")]
    assert all(r["metric"] == "exact_match" and 0 <= r["value"] <= 1 for r in rows)
    assert all(r["peak_rss_mb"] > 0 and r["trainable_parameters"] > 0 for r in rows)
    assert (out / "sweep.md").read_text().count("\n") == 6 and "| data.train_size |" in proc.stdout
    # a second call runs nothing: every cell is finished
    again = tunelab("--quiet", *args)
    assert again.stderr.count("finished before") == 4
    # a lost cell is run again, the others are kept
    import shutil

    shutil.rmtree(out / rows[1]["run"])
    third = tunelab("--quiet", *args)
    assert third.stderr.count("finished before") == 3


@pytest.mark.parametrize("over,expected", [
    ("data.train_sise=1,2", "unknown key data.train_sise (did you mean data.train_size?)"),
    ("data.train_size=", "empty value in the axis data.train_size"),
    ("data.train_size=10,,20", "empty value in the axis data.train_size"),
    ("train.mode=full,everything", "train.mode: must be one of"),
])
def test_bad_sweep_axes(tmp_path, tiny_model, names_file, over, expected):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    proc = tunelab("--quiet", "sweep", str(recipe), "--over", over, "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and expected in proc.stderr
    assert not (tmp_path / "s").exists()


def test_random_init_shares_the_config_but_not_the_weights(tiny_model):
    from tunelab.config import ModelConfig
    from tunelab.models import load_model

    pre, _ = load_model(ModelConfig(name=str(tiny_model), device="cpu"))
    # (the tiny model itself was initialised with seed 0, so another seed stands for "random" here)
    rnd, _ = load_model(ModelConfig(name=str(tiny_model), device="cpu", init="random", init_seed=7))
    assert pre.config.to_dict() == rnd.config.to_dict()
    a, b = pre.state_dict(), rnd.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    again, _ = load_model(ModelConfig(name=str(tiny_model), device="cpu", init="random", init_seed=7))
    assert torch.equal(b["model.layers.0.mlp.up_proj.weight"], again.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_variants_are_one_axis_of_named_override_sets(tmp_path, tiny_model, names_file):
    """What to train, in one table: each variant a named bundle of overrides, crossed with --over."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file, train={"max_steps": 2, "batch_size": 4},
                          eval={"before": False, "max_examples": 4})
    out = tmp_path / "sweep"
    tunelab("--quiet", "sweep", str(recipe), "--variant", "full: train.mode=full",
            "--variant", "lora-qv-r2: train.mode=lora lora.r=2",
            "--variant", "lora-all-r4: lora.r=4 lora.targets=[all-linear]",
            "--over", "train.lr=0.001", "--out", str(out))
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["full", "lora-qv-r2", "lora-all-r4"]
    params = [r["trainable_parameters"] for r in rows]
    assert params[0] > params[2] > params[1]  # full > LoRA on all linear layers > LoRA r=2 on q, v
    cfg = (out / rows[1]["run"] / "config.yaml").read_text()
    assert "r: 2" in cfg and "lr: 0.001" in cfg
    assert "| variant | train.lr |" in (out / "sweep.md").read_text()
    # a variant that changed its overrides is not taken for the finished cell of the same name
    changed = tunelab("sweep", str(recipe), "--variant", "full: train.mode=full train.max_steps=3",
                      "--over", "train.lr=0.001", "--out", str(out), check=False)
    assert changed.returncode == 2 and "was run with other overrides" in changed.stderr


@pytest.mark.parametrize("variant,expected", [
    ("nocolon train.mode=full", "expected NAME: key=value"),
    ("a: train.moed=full", "unknown key train.moed"),
    ("a:", "variant a sets nothing"),
    ('a: data.prompt="x', "variant a: No closing quotation"),
])
def test_bad_variants(tmp_path, tiny_model, names_file, variant, expected):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    proc = tunelab("sweep", str(recipe), "--variant", variant, check=False)
    assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1]


def test_variants_that_would_share_a_directory(tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    proc = tunelab("sweep", str(recipe), "--variant", "a+b: train.lr=0.1", "--variant", "a_b: train.lr=0.2",
                   check=False)
    assert proc.returncode == 2 and "two cells would share the directory" in proc.stderr
