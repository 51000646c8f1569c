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
    assert changed.returncode == 2
    assert "was run with other settings (train.max_steps: 2 there, 3 here)" in changed.stderr
    # a variant and an --over axis that set the same key: an error before anything runs
    both = tunelab("sweep", str(recipe), "--variant", "a: train.lr=0.1", "--over", "train.lr=0.01",
                   "--out", str(tmp_path / "both"), check=False)
    assert both.returncode == 2 and "train.lr is set by the variant a and swept by --over" in both.stderr
    assert not (tmp_path / "both").exists()
    (tmp_path / "afile").write_text("")
    into_file = tunelab("sweep", str(recipe), "--over", "train.lr=0.01", "--out", str(tmp_path / "afile"), check=False)
    assert into_file.returncode == 2 and "--out is a file" in into_file.stderr.strip().splitlines()[-1]


def test_a_cell_killed_before_its_first_checkpoint_restarts_and_a_changed_recipe_is_refused(
        tmp_path, tiny_model, names_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, names_file, train={"max_steps": 2, "batch_size": 4},
                          eval={"before": False, "max_examples": 4})
    out = tmp_path / "sweep"
    args = ["--quiet", "sweep", str(recipe), "--over", "train.lr=0.001,0.002", "--out", str(out)]
    killed = tunelab(*args, env={"TUNELAB_FAULT": "kill-step:1"}, check=False)
    assert killed.returncode == 2 and "failed" in killed.stderr
    assert (out / "lr-0.001" / "config.yaml").exists() and not (out / "lr-0.001" / "checkpoints").exists()
    tunelab(*args)  # the stopped cell starts afresh: the sweep is not stuck on it
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["train.lr"] for r in rows] == ["0.001", "0.002"] and all(r["value"] is not None for r in rows)
    # the same --out with the recipe edited: its cells are not taken for this recipe's
    recipe.write_text(recipe.read_text().replace("max_steps: 2", "max_steps: 3"))
    edited = tunelab(*args, check=False)
    assert edited.returncode == 2 and "train.max_steps: 2 there, 3 here" in edited.stderr


def test_axis_values_split_at_top_level_commas_only():
    from tunelab.sweep import parse_axes, split_values

    assert split_values("1,2, 3") == ["1", "2", "3"]
    assert split_values("[q_proj,v_proj],[all-linear]") == ["[q_proj,v_proj]", "[all-linear]"]
    assert split_values('"Reverse, please: {name}",Name: {name}') == ['"Reverse, please: {name}"', "Name: {name}"]
    assert split_values("{a: 1, b: 2},x") == ["{a: 1, b: 2}", "x"]
    assert parse_axes(["lora.targets=[q_proj,v_proj],[all-linear]"]) == [
        ("lora.targets", ["[q_proj,v_proj]", "[all-linear]"])]


def test_cell_names_stay_short_and_distinct():
    from tunelab.sweep import MAX_CELL_NAME, cell_name

    a = cell_name([("data.prompt", "x" * 300 + " {name}")])
    b = cell_name([("data.prompt", "x" * 300 + " {name}!")])
    assert len(a) <= MAX_CELL_NAME and len(b) <= MAX_CELL_NAME and a != b
    assert cell_name([("train.lr", "0.001"), ("lora.targets", "[q_proj,v_proj]")]) == \
        "lr-0.001__targets-_q_proj_v_proj_"


def test_the_markdown_table_escapes_pipes(tmp_path):
    from tunelab.sweep import write_table

    write_table(tmp_path, [("classify.label", ["{name|vowels}"])],
                [{"classify.label": "{name|vowels}", "metric": "accuracy", "value": 0.5}])
    row = (tmp_path / "sweep.md").read_text().splitlines()[2]
    assert "{name\\|vowels}" in row and row.count(" | ") == 6  # 7 cells


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
