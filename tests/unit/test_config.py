"""load_config: defaults, dotted overrides, validation errors with locations, path resolution, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import Config, SourceConfig, load_config, parse_override, save_config
from tunelab.errors import TunelabError

MINIMAL = "data: {train: some/path.txt}\n"


def _recipe(tmp_path: Path, text: str = MINIMAL, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


# ---------------------------------------------------------------- defaults


def test_defaults_of_minimal_recipe(tmp_path):
    cfg = load_config(_recipe(tmp_path))
    assert cfg.name == "recipe"  # the recipe's file stem
    assert cfg.task == "generation"
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.model.dtype == "float32"
    assert cfg.train.mode == "lora"
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps is None
    assert cfg.train.batch_size == 8 and cfg.train.grad_accum == 1
    assert cfg.train.schedule == "linear"
    assert cfg.train.resume == "never"
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.data.validation is None and cfg.data.test is None
    assert cfg.data.max_length == 512 and cfg.data.truncation == "drop"
    assert cfg.data.train == SourceConfig(path=str((tmp_path / "some/path.txt").resolve()))
    assert cfg.output.dir is None


def test_explicit_name_wins_over_file_stem(tmp_path):
    cfg = load_config(_recipe(tmp_path, "name: myrun\n" + MINIMAL))
    assert cfg.name == "myrun"


def test_empty_recipe_lacks_training_source(tmp_path):
    with pytest.raises(TunelabError, match="a training source is required") as e:
        load_config(_recipe(tmp_path, ""))
    assert e.value.where.endswith("recipe.yaml")


def test_recipe_not_found(tmp_path):
    with pytest.raises(TunelabError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(TunelabError, match="YAML mapping"):
        load_config(_recipe(tmp_path, "- a\n- b\n"))


def test_invalid_yaml_names_line(tmp_path):
    p = _recipe(tmp_path, "data: {train: x.txt}\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(TunelabError, match="invalid YAML") as e:
        load_config(p)
    assert e.value.where.startswith(f"{p}:")


# ---------------------------------------------------------------- overrides


def test_override_lr_string_from_yaml_becomes_float(tmp_path):
    assert parse_override("train.lr=1e-4") == ("train.lr", "1e-4")  # YAML 1.1 reads it as a string
    cfg = load_config(_recipe(tmp_path, MINIMAL + "train: {lr: 0.5}\n"), ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    cfg = load_config(_recipe(tmp_path), ["train.lr=3e-5"])
    assert cfg.train.lr == 3e-5


def test_override_keeps_a_hash_that_is_part_of_a_template():
    assert parse_override("data.prompt=Item #1: {name}") == ("data.prompt", "Item #1: {name}")
    assert parse_override("data.prompt=#{name}") == ("data.prompt", "#{name}")
    assert parse_override('data.prompt="quoted #1"') == ("data.prompt", "quoted #1")
    assert parse_override("output.dir=runs/a#b") == ("output.dir", "runs/a#b")
    assert parse_override("train.max_steps=5 # a comment") == ("train.max_steps", 5)  # not a text field


def test_a_plugin_module_in_the_working_directory_imports_from_the_installed_command(tmp_path, monkeypatch):
    """The `tunelab` console script does not put the working directory on sys.path (python -m does)."""
    import sys

    from tunelab.plugins import load_function

    (tmp_path / "my_plugin_for_the_test.py").write_text("def check(record, output):\n    return output == 'ok'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_function("my_plugin_for_the_test:check", "--verifier")({}, "ok") is True


def test_override_in_recipe_lr_scientific_string(tmp_path):
    cfg = load_config(_recipe(tmp_path, MINIMAL + "train: {lr: 2e-3}\n"))
    assert cfg.train.lr == 2e-3 and isinstance(cfg.train.lr, float)


def test_override_max_steps_and_later_wins(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["train.max_steps=5"])
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    cfg = load_config(_recipe(tmp_path), ["train.max_steps=5", "train.max_steps=7"])
    assert cfg.train.max_steps == 7


def test_override_model_shorthand(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["model=foo/bar"])
    assert cfg.model.name == "foo/bar"
    cfg = load_config(_recipe(tmp_path), ["model.name=baz", "model.dtype=bfloat16"])
    assert cfg.model.name == "baz" and cfg.model.dtype == "bfloat16"


def test_override_model_shorthand_keeps_rest_of_model_section(tmp_path):
    p = _recipe(tmp_path, "model: {name: a, dtype: bfloat16}\n" + MINIMAL)
    cfg = load_config(p, ["model=foo/bar"])
    assert cfg.model.name == "foo/bar"
    assert cfg.model.dtype == "bfloat16"


def test_override_list(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["lora.targets=[q_proj,k_proj]"])
    assert cfg.lora.targets == ["q_proj", "k_proj"]
    cfg = load_config(_recipe(tmp_path), ["lora.targets=all-linear"])  # a scalar becomes a one-item list
    assert cfg.lora.targets == ["all-linear"]
    cfg = load_config(_recipe(tmp_path), ["lora.layers=[0, 2]"])
    assert cfg.lora.layers == [0, 2]


def test_override_null_and_bool(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["train.max_grad_norm=null", "output.overwrite=true"])
    assert cfg.train.max_grad_norm is None
    assert cfg.output.overwrite is True


def test_override_without_equals(tmp_path):
    with pytest.raises(TunelabError, match="expected key=value"):
        load_config(_recipe(tmp_path), ["train.lr"])


def test_override_without_recipe():
    cfg = load_config(None, ["data.train.dataset=some/ds", "train.epochs=3"])
    assert cfg.data.train.dataset == "some/ds" and cfg.data.train.path is None
    assert cfg.train.epochs == 3
    assert cfg.name == "run"


# ---------------------------------------------------------------- errors


def test_unknown_override_key_suggests(tmp_path):
    with pytest.raises(TunelabError, match=r"did you mean train\.lr\b") as e:
        load_config(_recipe(tmp_path), ["train.lrr=1e-4"])
    assert "unknown key train.lrr" in str(e.value)
    assert e.value.where == "override train.lrr=1e-4"


def test_unknown_recipe_key_suggests_and_names_line(tmp_path):
    p = _recipe(tmp_path, "data: {train: x.txt}\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(TunelabError, match=r"did you mean train\.lr\b") as e:
        load_config(p)
    assert e.value.where == f"{p}:3"


def test_unknown_key_suggestion_by_leaf(tmp_path):
    # a known leaf in the wrong section: suggest the section that has it
    with pytest.raises(TunelabError, match=r"did you mean train\.warmup_steps"):
        load_config(_recipe(tmp_path), ["lora.warmup_steps=3"])


def test_wrong_type_names_key_and_line(tmp_path):
    p = _recipe(tmp_path, "data: {train: x.txt}\ntrain:\n  epochs: many\n")
    with pytest.raises(TunelabError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epochs" in msg and "expected an integer" in msg and "'many'" in msg
    assert e.value.where == f"{p}:3"
    assert msg.startswith(f"{p}:3: ")
    assert "recipe.yaml:3" in msg


def test_wrong_type_nested_section_line(tmp_path):
    p = _recipe(tmp_path, "name: x\ndata:\n  train: x.txt\n  max_length: 1.5\n")
    with pytest.raises(TunelabError, match="data.max_length: expected an integer") as e:
        load_config(p)
    assert e.value.where == f"{p}:4"


def test_wrong_type_in_override(tmp_path):
    with pytest.raises(TunelabError, match="train.batch_size: expected an integer") as e:
        load_config(_recipe(tmp_path), ["train.batch_size=big"])
    assert e.value.where == "override train.batch_size=big"


def test_bool_is_not_an_integer(tmp_path):
    with pytest.raises(TunelabError, match="train.epochs"):
        load_config(_recipe(tmp_path), ["train.epochs=true"])


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(TunelabError, match="train: expected a section"):
        load_config(_recipe(tmp_path, MINIMAL + "train: 3\n"))


def test_choices_violation(tmp_path):
    with pytest.raises(TunelabError, match=r"train\.mode: must be one of full, lora, head, freeze; got 'bogus'") as e:
        load_config(_recipe(tmp_path), ["train.mode=bogus"])
    assert e.value.where == "override train.mode=bogus"
    p = _recipe(tmp_path, MINIMAL + "model:\n  dtype: float64\n", name="r2.yaml")
    with pytest.raises(TunelabError, match="model.dtype: must be one of") as e:
        load_config(p)
    assert e.value.where == f"{p}:3"


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.lr=0", "train.lr"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.dropout=1", "train.dropout"),
    ("data.max_length=1", "data.max_length"),
    ("data.validation_size=1.5", "data.validation_size"),
    ("lora.targets=[]", "lora.targets"),
    ("train.mode=freeze", "train.trainable"),
])
def test_cross_field_checks(tmp_path, override, key):
    with pytest.raises(TunelabError, match=key.replace(".", r"\.")):
        load_config(_recipe(tmp_path), [override])


@pytest.mark.parametrize("overrides, message", [
    (["data.synthetic.count=5"], r"data\.synthetic\.field: name the record field"),
    (["data.synthetic.count=-1"], r"data\.synthetic\.count: must be non-negative"),
    (["data.synthetic.order=0"], r"data\.synthetic\.order: must be at least 1"),
    (["data.synthetic.count=5", "data.synthetic.field=name", "data.prompt={name} {q}",
      "data.completion={name|reverse}"],
     r"data\.synthetic\.field: synthetic records have only the field 'name', but the templates use q"),
    (["data.synthetic.count=5", "data.synthetic.field=name", "task=chat"], r"data\.synthetic: synthetic records"),
    (["data.synthetic.count=5", "data.synthetic.field=name", "task=classification", "classify.text={name}",
      "classify.label={name|len}"], r"data\.synthetic: synthetic records are for template-formatted generation"),
    (["data.synthetic.count=5", "data.synthetic.field=name", "data.prompt={name}", "data.completion={name}",
      "data.weight_field=score"], r"data\.synthetic: synthetic records have no 'score' field"),
])
def test_synthetic_checks(tmp_path, overrides, message):
    with pytest.raises(TunelabError, match=message):
        load_config(_recipe(tmp_path), overrides)
    ok = load_config(_recipe(tmp_path), ["data.synthetic.count=5", "data.synthetic.field=name",
                                         "data.prompt={name}", "data.completion={name|reverse}"])
    assert ok.data.synthetic.count == 5


def test_completion_tokens(tmp_path):
    assert load_config(_recipe(tmp_path)).data.completion_tokens == "bpe"
    assert load_config(_recipe(tmp_path), ["data.completion_tokens=chars"]).data.completion_tokens == "chars"
    with pytest.raises(TunelabError, match=r"data\.completion_tokens: .*'bytes'"):
        load_config(_recipe(tmp_path), ["data.completion_tokens=bytes"])
    with pytest.raises(TunelabError, match=r"data\.completion_tokens: chars is for generation completions; a chat"):
        load_config(_recipe(tmp_path), ["data.completion_tokens=chars", "task=chat"])


def test_compile_backend_must_exist(tmp_path):
    with pytest.raises(TunelabError, match=r"train\.compile_backend: unknown torch.compile backend 'bogus'"):
        load_config(_recipe(tmp_path), ["train.compile=true", "train.compile_backend=bogus"])
    assert load_config(_recipe(tmp_path), ["train.compile=true", "train.compile_backend=aot_eager"]).train.compile


def test_validation_size_count_or_fraction(tmp_path):
    assert load_config(_recipe(tmp_path), ["data.validation_size=0.1"]).data.validation_size == 0.1
    assert load_config(_recipe(tmp_path), ["data.validation_size=50"]).data.validation_size == 50


def test_source_needs_exactly_one_of_path_or_dataset(tmp_path):
    with pytest.raises(TunelabError, match="give exactly one of path or dataset"):
        load_config(_recipe(tmp_path), ["data.train.dataset=x/y"])


def test_resume_strings_are_normalised(tmp_path):
    assert load_config(_recipe(tmp_path), ["train.resume=auto"]).train.resume == "auto"
    assert load_config(_recipe(tmp_path, MINIMAL + "train: {resume: 'yes'}\n")).train.resume == "auto"
    assert load_config(_recipe(tmp_path, MINIMAL + "train: {resume: 'no'}\n")).train.resume == "never"


def test_resume_boolean_values(tmp_path):
    assert load_config(_recipe(tmp_path), ["train.resume=true"]).train.resume == "auto"
    assert load_config(_recipe(tmp_path), ["train.resume=false"]).train.resume == "never"


# ---------------------------------------------------------------- data paths


def test_relative_data_paths_resolved_against_recipe_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a different directory than the recipe's
    p = _recipe(tmp_path / "recipes", "data:\n  train: ../data/train.jsonl\n"
                                      "  validation: {path: val.jsonl, format: jsonl}\n"
                                      "  test: {path: /abs/test.csv}\n")
    cfg = load_config(p)
    assert cfg.data.train.path == str((tmp_path / "data" / "train.jsonl").resolve())
    assert cfg.data.validation.path == str((tmp_path / "recipes" / "val.jsonl").resolve())
    assert cfg.data.validation.format == "jsonl"
    assert cfg.data.test.path == "/abs/test.csv"


def test_home_in_data_path_expanded(tmp_path):
    cfg = load_config(_recipe(tmp_path, "data: {train: ~/x.txt}\n"))
    assert cfg.data.train.path == str(Path("~/x.txt").expanduser())


def test_override_data_path_resolved_against_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    p = _recipe(tmp_path / "recipes")
    cfg = load_config(p, ["data.train.path=mine.jsonl"])
    assert cfg.data.train.path == str((work / "mine.jsonl").resolve())


def test_override_data_shorthand_resolved_against_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(_recipe(tmp_path / "recipes"), ["data.train=mine.jsonl"])
    assert cfg.data.train.path == str((work / "mine.jsonl").resolve())


# ---------------------------------------------------------------- round trip


def test_save_then_load_round_trips(tmp_path):
    p = _recipe(tmp_path, "description: reverse names\n"
                          "model: {name: foo/bar, dtype: bfloat16}\n"
                          "data:\n  train: {path: d/train.txt, text_field: name}\n"
                          "  validation_size: 0.1\n  unique_by: name\n"
                          "  prompt: 'Reverse {name}:'\n  completion: ' {name|reverse}'\n"
                          "train: {mode: full, lr: 2e-3, max_steps: 30, schedule: cosine, max_grad_norm: null}\n"
                          "lora: {targets: [all-linear], layers: [0, 1]}\n")
    cfg = load_config(p, ["train.adam_eps=1e-9", "eval.max_examples=20"])
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    again = load_config(run / "config.yaml")
    assert isinstance(again, Config)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert load_config(run) == cfg  # a run directory holding config.yaml
    assert again.train.adam_eps == 1e-9 and again.train.max_grad_norm is None
    assert again.data.train.path == str((tmp_path / "d" / "train.txt").resolve())


def test_round_trip_default_config(tmp_path):
    cfg = load_config(None, ["data.train.path=/abs/train.txt"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_override_template_text_is_not_parsed_as_yaml(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["eval.display={name}", "data.prompt={q} {a}"])
    assert cfg.eval.display == "{name}" and cfg.data.prompt == "{q} {a}"


def test_bad_display_template_fails_early(tmp_path):
    with pytest.raises(TunelabError, match="unknown filter"):
        load_config(_recipe(tmp_path), ["eval.display={name|backwards}"])


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_passes_the_checks(path):
    cfg = load_config(path)
    assert cfg.description and cfg.model.name


def test_an_infinite_learning_rate_is_refused(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("data: {train: x.txt}\n")
    with pytest.raises(TunelabError, match="train.lr: must be finite"):
        load_config(r, ["train.lr=.inf"])


def test_an_error_inside_a_list_item_names_the_item_and_its_line(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("data: {train: x.txt}\ninstruct:\n  tasks:\n    - builtin: reverse\n    - builtin: length\n"
                 "      weight: lots\n")
    with pytest.raises(TunelabError, match=r"instruct\.tasks\[1\]\.weight: expected a number") as e:
        load_config(r)
    assert e.value.where == f"{r}:6"
    r.write_text("data: {train: x.txt}\ninstruct:\n  tasks:\n    - builtin: reverse\n      wieght: 2\n")
    with pytest.raises(TunelabError, match=r"unknown key instruct\.tasks\[0\]\.wieght \(did you mean "
                                           r"instruct\.tasks\.weight\?\)") as e:
        load_config(r)
    assert e.value.where == f"{r}:5"


def test_a_task_source_may_be_a_path_in_a_recipe_without_a_data_section(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("instruct:\n  tasks:\n    - name: nli\n      source: nli.jsonl\n"
                 "      templates: [{prompt: '{p}', completion: ' {a}'}]\n")
    assert load_config(r).instruct.tasks[0].source.path == "nli.jsonl"
