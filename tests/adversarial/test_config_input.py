"""Configuration input: recipe YAML and dotted overrides. Whatever a recipe or an override holds, loading it
ends soon in a Config or in one line naming where the problem is (exit 2): aliases and nesting are bounded, a
recipe is a small regular file, a key given twice is refused, values that cannot mean what they say (an empty
output.dir, 1.0 examples, a seed past 32 bits, a LoRA rank past the layer's) are refused with the fix."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from guard import changes, one_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    Config,
    load_config,
    save_config,
)
from tunelab.errors import TunelabError

MINIMAL = "data: {train: names.txt}\n"

# The "billion laughs": nine levels of nine aliases, 9**9 strings once expanded (543 bytes).
LAUGHS = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)
# the same as one flow value, for an override
LAUGHS_FLOW = ('[&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], '
               "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
               "&f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]]")


@contextlib.contextmanager
def within(seconds: int):
    """Fail (rather than hang the suite) when the body runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _refused(path, overrides=(), match: str = "") -> TunelabError:
    """load_config refuses, soon, with one line holding ``match``."""
    with within(20), pytest.raises(TunelabError) as e:
        load_config(path, list(overrides))
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)
    return e.value


def _cli_refuses(root: Path, argv: list[str], expected: str, capfd) -> str:
    """The CLI: one line holding ``expected``, exit 2, nothing below ``root`` changed."""
    before = snapshot(root)
    with within(60):
        code, err = run_cli(argv, capfd)
    line = one_line(code, err, expected)
    assert changes(before, snapshot(root)) == []
    return line


# ---------------------------------------------------------------- 1. bounded YAML


def test_billion_laughs_recipe_is_refused_at_once(tmp_path, capfd):
    p = _recipe(tmp_path, MINIMAL + LAUGHS)
    t = time.monotonic()
    e = _refused(p, match="aliases expand this YAML to more than 100,000 values")
    assert time.monotonic() - t < 5
    assert e.where.startswith(f"{p}:")  # names the recipe file (and the line)
    _cli_refuses(tmp_path, ["train", str(p)], f"tunelab: {p}:", capfd)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "data", "show", str(p)], capture_output=True,
                          text=True, timeout=120)  # as a user runs it: a process that ends, one line, status 2
    one_line(proc.returncode, proc.stderr, "aliases expand this YAML")
    assert changes(before, snapshot(tmp_path)) == []


def test_billion_laughs_override_is_refused(tmp_path):
    p = _recipe(tmp_path, MINIMAL)
    for key in ("lora.targets", "lora.layers", "instruct.tasks", "classify.labels", "data"):
        e = _refused(p, [f"{key}={LAUGHS_FLOW}"], "aliases expand this YAML")
        assert e.where.startswith(f"override {key}=")
        assert len(str(e)) < 400  # the override is shown cut short, not its 500 characters
    with within(20):  # a text setting takes the text as written (a template is not YAML), as before
        assert load_config(p, [f"data.prompt={LAUGHS_FLOW}"]).data.prompt == LAUGHS_FLOW
        assert load_config(p, ["data.prompt={name, name}"]).data.prompt == "{name, name}"


def test_aliases_within_bounds_still_work(tmp_path):
    """Anchors, aliases and merges a recipe really uses load as before."""
    p = _recipe(tmp_path, MINIMAL + "train: &t {lr: 0.5, batch_size: 4}\n"
                "eval: {batch_size: 4}\nlora: {targets: &tg [q_proj, k_proj]}\n"
                "instruct:\n  tasks:\n    - &base {name: a, weight: 2.0}\n    - {<<: *base, name: b}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.5 and cfg.lora.targets == ["q_proj", "k_proj"]
    assert [(t.name, t.weight) for t in cfg.instruct.tasks] == [("a", 2.0), ("b", 2.0)]


@pytest.mark.parametrize("text, match", [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", f"nested more than {MAX_YAML_DEPTH} levels deep"),
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n", f"nested more than {MAX_YAML_DEPTH} levels deep"),
    ("".join(f"k{i}: &k{i} [*k{i - 1}]\n" if i else "k0: &k0 [1]\n" for i in range(200)),
     f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)"),  # deep only through aliases
    ("a: &a [*a]\n", "an alias refers to a value that holds it"),
    ("a: &a {b: *a}\n", "an alias refers to a value that holds it"),
])
def test_deep_or_recursive_yaml_is_one_line(tmp_path, text, match):
    p = _recipe(tmp_path, MINIMAL + text)
    assert _refused(p, match=match).where.startswith(f"{p}:")


def test_deep_override_is_one_line(tmp_path):
    p = _recipe(tmp_path, MINIMAL)
    _refused(p, ["lora.targets=" + "[" * 3000 + "]" * 3000], "nested more than")
    _refused(p, ["lora.targets=&a [*a]"], "an alias refers to a value that holds it")


@pytest.mark.parametrize("text, match", [
    ("train: {seed: " + "9" * 5000 + "}\n", "invalid YAML: an integer of more than 4300 digits"),
    ("model: {revision: 2024-02-30}\n", "invalid YAML: cannot read this value (day is out of range for month)"),
    ("train: {lr: " + ":".join(["1"] * 400) + ".5}\n", "invalid YAML: cannot read this value"),
])
def test_yaml_values_python_cannot_hold_are_one_line(tmp_path, text, match):
    p = _recipe(tmp_path, MINIMAL + text)
    assert _refused(p, match=match).where == f"{p}:2"


def test_fifo_recipe_does_not_hang(tmp_path, capfd):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # no writer: opening it to read would wait forever
    _refused(fifo, match="a named pipe (FIFO), not a recipe file")
    _cli_refuses(tmp_path, ["train", str(fifo)], "a named pipe (FIFO), not a recipe file", capfd)


def test_device_recipe_is_refused_unread():
    assert _refused("/dev/zero", match="a character device, not a recipe file").where == "/dev/zero"


def test_recipe_over_one_mib_is_refused(tmp_path):
    p = _recipe(tmp_path, MINIMAL + "# " + "x" * MAX_RECIPE_BYTES + "\n")
    _refused(p, match="larger than 1 MiB: a recipe is a small YAML file")


def test_unreadable_recipe_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = _recipe(tmp_path, MINIMAL)
    p.chmod(0)
    _refused(p, match="cannot read the recipe: Permission denied")


# ---------------------------------------------------------------- 2. duplicate keys


@pytest.mark.parametrize("text, key, line", [
    (MINIMAL + "train:\n  lr: 0.1\nlora: {r: 4}\ntrain:\n  seed: 3\n", "train", 5),
    (MINIMAL + "lora:\n  r: 4\n  alpha: 8\n  r: 8\n", "lora.r", 5),
    (MINIMAL + "instruct:\n  tasks:\n    - name: a\n      weight: 1\n      name: b\n", "instruct.tasks[0].name", 6),
    ("data:\n  train: a.txt\n  train: b.txt\n", "data.train", 3),
])
def test_a_key_given_twice_is_refused(tmp_path, text, key, line):
    p = _recipe(tmp_path, text)
    e = _refused(p, match=f"{key} is given twice")
    assert e.where == f"{p}:{line}"


def test_a_key_given_twice_in_an_override_value(tmp_path):
    p = _recipe(tmp_path, MINIMAL)
    _refused(p, ["data={train: a.txt, train: b.txt}"], "data.train is given twice")


def test_merged_keys_may_be_overridden(tmp_path):
    """A mapping's own key beside a `<<` merge of the same key is YAML's override, not a repeat."""
    p = _recipe(tmp_path, MINIMAL + "train: {<<: {lr: 0.5, seed: 1}, lr: 0.25}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.25 and cfg.train.seed == 1


# ---------------------------------------------------------------- 3. values that cannot mean what they say


def test_empty_output_dir_is_refused(tmp_path):
    p = _recipe(tmp_path, MINIMAL)
    _refused(p, ["output.dir="], "output.dir: empty value")
    _refused(p, ["output.dir=''"], "output.dir: empty: leave it out (or null) to write runs/<name>")
    _refused(_recipe(tmp_path, MINIMAL + 'output: {dir: ""}\n', "r2.yaml"), match="output.dir: empty")
    _refused(_recipe(tmp_path, MINIMAL + "output: {dir: '  '}\n", "r3.yaml"), match="output.dir: empty")
    assert load_config(p, ["output.dir=null"]).output.dir is None  # null keeps the default, runs/<name>
    assert load_config(_recipe(tmp_path, MINIMAL + "output: {dir: }\n", "r4.yaml")).output.dir is None


@pytest.mark.parametrize("override, key", [
    ("data.train=''", "data.train.path"), ("data.validation.path=''", "data.validation.path"),
    ("model=''", "model.name"), ("kd.teacher=", "kd.teacher"), ("sni.dir=' '", "sni.dir"),
    ("chat.template=", "chat.template"), ("name=''", "name"),
])
def test_other_empty_paths_are_refused(tmp_path, override, key):
    _refused(_recipe(tmp_path, MINIMAL), [override], f"{key}: empty")


def test_nul_and_lone_surrogates_are_refused(tmp_path):
    p = _recipe(tmp_path, MINIMAL)
    _refused(p, ['data.train.path="a\\0b"'], "data.train.path: contains a NUL character")
    _refused(p, ['data.prompt="\\ud800"'], "data.prompt: '\\ud800' is not valid UTF-8 text")


@pytest.mark.parametrize("key", ["validation_size", "test_size"])
def test_a_float_of_one_or_more_is_not_a_count(tmp_path, key):
    p = _recipe(tmp_path, MINIMAL)
    _refused(p, [f"data.{key}=1.0"], f"data.{key}: 1.0 is neither a count (an integer) nor a fraction below 1: "
                                     "write 1 for one example, or a fraction below 1")
    _refused(p, [f"data.{key}=40.0"], "write 40 for 40 examples")
    _refused(p, [f"data.{key}=2.5"], "write a whole number of examples")
    _refused(p, [f"data.{key}=1e3"], "write 1000 for 1000 examples")  # YAML 1.1 reads 1e3 as text
    _refused(p, [f"data.{key}=.inf"], f"data.{key}: inf is neither")
    in_recipe = _recipe(tmp_path, f"data: {{train: n.txt, {key}: 500.0}}\n", "r2.yaml")
    assert _refused(in_recipe, match="write 500 for 500 examples").where == f"{in_recipe}:1"
    # what stays: an integer is a count, a float below 1 a fraction (stored as before: a float)
    assert getattr(load_config(p, [f"data.{key}=1"]).data, key) == 1.0
    assert getattr(load_config(p, [f"data.{key}=40"]).data, key) == 40.0
    assert getattr(load_config(p, [f"data.{key}=0.5"]).data, key) == 0.5
    assert getattr(load_config(p, [f"data.{key}=0.0"]).data, key) == 0.0


def test_a_runs_saved_config_keeps_its_counts(tmp_path):
    """A run's config.yaml written before counts were integers holds 500.0: it still loads as 500, and a
    config.yaml saved now writes the count as 500 (so that it can be copied as a recipe)."""
    cfg = load_config(_recipe(tmp_path, "data: {train: n.txt, validation_size: 500, test_size: 0.1}\n"))
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["validation_size"] == 500 and isinstance(saved["validation_size"], int)
    assert saved["test_size"] == 0.1
    assert load_config(run) == cfg
    old = yaml.safe_load((run / "config.yaml").read_text())
    old["data"]["validation_size"] = 500.0
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    _refused(run, match="write 500 for 500 examples")  # not a run directory yet: a recipe like any other
    (run / "data_stats.json").write_text("{}")
    assert load_config(run) == cfg
    _refused(run, ["data.validation_size=2.0"], "write 2 for 2 examples")  # an override follows the rule


# ---------------------------------------------------------------- 4. bounds


@pytest.mark.parametrize("value, match", [
    (2**63, "is out of range: an integer setting is below 2**63"),
    (2**64, "is out of range"),
    (10**30, "is out of range"),
    (2**32, "a seed is a whole number from 0 to 2**32 - 1 (4294967295), got 4294967296"),
    (-1, "a seed is a whole number from 0 to 2**32 - 1"),
])
@pytest.mark.parametrize("key", ["train.seed", "model.init_seed", "data.split_seed"])
def test_seeds_are_bounded(tmp_path, key, value, match):
    _refused(_recipe(tmp_path, MINIMAL), [f"{key}={value}"], f"{key}: ")
    _refused(_recipe(tmp_path, MINIMAL), [f"{key}={value}"], match)


def test_largest_seed_is_accepted(tmp_path):
    cfg = load_config(_recipe(tmp_path, MINIMAL), [f"train.seed={2**32 - 1}", f"model.init_seed={2**32 - 1}"])
    assert cfg.train.seed == cfg.model.init_seed == 2**32 - 1


def test_a_seed_past_64_bits_stops_before_training(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    _cli_refuses(tmp_path, ["train", str(recipe), f"train.seed={2**63}"], "train.seed: 9223372036854775808 is "
                 "out of range", capfd)


@pytest.mark.parametrize("override, match", [
    (f"eval.max_new_tokens={2**70}", "eval.max_new_tokens: 1180591620717411303424 is out of range"),
    (f"lora.layers=[0, {2**64}]", "lora.layers[1]: 18446744073709551616 is out of range"),
    ("train.max_steps=" + "9" * 5000, "train.max_steps: '" + "9" * 20),  # past what YAML reads
    ("train.lr=" + "9" * 400, "train.lr: <an integer of 400 digits> is too large for a number"),
    ("train.adam_beta1=.nan", "train.adam_beta1: expected a number, got nan"),
    ("train.min_delta=.nan", "train.min_delta: expected a number, got nan"),
    ("train.adam_beta2=1", "train.adam_beta2: must be in [0, 1)"),
    ("train.adam_eps=-1e-8", "train.adam_eps: must be non-negative"),
])
def test_numbers_out_of_range_are_one_line(tmp_path, override, match):
    _refused(_recipe(tmp_path, MINIMAL), [override], match)


def test_lora_rank_bound_is_pure():
    from tunelab.train.trainable import check_lora_rank

    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 32)}
    check_lora_rank(32, shapes)  # the smallest layer's rank: allowed
    check_lora_rank(10**6, {})  # nothing targeted: nothing to bound
    with pytest.raises(TunelabError) as e:
        check_lora_rank(33, shapes)
    assert e.value.where == "lora.r"
    assert str(e.value) == ("lora.r: rank 33 is more than the layer model.layers.0.self_attn.v_proj (64 in, 32 out) "
                            "can use: its update has rank at most 32, and a larger rank only adds parameters; set "
                            "lora.r to 32 or less")


def test_lora_rank_targets_the_layers_peft_adapts(tiny_model):
    from transformers import AutoModelForCausalLM

    from tunelab.config import LoraConfig
    from tunelab.train.trainable import targeted_shapes

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    qv = targeted_shapes(model, LoraConfig())
    assert sorted(qv) == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert qv["model.layers.0.self_attn.v_proj"] == (64, 32)  # 2 key-value heads of 16
    every = targeted_shapes(model, LoraConfig(targets=["all-linear"], layers=[1]))
    assert len(every) == 7 and all(".layers.1." in n for n in every)  # q k v o gate up down; not lm_head
    assert every["model.layers.1.mlp.down_proj"] == (128, 64)


def test_lora_rank_past_the_layer_is_refused_before_any_write(tmp_path, tiny_model, names_file, capfd):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file)
    _cli_refuses(tmp_path, ["train", str(recipe), "lora.r=1000000"], "tunelab: lora.r: rank 1000000 is more than "
                 "the layer model.layers.0.self_attn.v_proj (64 in, 32 out)", capfd)


# ---------------------------------------------------------------- 5. any override value: a Config or one line

KEYS = ["train.seed", "model.init_seed", "train.lr", "train.max_steps", "train.resume", "train.max_grad_norm",
        "data.validation_size", "data.test_size", "data.prompt", "data.train", "data.max_length", "model.name",
        "model.dtype", "lora.r", "lora.targets", "lora.layers", "output.dir", "eval.max_new_tokens",
        "eval.display", "eval.variations", "chat.template", "sni.dir", "instruct.tasks", "classify.labels",
        "kd.teacher", "name", "data", "lora"]
SPECIAL = ["&a [*a]", "[" * 300, "{" * 300, "{a: 1, a: 2}", LAUGHS_FLOW, "!!python/object/apply:os.system [ls]",
           "2024-02-30", "1:2:3", ".nan", ".inf", "-.inf", "~", "null", "''", '"\\0"', '"\\ud800"', "<<: {a: 1}",
           "? [1]\n: 2", "9" * 5000, "-" + "9" * 5000, "1e999", "0x" + "f" * 40, "0b1", "0o7", "1_000", "yes",
           "{<<: *x}", "*undefined", "%YAML 1.1\n---\na", "--- a\n--- b", "a: b: c", "\t", "#", "x #y", "'"]

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**300, 2**300),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
NESTED = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
VALUES = st.one_of(
    st.text(max_size=60),
    st.integers().map(str),
    st.integers(-2**200, 2**200).map(str),
    st.integers(4000, 6000).map(lambda n: "9" * n),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    NESTED.map(lambda v: json.dumps(v)),  # JSON is YAML's flow style
    st.sampled_from(SPECIAL),
)


@pytest.fixture(scope="module")
def plain_recipe(tmp_path_factory) -> Path:
    return _recipe(tmp_path_factory.mktemp("prop"), MINIMAL)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_override_value_gives_a_config_or_one_line(plain_recipe, key, value):
    with within(20):
        try:
            cfg = load_config(plain_recipe, [f"{key}={value}"])
        except TunelabError as e:
            assert "\n" not in str(e) and "\r" not in str(e), repr(str(e))
            assert len(str(e)) < 2000
        else:
            assert isinstance(cfg, Config)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_recipe_value_gives_a_config_or_one_line(tmp_path_factory, key, value):
    """The same values written into a recipe, at the key's place in the sections."""
    head, _, leaf = key.rpartition(".")
    body = f"{leaf}: {value}".replace("\n", "\n  ")  # a value of several lines stays inside its key
    if not head:
        text = f"{body}\n" + ("" if key == "data" else MINIMAL)
    else:
        train = "  train: names.txt\n" if head == "data" and leaf != "train" else ""
        text = ("" if head == "data" else MINIMAL) + f"{head}:\n{train}  {body.replace(chr(10), chr(10) + '  ')}\n"
    p = _recipe(tmp_path_factory.mktemp("prop"), text)
    with within(20):
        try:
            cfg = load_config(p)
        except TunelabError as e:
            assert "\n" not in str(e) and "\r" not in str(e), repr(str(e))
        else:
            assert isinstance(cfg, Config)
