"""Bad input: a one-line error naming file/line/field, exit status 2, no traceback, no run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tunelab, write_recipe


def _case(tmp_path: Path, tiny_model: Path, names_file: Path, case: str) -> tuple[list[str], str]:
    """Build the files for one case; returns (extra CLI args, expected substring of the error)."""
    recipe = tmp_path / "recipe.yaml"
    if case == "unknown key":
        write_recipe(recipe, tiny_model, names_file)
        return ["train.lrr=1e-4"], "unknown key train.lrr (did you mean train.lr?)"
    if case == "unknown key in file":
        write_recipe(recipe, tiny_model, names_file, train={"warmup": 3})
        return [], "recipe.yaml:"
    if case == "wrong type":
        write_recipe(recipe, tiny_model, names_file)
        return ["train.batch_size=many"], "train.batch_size: expected an integer"
    if case == "missing data file":
        write_recipe(recipe, tiny_model, tmp_path / "nope.txt")
        return [], "nope.txt: data file not found"
    if case == "malformed jsonl":
        data = tmp_path / "train.jsonl"
        data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
        write_recipe(recipe, tiny_model, names_file, data={"train": str(data), "prompt": "{prompt}",
                                                           "completion": "{completion}", "unique_by": None})
        return [], "train.jsonl:2: malformed JSON"
    if case == "template field absent":
        data = tmp_path / "train.jsonl"
        data.write_text('{"prompt": "a", "output": "b"}\n')
        write_recipe(recipe, tiny_model, names_file, data={"train": str(data), "prompt": "{prompt}",
                                                           "completion": "{completion}", "unique_by": None,
                                                           "validation_size": 0})
        return [], "train.jsonl:1: missing field 'completion'"
    if case == "empty after filtering":
        write_recipe(recipe, tiny_model, names_file, data={"max_length": 4})
        return [], "all 360 examples dropped"
    if case == "unknown model alias":
        write_recipe(recipe, "smollm9-1t", names_file)
        return [], "unknown model alias 'smollm9-1t'"
    if case == "missing model directory":
        write_recipe(recipe, tmp_path / "no-model", names_file)
        return [], "does not exist"
    if case == "lora target matches nothing":
        write_recipe(recipe, tiny_model, names_file, lora={"targets": ["q_prj"]})
        return [], "lora.targets: 'q_prj' matches no module"
    if case == "max_length shorter than prompt":
        write_recipe(recipe, tiny_model, names_file, data={"max_length": 4, "truncation": "truncate"})
        return [], "shorter than the prompt"
    if case == "bad choice":
        write_recipe(recipe, tiny_model, names_file)
        return ["train.mode=everything"], "train.mode: must be one of full, lora, head, freeze"
    if case == "invalid yaml":
        recipe.write_text("train:\n  lr: [1e-4\n")
        return [], "invalid YAML"
    if case == "freeze pattern matches nothing":
        write_recipe(recipe, tiny_model, names_file, train={"mode": "freeze", "trainable": ["nothing.*"]})
        return [], "train.trainable: pattern 'nothing.*' matches no parameter"
    raise AssertionError(case)


CASES = ["unknown key", "unknown key in file", "wrong type", "missing data file", "malformed jsonl",
         "template field absent", "empty after filtering", "unknown model alias", "missing model directory",
         "lora target matches nothing", "max_length shorter than prompt", "bad choice", "invalid yaml",
         "freeze pattern matches nothing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error(tmp_path, tiny_model, names_file, case):
    args, expected = _case(tmp_path, tiny_model, names_file, case)
    proc = tunelab("--quiet", "train", str(tmp_path / "recipe.yaml"), *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("tunelab: "), proc.stderr
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists(), "a failed run must leave no run directory"


def test_debug_shows_the_traceback(tmp_path, tiny_model, names_file):
    write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    proc = tunelab("--debug", "train", str(tmp_path / "recipe.yaml"), "train.lrr=1", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
