"""The training loop's edges, run in-process on the tiny model (no subprocess: the CLI paths are tested
elsewhere): epochs with gradient accumulation, examples of weight 0, reloading a run that started from
random weights, and early stopping across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tunelab as tunelab_cli
from conftest import write_recipe
from safetensors.torch import load_file

import tunelab
from tunelab.config import load_config


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_epochs_with_accumulation_train_each_example_once_an_epoch(tmp_path, tiny_model, names_file):
    # 20 names in batches of 8 with grad_accum=2: 3 micro-batches an epoch, steps of 2 + 1
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    cfg = load_config(r, ["train.max_steps=null", "train.epochs=2", "train.grad_accum=2", "data.train_size=20",
                          "eval.before=false", "eval.generate=false"])
    run = tunelab.train(cfg, quiet=True)
    rows = _metrics(run)
    assert [row["epoch"] for row in rows] == [pytest.approx(2 / 3, abs=1e-4), 1.0, pytest.approx(5 / 3, abs=1e-4),
                                              2.0]
    stats = json.loads((run / "data_stats.json").read_text())["train"]
    assert sum(row["tokens"] for row in rows) == 2 * stats["tokens"]  # every example twice, none more


def test_steps_of_weight_zero_are_not_counted_as_skipped(tmp_path, tiny_model):
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse the name: {n}. Answer:", "completion": f" {n[::-1]}",
                                        "score": 0}) + "\n" for n in ("emma", "olivia", "ava", "mia")))
    r = write_recipe(tmp_path / "r.yaml", tiny_model, data)
    cfg = load_config(r, [f"data.train={data}", "data.prompt={prompt}", "data.completion={completion}",
                          "data.unique_by=null", "data.validation_size=0", "data.weight_field=score",
                          "train.max_steps=2", "train.batch_size=4", "eval.before=false", "eval.generate=false"])
    run = tunelab.train(cfg, quiet=True)
    rows = _metrics(run)
    assert [row["supervised_tokens"] for row in rows] == [0, 0] and not any(row.get("skipped") for row in rows)
    assert json.loads((run / "eval.json").read_text())["skipped_steps"] == 0


def test_a_run_from_random_weights_reloads_its_trained_weights(tmp_path, tiny_model, names_file):
    from tunelab.models import load_trained

    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    cfg = load_config(r, ["model.init=random", "train.mode=full", "train.max_steps=2", "eval.before=false",
                          "eval.generate=false"])
    run = tunelab.train(cfg, quiet=True)
    model, _ = load_trained(run, load_config(run).model)
    saved = load_file(str(run / "model" / "model.safetensors"))
    named = dict(model.named_parameters())
    for k, v in saved.items():
        assert torch.equal(named[k].detach(), v), k


def test_early_stopping_survives_a_resume(tmp_path, tiny_model, names_file):
    """Resumed at the step it stopped at, a run stays stopped; resumed from an earlier checkpoint, it keeps
    that branch's best weights, not the abandoned branch's."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    base = ["train.max_steps=30", "train.eval_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=40",
            "train.lr=0.05", "eval.before=false", "eval.generate=false"]
    run = tunelab.train(load_config(r, [*base, "train.early_stopping_patience=2", "train.min_delta=0.5"]),
                        quiet=True)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["stopped_early_at"] == 3 and ev["best_step"] == 1
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    tunelab.train(load_config(r, [*base, "train.early_stopping_patience=2", "train.min_delta=0.5"]), resume=True,
                  quiet=True)
    assert [row["step"] for row in _metrics(run)] == [1, 2, 3]  # no step trained after the stop
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((run / "eval.json").read_text())["stopped_early_at"] == 3

    # a run whose best is at its last step (patience never runs out), then resumed from step 2 with a learning
    # rate too small to improve: the weights restored are step 2's, not the abandoned step 6's
    run2 = tunelab.train(load_config(r, [*base, "train.max_steps=6", "train.early_stopping_patience=50",
                                         f"output.dir={tmp_path / 'run2'}"]), quiet=True)
    assert json.loads((run2 / "best" / "best.json").read_text())["step"] == 6
    tunelab.train(load_config(r, [*base, "train.max_steps=6", "train.early_stopping_patience=50",
                                  "train.min_delta=0.01", "train.lr=1e-9", f"output.dir={run2}",
                                  f"train.resume={run2 / 'checkpoints' / 'step-2'}"]), quiet=True)
    assert json.loads((run2 / "eval.json").read_text())["best_step"] == 2
    assert json.loads((run2 / "best" / "best.json").read_text())["step"] == 2
    step2 = load_file(str(run2 / "checkpoints" / "step-2" / "trainable.safetensors"))
    saved = load_file(str(run2 / "adapter" / "adapter_model.safetensors"))
    for k, v in step2.items():
        assert torch.equal(saved[k.replace(".default", "")], v), k


@pytest.mark.parametrize("precision", ["pure", "auto"])
def test_mixed_precision_keeps_updates_that_bfloat16_weights_lose(tmp_path, tiny_model, names_file, precision):
    """Full fine-tuning with model.dtype=bfloat16 at lr 1e-5: an AdamW step moves a norm weight (1.0) by about
    1e-5, below bfloat16's spacing there (2^-7): pure bf16 loses it, mixed (float32 weights, the default
    for full fine-tuning in bf16) keeps it."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    cfg = load_config(r, ["model.dtype=bfloat16", f"train.precision={precision}", "train.mode=full",
                          "train.lr=1e-5", "train.warmup_steps=0", "train.max_steps=2", "eval.before=false",
                          "eval.generate=false"])
    run = tunelab.train(cfg, quiet=True)
    norm = load_file(str(run / "model" / "model.safetensors"))["model.norm.weight"]
    if precision == "pure":
        assert norm.dtype == torch.bfloat16 and bool((norm == 1).all())
    else:
        assert norm.dtype == torch.float32 and not bool((norm == 1).any())
        assert float((norm - 1).abs().max()) < 1e-4


def test_precision_resolves_by_dtype_and_mode(tmp_path):
    from tunelab.train.loop import mixed_precision

    r = tmp_path / "r.yaml"
    r.write_text("data: {train: x.txt}\n")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mixed_precision(load_config(r, ["model.dtype=bfloat16", "train.mode=full"]), cpu) == torch.bfloat16
    assert mixed_precision(load_config(r, ["model.dtype=bfloat16", "train.mode=lora"]), cpu) is None  # PEFT: fp32
    assert mixed_precision(load_config(r, ["model.dtype=bfloat16", "train.mode=head"]), cpu) is None  # frozen body
    assert mixed_precision(load_config(r, ["model.dtype=float32", "train.mode=full"]), cpu) is None
    assert mixed_precision(load_config(r, ["model.dtype=bfloat16", "train.precision=pure"]), cpu) is None
    assert mixed_precision(load_config(r, ["model.dtype=bfloat16", "train.precision=mixed", "train.mode=lora"]),
                           cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert mixed_precision(load_config(r, ["train.mode=full"]), cuda) is None  # auto: no bf16 without one


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_mixed_on_a_cpu_with_native_bfloat16_for_a_wide_model(tmp_path, monkeypatch, native):
    """train.precision=auto on the CPU: mixed for a float32 model at least MIN_WIDTH wide where the CPU multiplies
    bfloat16 natively (2.2-2.5x float32's products there); pure on a narrow model, on another CPU, or when
    asked."""
    from tunelab.train import precision

    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: native)
    r = tmp_path / "r.yaml"
    r.write_text("data: {train: x.txt}\n")
    cpu, wide = torch.device("cpu"), precision.MIN_WIDTH
    for mode in ("lora", "full", "head"):
        cfg = load_config(r, [f"train.mode={mode}"])
        assert precision.mixed_precision(cfg, cpu, wide) == (torch.bfloat16 if native else None), mode
        assert precision.mixed_precision(cfg, cpu, wide // 8) is None  # narrow: the casts cost more
        assert precision.mixed_precision(cfg, cpu) is None  # before loading: the width is not known
    assert precision.mixed_precision(load_config(r, ["train.precision=pure"]), cpu, wide) is None
    line = precision.precision_line(load_config(r, []), cpu, torch.bfloat16)
    assert "train.precision=auto: this CPU multiplies bfloat16 natively" in line
    assert "auto" not in precision.precision_line(load_config(r, ["train.precision=mixed"]), cpu, torch.bfloat16)


def test_resuming_another_runs_checkpoint(tmp_path, tiny_model, names_file):
    """Into a new directory with early stopping on, from a run that had none (no best/ to bring); and over
    a directory holding a third run with output.overwrite=true: nothing of that run is kept (its before.json)."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    base = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", "eval.generate=false"]
    a = tunelab.train(load_config(r, [*base, f"output.dir={tmp_path / 'a'}", "eval.before=false"]), quiet=True)
    step2 = a / "checkpoints" / "step-2"
    b = tunelab.train(load_config(r, [*base, f"output.dir={tmp_path / 'b'}", "eval.before=false",
                                      "train.eval_every=1", "train.early_stopping_patience=5",
                                      f"train.resume={step2}"]), quiet=True)
    assert [row["step"] for row in _metrics(b)] == [3, 4] and (b / "best" / "best.json").exists()
    c = tunelab.train(load_config(r, [*base, f"output.dir={tmp_path / 'c'}", "train.seed=5"]), quiet=True)
    before_c = json.loads((c / "before.json").read_text())
    (c / "before.json").write_text(json.dumps({**before_c, "val_loss": 123.0}))  # marks c's own file
    tunelab.train(load_config(r, [*base, f"output.dir={c}", "output.overwrite=true", f"train.resume={step2}"]),
                  quiet=True)
    assert json.loads((c / "before.json").read_text())["val_loss"] != 123.0
    assert [row["step"] for row in _metrics(c)] == [3, 4]


def test_a_resume_with_other_evaluation_settings_scores_the_base_model_again(tmp_path, tiny_model, names_file):
    """before and after compare alike: a resumed run whose evaluation examples changed scores its base again."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    base = ["train.checkpoint_every=1", "eval.max_new_tokens=3"]
    run = tunelab.train(load_config(r, [*base, "train.max_steps=2", "eval.max_examples=6"]), quiet=True)
    assert json.loads((run / "before.json").read_text())["n"] == 6
    run = tunelab.train(load_config(r, [*base, "train.max_steps=3", "eval.max_examples=4"]), resume=True, quiet=True)
    result = json.loads((run / "eval.json").read_text())
    assert result["steps"] == 3 and result["n"] == 4 and result["before"]["n"] == 4
    saved = json.loads((run / "before.json").read_text())
    assert saved["n"] == 4 and "eval_key" in saved
    # the same settings again: the saved base scores are reused (the key is not part of the results)
    (run / "before.json").write_text(json.dumps({**saved, "exact_match": 0.123}))
    run = tunelab.train(load_config(r, [*base, "train.max_steps=4", "eval.max_examples=4"]), resume=True, quiet=True)
    result = json.loads((run / "eval.json").read_text())
    assert result["before"]["exact_match"] == 0.123 and "eval_key" not in result["before"]


def test_tunelab_eval_scores_a_mixed_precision_run_as_training_did(tmp_path, tiny_model, names_file):
    """A run trained in mixed precision is evaluated by `tunelab eval` in mixed precision too (float32 weights,
    autocast): the same validation loss as its eval.json, not that of float32 or bfloat16 weights."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    tunelab_cli("train", str(r), "train.precision=mixed", "train.max_steps=3", "eval.before=false",
                f"output.dir={tmp_path / 'run'}")
    trained = json.loads((tmp_path / "run" / "eval.json").read_text())
    tunelab_cli("eval", str(tmp_path / "run"), "--out", str(tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["val_loss"] == pytest.approx(trained["val_loss"], abs=1e-6)
    assert again["exact_match"] == trained["exact_match"]
    tunelab_cli("eval", str(tmp_path / "run"), "train.precision=pure", "--out", str(tmp_path / "fp32.json"))
    assert json.loads((tmp_path / "fp32.json").read_text())["val_loss"] != again["val_loss"]  # float32: differs


def test_a_mixed_precision_head_run_saves_its_frozen_body_unrounded(tmp_path, tiny_model, names_file):
    """Mixed precision stores frozen linear weights in bfloat16 only under LoRA (the adapter alone is saved): a
    head run saves its whole model, whose frozen layers must stay the base's float32 weights, bit for bit."""
    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    cfg = load_config(r, ["train.mode=head", "train.precision=mixed", "train.max_steps=2", "eval.before=false",
                          "eval.generate=false"])
    run = tunelab.train(cfg, quiet=True)
    saved = load_file(str(run / "model" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert saved[name].dtype == torch.float32 and torch.equal(saved[name], base[name])


def test_compile_without_a_compiler_warns_and_trains_the_same_steps_eagerly(tmp_path, tiny_model, names_file,
                                                                               monkeypatch, caplog):
    """train.compile on a machine where inductor cannot generate code (no C++ compiler: a bare laptop) is not
    a crash at the first step: the log says so and the run trains eagerly, with the eager run's losses."""
    import torch._inductor.cpp_builder as cpp_builder

    r = write_recipe(tmp_path / "r.yaml", tiny_model, names_file)
    common = ["train.max_steps=2", "eval.before=false", "eval.generate=false"]
    ref = _metrics(tunelab.train(load_config(r, [*common, "output.dir=" + str(tmp_path / "eager")]), quiet=True))

    def no_compiler():
        raise RuntimeError("no g++")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with caplog.at_level("WARNING", logger="tunelab"):
        run = tunelab.train(load_config(r, [*common, "train.compile=true", "output.dir=" + str(tmp_path / "c")]),
                            quiet=True)
    assert "inductor found no C++ compiler for the CPU (RuntimeError); training without compiling" in caplog.text
    assert [row["loss"] for row in _metrics(run)] == [row["loss"] for row in ref]


def test_compile_unavailable_names_what_is_missing():
    from tunelab.train.forward import compile_unavailable

    assert compile_unavailable("aot_eager", torch.device("cpu")) is None
    assert compile_unavailable("inductor", torch.device("cpu")) is None  # this machine (and CI) have g++
    meta = compile_unavailable("inductor", torch.device("meta"))
    from torch.utils._triton import has_triton
    assert (meta is None) == has_triton()
