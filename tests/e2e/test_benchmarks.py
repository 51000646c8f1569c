"""The benchmark scripts run end to end (a smoke run on the CPU with the tiny model; no time is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def test_sft_gpu_script_smoke_run_on_cpu(tiny_model, tmp_path):
    """benchmarks/sft_gpu.py --device cpu: every framework trains on the same batches; in fp32 tunelab's
    packed, compiled loss curve (train.compile with aot_eager: no code generation on the test machine) is
    the plain loop's (packing and compiling are exact; --random-init draws the same weights in every
    framework), and the JSON line has the issue's keys."""
    skip = [] if importlib.util.find_spec("trl") else ["--skip", "trl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    script = str(ROOT / "benchmarks" / "sft_gpu.py")
    skeleton = tmp_path / "skeleton"  # config and tokenizer, no weights: what --random-init needs
    spec = importlib.util.spec_from_file_location("sft_gpu", script)
    sft_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft_gpu)
    sft_gpu.save_skeleton(str(tiny_model), skeleton)
    assert (skeleton / "config.json").exists() and not list(skeleton.glob("*.safetensors"))
    cmd = [sys.executable, script, "--device", "cpu", "--model", str(skeleton),
           "--steps", "2", "--batch", "4", "--examples", "24", "--mean-tokens", "40", "--lr", "1e-3",
           "--pack-length", "96", "--lora", "--compile", "aot_eager", "--random-init", *skip]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("tunelab_tok_s", "plain_tok_s", "speedup_vs_plain", "max_abs_loss_diff", "tunelab_lora_tok_s",
                "lora_vs_full", "tunelab_peak_mb", "plain_peak_mb"):
        assert key in out, key
    if not skip:
        assert "trl_tok_s" in out and "speedup_vs_trl" in out
    assert out["mean_tokens"] > 20
    assert out["loss_diff_vs_plain"] < 1e-4  # fp32: tunelab (packed) computes the plain loop's losses
    assert "failed" not in proc.stderr
    assert out["compile"] == "aot_eager" and out["random_init"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_sft_gpu_script_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sft_gpu.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


def test_sft_cpu_script_every_workload_in_both_precisions(tiny_chat_model):
    """benchmarks/sft_cpu.py on the tiny model: every workload (the names, Alpaca-length records, multi-turn
    chat) in fp32 and bf16; in fp32 tunelab computes the plain loop's losses (and TRL's, where installed) on
    each workload, and the JSON line has each workload's figures and the keys it printed before workloads."""
    skip = [] if importlib.util.find_spec("trl") else ["--skip", "trl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sft_cpu.py"), "--model", str(tiny_chat_model), "--steps", "2",
           "--batch", "4", "--examples", "16", "--mean-tokens", "60", *skip]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["workloads"]) == {"names", "alpaca", "chat"}
    for name, w in out["workloads"].items():
        assert w["batch"] == 4 and w["steps"] == 2
        for precision in ("fp32", "bf16"):
            for key in ("tunelab_tok_s", "plain_tok_s", "speedup_vs_plain", "max_abs_loss_diff"):
                assert key in w[precision], (name, precision, key)
        assert w["fp32"]["max_abs_loss_diff"] < 1e-4, name  # the same losses on the same tokens
        assert w["bf16"]["max_abs_loss_diff"] < 0.1, name  # bfloat16 products: close, not equal
        assert "tunelab_bf16_vs_fp32" in w
    assert out["workloads"]["alpaca"]["mean_tokens"] > 2 * out["workloads"]["names"]["mean_tokens"]
    for key in ("tunelab_tok_s", "plain_tok_s", "speedup_vs_plain", "max_abs_loss_diff"):  # names in fp32
        assert out[key] == out["workloads"]["names"]["fp32"][key]
    assert "failed" not in proc.stderr
