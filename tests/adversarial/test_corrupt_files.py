"""Damaged files a run reads — a model directory (config.json, tokenizer files, weights), an adapter, a
classification head, a checkpoint, a teacher cache — are each one line naming the file and what is wrong,
exit 2: never a traceback, never weights silently drawn at random or dropped, never a NaN found steps later
and blamed on the learning rate. Nothing outside tunelab's own files changes, and a refused checkpoint is
kept (not deleted as an abandoned future)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tunelab, write_recipe
from guard import refused, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.models import load_model, load_tokenizer
from tunelab.train import checkpoint as ckpt

CORRUPT = "a weights or config file here is corrupt or truncated"


# ---- helpers: a copy of a model or run with one file damaged


def _json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _tensors(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set(key: str, value):
    return lambda conf: conf.__setitem__(key, value)


def _poke(name: str, index: tuple, value: float):
    return lambda t: t[name].__setitem__(index, value)


def _more_tokens(d: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens([f"extra{i}" for i in range(5)])
    tok.save_pretrained(d)


UP = "model.layers.0.mlp.up_proj.weight"
MODEL_CASES = {  # name -> (damage the model directory d, the expected part of the line)
    "tokenizer.json: a JSON list": (lambda d: (d / "tokenizer.json").write_text("[]"),
                                    "tokenizer.json: holds a JSON list, not an object"),
    "tokenizer.json: JSON of another structure": (
        lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [1, 2]}}'),
        "tokenizer.json: not a tokenizer the tokenizers library can read"),
    "tokenizer_config.json: garbage": (lambda d: (d / "tokenizer_config.json").write_bytes(b"\x00\xffgarbage{"),
                                       f"{CORRUPT} (tokenizer_config.json: "),
    "tokenizer_config.json: a token of the wrong type": (
        lambda d: _json(d / "tokenizer_config.json", _set("eos_token", 5)),
        "tokenizer_config.json: eos_token must be a token (text), got int"),
    "config.json: not JSON": (lambda d: (d / "config.json").write_text("{hidden_size: 64"),
                              f"{CORRUPT} (config.json: "),
    "config.json: a JSON list": (lambda d: (d / "config.json").write_text("[64]"),
                                 "config.json: holds a JSON list, not an object"),
    "config.json: a field of the wrong type": (lambda d: _json(d / "config.json", _set("hidden_size", "64")),
                                               "config.json: not a valid model configuration"),
    "a vocabulary larger than the embedding": (_more_tokens, "the tokenizer has 305 token ids, the model's "
                                                              "embedding only 300 rows"),
    "weights of another width than config.json": (
        lambda d: _json(d / "config.json", _set("intermediate_size", 96)),
        "the weights do not match config.json: model.layers.0.mlp.down_proj.weight has shape [64, 128], "
        "config.json makes it [64, 96]"),
    "a tensor missing from the weights": (
        lambda d: _tensors(d / "model.safetensors", lambda t: t.pop(UP)),
        f"1 tensor config.json describes but the weights lack (they would be drawn at random): {UP}"),
    "a layer more in config.json": (lambda d: _json(d / "config.json", _set("num_hidden_layers", 3)),
                                    "9 tensors config.json describes but the weights lack"),
    "a layer fewer in config.json": (lambda d: _json(d / "config.json", _set("num_hidden_layers", 1)),
                                     "9 tensors the weights hold but config.json has no place for"),
    "NaN in the weights": (lambda d: _tensors(d / "model.safetensors", _poke(UP, (3, 5), math.nan)),
                           f"model weights hold NaN or inf: {UP}"),
    "inf in the weights": (lambda d: _tensors(d / "model.safetensors", _poke("model.norm.weight", (0,), math.inf)),
                           "model weights hold NaN or inf: model.norm.weight"),
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_a_damaged_model_directory_is_one_line(tmp_path, tiny_model, names_file, name, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damage, expected = MODEL_CASES[name]
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model)
    recipe = write_recipe(tmp_path / "recipe.yaml", model, names_file)
    refused(tmp_path, ["train", str(recipe)], expected, capfd)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 200) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
DELETE = object()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_model) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_model, d)
    return d


def _fuzz(path: Path, original: str, key: str, value) -> None:
    conf = json.loads(original)
    if value is DELETE:
        conf.pop(key, None)
    else:
        conf[key] = value
    path.write_text(json.dumps(conf))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_config_json_loads_or_is_one_line(scratch, tiny_model, data):
    original = (tiny_model / "config.json").read_text()
    key = data.draw(st.sampled_from(sorted(json.loads(original)) + ["unknown_field"]), "key")
    value = data.draw(JSON | st.just(DELETE), "value")
    _fuzz(scratch / "config.json", original, key, value)
    try:
        load_model(ModelConfig(name=str(scratch)))
    except TunelabError as e:
        assert "\n" not in str(e) and str(scratch) in str(e)
    finally:
        (scratch / "config.json").write_text(original)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_tokenizer_config_json_loads_or_is_one_line(scratch, tiny_model, data):
    original = (tiny_model / "tokenizer_config.json").read_text()
    keys = sorted(json.loads(original)) + ["bos_token", "chat_template", "additional_special_tokens",
                                           "added_tokens_decoder"]
    key = data.draw(st.sampled_from(keys), "key")
    value = data.draw(JSON | st.just(DELETE), "value")
    _fuzz(scratch / "tokenizer_config.json", original, key, value)
    try:
        load_tokenizer(ModelConfig(name=str(scratch)))
    except TunelabError as e:
        assert "\n" not in str(e) and str(scratch) in str(e)
    finally:
        (scratch / "tokenizer_config.json").write_text(original)


# ---- trained runs to damage: a LoRA run with checkpoints, a classification run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, names_file) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    recipe = write_recipe(tmp / "recipe.yaml", tiny_model, names_file,
                          train={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 0},
                          eval={"before": False, "generate": False}, output={"dir": str(tmp / "run")})
    tunelab("--quiet", "train", str(recipe))
    return tmp / "run"


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_model, names_file) -> Path:
    tmp = tmp_path_factory.mktemp("clf")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "classification", "model": str(tiny_model),
        "data": {"train": {"path": str(names_file), "text_field": "name"}, "max_length": 32},
        "classify": {"text": "Name: {name}.", "label": "{name|vowels}"},
        "train": {"max_steps": 2, "batch_size": 4}, "eval": {"before": False},
        "output": {"dir": str(tmp / "run")}}))
    tunelab("--quiet", "train", str(recipe))
    return tmp / "run"


def _copy_run(run: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of ``run`` and a recipe (the one it was trained with, writing to the copy)."""
    copy = tmp / "run"
    shutil.copytree(run, copy, symlinks=True)
    conf = yaml.safe_load((run.parent / "recipe.yaml").read_text())
    conf["output"]["dir"] = str(copy)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(conf))
    return copy, recipe


ADAPTER_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
ADAPTER_CASES = {
    "a tensor missing from the adapter": (
        lambda a: _tensors(a / "adapter_model.safetensors", lambda t: t.pop(ADAPTER_KEY)),
        "adapter: the adapter weights lack tensors its adapter_config.json describes"),
    "NaN in the adapter": (lambda a: _tensors(a / "adapter_model.safetensors", _poke(ADAPTER_KEY, (0, 0), math.nan)),
                           "adapter: adapter weights hold NaN or inf: base_model.model.model.layers.0.self_attn"),
    "a rank that does not fit the weights": (lambda a: _json(a / "adapter_config.json", _set("r", 8)),
                                             "adapter: the adapter does not fit this model (size mismatch"),
    "adapter_config.json: a field of the wrong type": (
        lambda a: _json(a / "adapter_config.json", _set("lora_alpha", "eight")),
        "adapter_config.json: lora_alpha must be a number, got str"),
    "adapter_config.json: a method that does not exist": (
        lambda a: _json(a / "adapter_config.json", _set("peft_type", "NOPE")),
        "adapter_config.json: peft_type must name a PEFT method"),
    "the adapter weights gone": (lambda a: (a / "adapter_model.safetensors").unlink(),
                                 "adapter: no adapter weights here"),
}


@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_a_damaged_adapter_is_one_line(tmp_path, lora_run, name, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damage, expected = ADAPTER_CASES[name]
    run, _ = _copy_run(lora_run, tmp_path)
    damage(run / "adapter")
    refused(tmp_path, ["merge", str(run), str(tmp_path / "merged")], expected, capfd)


def _head(run: Path) -> Path:
    return next(run.rglob("classifier_head.safetensors")).parent


CLASSIFIER_CASES = {
    "classifier.json: labels not a list": (lambda h: _json(h / "classifier.json", _set("labels", "0,1,2")),
                                           "classifier.json: labels must be a list of at least two class names"),
    "classifier.json: an unknown pooling": (lambda h: _json(h / "classifier.json", _set("pooling", "sideways")),
                                            "classifier.json: pooling must be one of last, first, mean"),
    "classifier.json: a JSON list": (lambda h: (h / "classifier.json").write_text("[]"),
                                     "classifier.json: holds a JSON list, not an object"),
    "a head of another width (broadcast before)": (
        lambda h: _tensors(h / "classifier_head.safetensors",
                           lambda t: t.__setitem__("weight", t["weight"][:1].clone())),
        "classifier_head.safetensors: weight is torch.float32 [1, 64], this model's head is"),
    "NaN in the head": (lambda h: _tensors(h / "classifier_head.safetensors", _poke("weight", (0, 0), math.nan)),
                        "classifier_head.safetensors: head weights hold NaN or inf: weight"),
    "the head weights gone": (lambda h: (h / "classifier_head.safetensors").unlink(),
                              "no classifier head weights here (classifier_head.safetensors is missing)"),
}


@pytest.mark.parametrize("name", CLASSIFIER_CASES)
def test_a_damaged_classification_head_is_one_line(tmp_path, classifier_run, name, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damage, expected = CLASSIFIER_CASES[name]
    run, _ = _copy_run(classifier_run, tmp_path)
    damage(_head(run))
    refused(tmp_path, ["predict", str(run), "emma"], expected, capfd)


# ---- checkpoints: what the manifest vouches for is still checked before the loop trusts it


def _resign(path: Path, **manifest_changes) -> None:
    """Recompute the manifest's checksums (as someone editing a checkpoint by hand would)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"] = {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in manifest["files"]}
    manifest.update(manifest_changes)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _state(change):
    return lambda c: (_json(c / "state.json", change), _resign(c))


CHECKPOINT_CASES = {
    "state.json: a field removed": (_state(lambda s: s.pop("epoch")), "state.json: field 'epoch' is missing"),
    "state.json: a field of the wrong type": (_state(_set("tokens_seen", "many")),
                                              "state.json: field 'tokens_seen' must be a count"),
    "state.json: a negative position": (_state(_set("batch", -1)), "state.json: field 'batch' must be a count"),
    "state.json: another step than the checkpoint's (its later checkpoints deleted before)": (
        _state(_set("step", 2)), "state.json: field 'step' is 2, but this is the checkpoint of step 4"),
    "state.json: not an object": (lambda c: ((c / "state.json").write_text("[4]"), _resign(c)),
                                  "state.json: holds a JSON list, not an object"),
    "rng.safetensors: a generator state of another size": (
        lambda c: (save_file({"torch": torch.zeros(7, dtype=torch.uint8)}, str(c / "rng.safetensors")), _resign(c)),
        "rng.safetensors: 'torch' is not a generator state"),
    "optimizer.pt: not an optimizer state": (
        lambda c: (torch.save({"state": [1, 2]}, c / "optimizer.pt"), _resign(c)),
        "optimizer.pt: not an optimizer state"),
    "optimizer.pt: not a tensor file": (lambda c: ((c / "optimizer.pt").write_bytes(b"PK\x03\x04 garbage"), _resign(c)),
                                        "optimizer.pt: cannot read this checkpoint file"),
    "trainable.safetensors: NaN": (
        lambda c: (_tensors(c / "trainable.safetensors", lambda t: next(iter(t.values())).view(-1).__setitem__(
            0, math.nan)), _resign(c)), "trainable.safetensors: "),
}


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_resuming_a_damaged_checkpoint_is_one_line_and_keeps_it(tmp_path, lora_run, name, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damage, expected = CHECKPOINT_CASES[name]
    run, recipe = _copy_run(lora_run, tmp_path)
    damage(run / "checkpoints" / "step-4")
    refused(tmp_path, ["train", str(recipe), "--resume"], expected, capfd)


def test_a_manifest_of_the_wrong_structure_is_skipped_like_a_corrupt_one(tmp_path, lora_run, capfd, monkeypatch):
    """verify() says no (it raised AttributeError before): resume takes the previous checkpoint."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, recipe = _copy_run(lora_run, tmp_path)
    for bad in ({"step": 4, "files": []}, {"step": 4, "files": {}}, {"step": 4, "files": {"../../x": "0"}}):
        (run / "checkpoints" / "step-4" / ckpt.MANIFEST).write_text(json.dumps(bad))
        assert not ckpt.verify(run / "checkpoints" / "step-4"), bad
    assert ckpt.latest_valid(run / "checkpoints") == run / "checkpoints" / "step-2"
    code, err = run_cli(["train", str(recipe), "--resume"], capfd)
    assert code == 0 and "Traceback" not in err, err[-2000:]


LOOP_STATE = {"step": 4, "epoch": 0, "batch": 4, "micro_step": 0, "tokens_seen": 512, "skipped": 0,
              "skipped_in_a_row": 0, "data_fingerprint": "0123456789abcdef", "processes": 1,
              "early_stopping": {"best": 1.5, "best_step": 2, "bad": 1}}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A checkpoint written as the loop writes one."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    params = {n: p.detach() for n, p in model.named_parameters()}
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("ckpt"), 4, params, opt, LOOP_STATE, keep=1)


def _loop_reads(state: dict) -> None:
    """What train/loop.py does with a loaded state: it must not raise."""
    from tunelab.train.objectives import EarlyStopping

    for key in ("step", "tokens_seen", "epoch", "batch"):
        assert type(state[key]) is int and state[key] >= 0, key
    for key in ("skipped", "skipped_in_a_row"):
        assert type(state.get(key, 0)) is int and state.get(key, 0) >= 0, key
    assert state.get("data_fingerprint", "x") in {"x", state.get("data_fingerprint")}  # hashable
    stopper = EarlyStopping(3, "min", 0.0)
    stopper.load(state.get("early_stopping", {}))
    assert stopper.bad >= 0 and (stopper.best is None or math.isfinite(stopper.best))
    stopper.improved(1.0)  # compares the best with a value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(LOOP_STATE) + ["early_stopping.best", "early_stopping.bad", "extra"]),
       value=JSON | st.just(DELETE) | st.integers(-(2 ** 70), 2 ** 70))
def test_a_state_json_loads_as_the_loop_needs_it_or_is_one_line(tmp_path, written, key, value):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "step-4"  # one for each example
    shutil.copytree(written, path)
    state = json.loads(json.dumps(LOOP_STATE))
    target, field = (state["early_stopping"], key.split(".")[1]) if "." in key else (state, key)
    if value is DELETE:
        target.pop(field, None)
    else:
        target[field] = value
    (path / "state.json").write_text(json.dumps(state))
    _resign(path)
    assert ckpt.verify(path)
    try:
        _, _, _, loaded = ckpt.load_checkpoint(path)
    except TunelabError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    _loop_reads(loaded)


# ---- the teacher's cache


def test_a_damaged_teacher_cache_is_one_line(tmp_path, tiny_model, names_file, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "teacher.safetensors"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file,
                          kd={"teacher": str(tiny_model), "cache": str(cache)},
                          train={"max_steps": 1, "log_every": 0}, eval={"before": False, "generate": False})
    code, err = run_cli(["train", str(recipe)], capfd)
    assert code == 0, err[-2000:]
    shutil.rmtree(tmp_path / "run")
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(cache))
    tensors["offsets"] = tensors["offsets"].flip(0)  # the metadata still matches the data
    save_file(tensors, str(cache), metadata=meta)
    expected = "teacher.safetensors: the teacher cache is damaged: its offsets do not match"
    refused(tmp_path, ["train", str(recipe)], expected, capfd)
