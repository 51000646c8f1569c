"""tunelab vs TRL's SFTTrainer (+PEFT) vs a plain transformers + PEFT loop, on the CPU, on the workloads a user
brings, in float32 and in bfloat16 mixed precision, in one run.

Workloads (``--workloads``, all three by default):

- ``names``: the main job's examples as they were measured until 2026-12-05 (recipes/reverse_names_bpe.yaml: the
  answers in the tokenizer's usual tokens, real names only): short rows that share a prompt prefix, where
  tunelab's shared-prefix path applies;
- ``alpaca``: instruction records of Alpaca-like lengths (a few hundred tokens), worded in many ways so that no
  prompt prefix is shared (benchmarks/workloads.py builds them from names.txt);
- ``chat``: multi-turn conversations (2 to 4 exchanges) in the model's chat template, the loss on every
  assistant turn.

Precisions (``--precisions``): ``fp32``, and ``bf16``: float32 weights and AdamW with the forward pass autocast
to bfloat16 in all three (tunelab's train.precision=mixed, TRL's bf16=True, torch.autocast in the plain loop).

All three train on the same tokenized examples (tunelab's: the loss on the completion, or on the assistant
turns), in the same batches and order, with the same LoRA configuration, optimizer and hyper-parameters, each in
a process of its own; TRL is given the token ids and labels, so its loss is over the same tokens.
Printed: each one's throughput (the non-padding tokens of the training examples per second, however the
computation is arranged), peak memory (RSS), loss curve, the ratios, and one line of JSON at the end:

    python benchmarks/sft_cpu.py                                  # every workload, fp32 and bf16
    python benchmarks/sft_cpu.py --workloads names --precisions fp32 --steps 16 --trl-defaults-steps 2
    python benchmarks/sft_cpu.py --steps 2 --model PATH --skip trl  # a smoke run on a small model

TRL runs configured for this CPU (gradient checkpointing off); ``--trl-defaults-steps N`` also times N steps of
TRL with its own defaults (bf16 and gradient checkpointing on) on the names.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tunelab.config import load_config  # noqa: E402
from tunelab.data.batching import collate, epoch_batches  # noqa: E402
from tunelab.models import load_tokenizer, resolve_model_path  # noqa: E402
from tunelab.tasks import build_dataset  # noqa: E402

# workload: (micro-batch, steps) by default
WORKLOADS = {"names": (32, 16), "alpaca": (8, 8), "chat": (8, 8)}
PRECISIONS = {"fp32": ["model.dtype=float32", "train.precision=pure"],
              "bf16": ["model.dtype=float32", "train.precision=mixed"]}
LOOPS = ("plain", "trl", "tunelab")


def rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady(xs: list[float]) -> float:
    """Throughput over the steps after the first (which pays one-off costs)."""
    return statistics.fmean(xs[1:]) if len(xs) > 1 else xs[0]


def recipe(workload: str, data_dir: Path, args) -> Path:
    """The tunelab recipe of a workload (the names: recipes/reverse_names_bpe.yaml, as measured)."""
    if workload == "names":
        return ROOT / "recipes" / "reverse_names_bpe.yaml"
    import workloads

    path = data_dir / f"{workload}.yaml"
    if workload == "alpaca":
        data = workloads.write_jsonl(data_dir / "alpaca.jsonl", workloads.alpaca_records(
            args.examples, args.mean_tokens, args.seed))
        body = {"model": args.model, "data": {"train": str(data), "prompt": "{instruction}\n{input}\n",
                                              "completion": "{output}", "max_length": 2048}}
    else:
        data = workloads.write_jsonl(data_dir / "chat.jsonl", workloads.chat_records(
            args.examples, args.mean_tokens, args.seed))
        body = {"task": "chat", "model": args.model, "data": {"train": str(data), "max_length": 2048},
                "chat": {"template": "auto", "train_on": "all_assistant"}}
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def overrides(args, workload: str, precision: str) -> list[str]:
    batch, steps = batch_and_steps(args, workload)
    return [f"model={args.model}", *PRECISIONS[precision], f"train.max_steps={steps}",
            f"train.batch_size={batch}", f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=0",
            "train.weight_decay=0", "train.max_grad_norm=1.0", f"train.seed={args.seed}", "train.checkpoint_every=0",
            "train.mode=lora", f"lora.r={args.r}", f"lora.alpha={2 * args.r}", f"lora.targets=[{args.targets}]",
            "lora.dropout=0", f"model.attention={args.attention}", "data.group_by_length=false",
            "data.validation_size=0", "eval.before=false",
            "eval.generate=false", "output.save_model=false", "output.report_to=[]"]


def batch_and_steps(args, workload: str) -> tuple[int, int]:
    batch, steps = WORKLOADS[workload]
    return args.batch or batch, args.steps or steps


def lora_config(args):
    from peft import LoraConfig

    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    return LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")


def load_base(path: str, seed: int, attention: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    attn = {} if attention == "auto" else {"attn_implementation": attention}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def run_plain(args, path, examples, batches, pad_id, precision):
    """The loop people write: model(**batch, labels=...) (full logits), backward, clip, step."""
    from peft import get_peft_model

    model = get_peft_model(load_base(path, args.seed, args.attention), lora_config(args))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    losses, tok_s = [], []
    for idx in batches:
        b = collate([examples[i] for i in idx], pad_id)
        t0 = time.perf_counter()
        with autocast(precision):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok_s.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
        losses.append(float(loss))
    return losses, tok_s


def run_tunelab(cfg_path: Path, recipe_overrides: list[str], out_dir: str):
    """tunelab's own loop, through its public API, reading what it logged."""
    import tunelab

    cfg = load_config(cfg_path, recipe_overrides + [f"output.dir={out_dir}"])
    run = tunelab.train(cfg, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["tokens_per_s"] for r in rows]


def run_trl(args, path, examples, batches, tok, batch: int, steps: int, precision: str, cpu_config: bool):
    """TRL's SFTTrainer on the same token ids and labels (a tokenized dataset: TRL takes them as they are)."""
    from datasets import Dataset
    from trl import SFTConfig

    order = [i for idx in batches[:steps] for i in idx]
    data = Dataset.from_list([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order])
    step_tokens = [sum(len(examples[i].input_ids) for i in idx) for idx in batches[:steps]]

    from trl_timing import in_order_trainer, step_timer

    InOrder = in_order_trainer()  # the same batches, in the same order, as the others

    extra = dict(bf16=precision == "bf16", gradient_checkpointing=False) if cpu_config else {}
    with tempfile.TemporaryDirectory() as tmp:
        conf = SFTConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=args.seed, completion_only_loss=True, max_length=None, dataloader_num_workers=0,
                         disable_tqdm=True, **extra)
        timer = step_timer()
        trainer = InOrder(model=load_base(path, args.seed, args.attention), args=conf, train_dataset=data,
                          processing_class=tok, peft_config=lora_config(args), callbacks=[timer])
        trainer.train()
    return timer.losses, [n / t for n, t in zip(step_tokens, timer.times)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--workloads", default="names,alpaca,chat", help="comma-separated: names,alpaca,chat")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16")
    p.add_argument("--steps", type=int, default=0, help="steps of each run (0: names 16, alpaca 8, chat 8)")
    p.add_argument("--batch", type=int, default=0, help="micro-batch (0: names 32, alpaca 8, chat 8)")
    p.add_argument("--examples", type=int, default=400, help="records of the alpaca and chat sets")
    p.add_argument("--mean-tokens", type=int, default=300, help="their mean length in tokens")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", help="the attention kernel of every loop: auto (sdpa), eager, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--trl-defaults-steps", type=int, default=0, help="also time TRL with its defaults (names)")
    p.add_argument("--skip", default="", help="comma-separated: plain,trl,tunelab")
    p.add_argument("--only", help=argparse.SUPPRESS)  # workload:precision:loop[:defaults], in a process of its own
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            p.error(f"--workloads: {w!r} is not one of {', '.join(WORKLOADS)}")
    for x in args.precisions.split(","):
        if x not in PRECISIONS:
            p.error(f"--precisions: {x!r} is not one of {', '.join(PRECISIONS)}")
    return args


def run_one(args) -> dict:
    """One loop on one workload in one precision, in this process: its losses, tokens/s per step, peak RSS."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    workload, precision, loop, *variant = args.only.split(":")
    path = resolve_model_path(args.model)
    batch, steps = batch_and_steps(args, workload)
    ov = overrides(args, workload, precision)
    cfg_path = recipe(workload, Path(args.data_dir), args)
    cfg = load_config(cfg_path, ov)
    tok = load_tokenizer(cfg.model, path)
    examples = build_dataset(cfg, tok)[0]["train"]
    # tunelab's own order for these settings (no length grouping): the others follow it
    batches = epoch_batches([len(e.input_ids) for e in examples], batch, args.seed, 0, False)[:steps]
    if loop == "plain":
        losses, tok_s = run_plain(args, path, examples, batches, tok.pad_token_id, precision)
    elif loop == "trl":
        defaults = bool(variant)
        losses, tok_s = run_trl(args, path, examples, batches, tok, batch,
                                args.trl_defaults_steps if defaults else steps, precision, cpu_config=not defaults)
    else:
        with tempfile.TemporaryDirectory() as out:
            losses, tok_s = run_tunelab(cfg_path, ov, out)
    tokens = statistics.fmean(len(examples[i].input_ids) for idx in batches for i in idx)
    return {"losses": losses, "tok_s": tok_s, "rss_mb": rss_mb(), "mean_tokens": tokens}


def compare(results: dict[str, dict]) -> dict[str, object]:
    """One workload's figures in one precision: each loop's tokens/s and RSS, the ratios, the loss agreement."""
    out: dict[str, object] = {}
    for name, r in results.items():
        key = name.replace(":", "_")
        out[f"{key}_tok_s"] = round(steady(r["tok_s"]), 1)
        out[f"{key}_rss_mb"] = round(r["rss_mb"])
    for other in ("trl", "plain"):
        if "tunelab" in results and other in results:
            out[f"speedup_vs_{other}"] = round(out["tunelab_tok_s"] / out[f"{other}_tok_s"], 2)
    curves = [r["losses"] for n, r in results.items() if ":" not in n]
    if len(curves) > 1:
        out["max_abs_loss_diff"] = round(max(abs(a - b) for c in curves[1:] for a, b in zip(curves[0], c)), 6)
    return out


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    skip = set(filter(None, args.skip.split(",")))
    loops = [n for n in LOOPS if n not in skip]
    summary: dict[str, object] = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                                  "model": args.model, "lora": f"r={args.r} {args.targets}",
                                  "attention": args.attention, "workloads": {}}
    failed = []
    print(f"{'workload':8s} {'precision':9s} {'loop':13s} {'tokens/s':>9s} {'peak RSS':>9s} {'time':>7s}  loss")
    with tempfile.TemporaryDirectory() as data_dir:
        for workload in args.workloads.split(","):
            per: dict[str, object] = {}
            summary["workloads"][workload] = per  # type: ignore[index]
            batch, steps = batch_and_steps(args, workload)
            for precision in args.precisions.split(","):
                runs = list(loops)
                if args.trl_defaults_steps and workload == "names" and precision == "fp32" and "trl" not in skip:
                    runs.append("trl:defaults")
                results = {}
                for name in runs:
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--data-dir", data_dir,
                                           "--only", f"{workload}:{precision}:{name}"], capture_output=True, text=True)
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        print(f"{workload}/{precision}/{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                        failed.append(f"{workload}/{precision}/{name}")
                        continue
                    r = results[name] = json.loads(lines[-1][len("RESULT "):])
                    per.setdefault("batch", batch)
                    per.setdefault("steps", steps)
                    per.setdefault("mean_tokens", round(r["mean_tokens"], 1))
                    print(f"{workload:8s} {precision:9s} {name:13s} {steady(r['tok_s']):9.1f} {r['rss_mb']:6.0f} MB "
                          f"{time.perf_counter() - t0:6.1f}s  {' '.join(f'{x:.4f}' for x in r['losses'][:6])}"
                          f"{' ...' if len(r['losses']) > 6 else ''}", flush=True)
                per[precision] = compare(results)
            for name in loops:  # what bfloat16 buys each loop
                fp, bf = per.get("fp32"), per.get("bf16")
                if isinstance(fp, dict) and isinstance(bf, dict) and f"{name}_tok_s" in fp and f"{name}_tok_s" in bf:
                    per[f"{name}_bf16_vs_fp32"] = round(bf[f"{name}_tok_s"] / fp[f"{name}_tok_s"], 2)
    names = summary["workloads"].get("names", {})  # type: ignore[attr-defined]
    if isinstance(names, dict) and isinstance(names.get("fp32"), dict):
        summary.update(names["fp32"])  # the keys this benchmark printed before it had workloads
    print(json.dumps(summary))
    if failed:
        sys.exit(f"sft_cpu.py: {', '.join(failed)} failed (see above)")


if __name__ == "__main__":
    main()
