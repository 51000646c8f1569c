"""tunelab vs TRL's SFTTrainer (+PEFT) vs a plain transformers + PEFT loop, in one run, on the CPU.

Same model, data, batches in the same order, LoRA configuration, optimizer and hyper-parameters for all
three. Prints each one's throughput (non-padding tokens of the training examples per second, however the
computation is arranged), peak memory (RSS) and loss curve, the ratios, and ends with one line of JSON:

    python benchmarks/sft_cpu.py                     # names reversal on the built-in model, 16 steps
    python benchmarks/sft_cpu.py --steps 4 --model PATH --trl-defaults-steps 0

TRL runs configured for this CPU (fp32, gradient checkpointing off); ``--trl-defaults-steps N`` also times
N steps of TRL with its own defaults (bf16 and gradient checkpointing on).
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

from tunelab.config import load_config  # noqa: E402
from tunelab.data.batching import collate, epoch_batches  # noqa: E402
from tunelab.models import load_tokenizer, resolve_model_path  # noqa: E402
from tunelab.tasks import build_dataset  # noqa: E402


def rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady(xs: list[float]) -> float:
    """Throughput over the steps after the first (which pays one-off costs)."""
    return statistics.fmean(xs[1:]) if len(xs) > 1 else xs[0]


def lora_config(args):
    from peft import LoraConfig

    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    return LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")


def load_base(path: str, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_plain(args, path, examples, batches, pad_id):
    """The loop people write: model(**batch, labels=...) (full logits), backward, clip, step."""
    from peft import get_peft_model

    model = get_peft_model(load_base(path, args.seed), lora_config(args))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    losses, tok_s = [], []
    for idx in batches:
        b = collate([examples[i] for i in idx], pad_id)
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok_s.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
        losses.append(float(loss))
    return losses, tok_s


def run_tunelab(args, recipe_overrides, out_dir):
    """tunelab's own loop, through its public API, reading what it logged."""
    import tunelab

    cfg = load_config(ROOT / "recipes" / "reverse_names.yaml", recipe_overrides + [f"output.dir={out_dir}"])
    run = tunelab.train(cfg, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["tokens_per_s"] for r in rows]


def run_trl(args, path, examples, batches, tok, steps: int, cpu_config: bool):
    from datasets import Dataset
    from trl import SFTConfig

    order = [i for idx in batches[:steps] for i in idx]
    data = Dataset.from_list([{"prompt": examples[i].prompt, "completion": examples[i].completion} for i in order])
    step_tokens = [sum(len(examples[i].input_ids) for i in idx) for idx in batches[:steps]]

    from trl_timing import in_order_trainer, step_timer

    InOrder = in_order_trainer()  # the same batches, in the same order, as the others

    extra = dict(bf16=False, gradient_checkpointing=False) if cpu_config else {}
    with tempfile.TemporaryDirectory() as tmp:
        conf = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=steps,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=args.seed, completion_only_loss=True, max_length=None, dataloader_num_workers=0,
                         disable_tqdm=True, **extra)
        timer = step_timer()
        trainer = InOrder(model=load_base(path, args.seed), args=conf, train_dataset=data, processing_class=tok,
                          peft_config=lora_config(args), callbacks=[timer])
        trainer.train()
    return timer.losses, [n / t for n, t in zip(step_tokens, timer.times)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--trl-defaults-steps", type=int, default=0, help="also time TRL with its defaults")
    p.add_argument("--skip", default="", help="comma-separated: plain,trl,tunelab")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one framework, in a process of its own
    return p.parse_args(argv)


def run_one(args) -> dict:
    """One framework in this process: its losses, tokens/s per step and peak RSS."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    path = resolve_model_path(args.model)
    overrides = [f"model={args.model}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                 f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                 "train.max_grad_norm=1.0", f"train.seed={args.seed}", "train.checkpoint_every=0",
                 f"lora.r={args.r}", f"lora.alpha={2 * args.r}", f"lora.targets=[{args.targets}]",
                 "data.group_by_length=false", "data.validation_size=0", "eval.before=false",
                 "eval.generate=false", "output.save_model=false"]
    cfg = load_config(ROOT / "recipes" / "reverse_names.yaml", overrides)
    tok = load_tokenizer(cfg.model, path)
    examples = build_dataset(cfg, tok)[0]["train"]
    # tunelab's own order for these settings (no length grouping): the others follow it
    batches = epoch_batches([len(e.input_ids) for e in examples], args.batch, args.seed, 0, False)[: args.steps]
    name, _, variant = args.only.partition(":")
    if name == "plain":
        losses, tok_s = run_plain(args, path, examples, batches, tok.pad_token_id)
    elif name == "trl":
        steps = args.trl_defaults_steps if variant == "defaults" else args.steps
        losses, tok_s = run_trl(args, path, examples, batches, tok, steps, cpu_config=variant != "defaults")
    else:
        with tempfile.TemporaryDirectory() as out:
            losses, tok_s = run_tunelab(args, overrides, out)
    return {"losses": losses, "tok_s": tok_s, "rss_mb": rss_mb()}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    skip = set(filter(None, args.skip.split(",")))
    runs = [n for n in ("plain", "trl", "tunelab") if n not in skip]
    if args.trl_defaults_steps:
        runs.append("trl:defaults")
    results = {}
    for name in runs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name], capture_output=True,
                              text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = results[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"{name:13s} {steady(r['tok_s']):8.1f} tok/s   peak RSS {r['rss_mb']:6.0f} MB   "
              f"{time.perf_counter() - t0:6.1f} s   loss {' '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)

    out: dict[str, object] = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                              "model": args.model, "steps": args.steps, "batch": args.batch,
                              "lora": f"r={args.r} {args.targets}"}
    for name, r in results.items():
        key = name.replace(":", "_")
        out[f"{key}_tok_s"] = round(steady(r["tok_s"]), 1)
        out[f"{key}_rss_mb"] = round(r["rss_mb"])
    if "tunelab" in results and "trl" in results:
        out["speedup_vs_trl"] = round(out["tunelab_tok_s"] / out["trl_tok_s"], 2)
    if "tunelab" in results and "plain" in results:
        out["speedup_vs_plain"] = round(out["tunelab_tok_s"] / out["plain_tok_s"], 2)
    curves = [r["losses"] for n, r in results.items() if n != "trl:defaults"]
    if len(curves) > 1:
        out["max_abs_loss_diff"] = round(max(abs(a - b) for c in curves[1:] for a, b in zip(curves[0], c)), 6)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
