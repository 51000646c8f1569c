"""Full SFT on one GPU: tunelab vs TRL's SFTTrainer vs a plain transformers eager loop, in one run.

SmolLM2-135M (the built-in model, or --model), bf16, Alpaca-length examples (mean ~370 tokens: a
synthetic set built from names.txt, or --data FILE.jsonl with Alpaca records), the same batches in the
same order, AdamW with the same hyper-parameters. Each framework runs in a process of its own and
reports its throughput (non-padding tokens of the training examples per second, however the
computation is arranged), peak memory (CUDA max allocated; RSS on a CPU) and loss curve; the script
prints them side by side with the ratios and ends with one line of JSON:

    python benchmarks/sft_gpu.py                         # 30 steps of 16 on cuda
    python benchmarks/sft_gpu.py --batch 64 --steps 20 --skip trl
    python benchmarks/sft_gpu.py --device cpu --model PATH --steps 2 --batch 4 --mean-tokens 48   # smoke run

tunelab runs with packing (train.packing=true: the examples of a micro-batch end to end, position_ids
restarting for each, so no token attends across examples) and its loss only on supervised positions;
``--lora`` also times tunelab with LoRA (r=16, q,v) on the same data (the target: not slower than full).
TRL runs with bf16 and gradient checkpointing off (``--trl-defaults`` leaves its defaults on).

``--random-init`` draws the model's weights afresh from a seed (the same weights in every framework):
throughput does not depend on the weights, and a directory holding only the model's config.json and
tokenizer (``--save-skeleton DIR`` writes one) is then enough - the way to run this on a machine that
cannot hold or reach the built-in model's file (see benchmarks/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_RECIPE = ROOT / "recipes" / "reverse_names_bpe.yaml"  # whose examples and overrides were measured
sys.path.insert(0, str(ROOT / "src"))

from tunelab.config import load_config  # noqa: E402
from tunelab.data.batching import collate, epoch_batches  # noqa: E402
from tunelab.models import load_tokenizer, resolve_model_path  # noqa: E402
from tunelab.tasks import build_dataset  # noqa: E402


def synthetic_alpaca(path: Path, n: int, mean_tokens: int, seed: int) -> None:
    """Alpaca-style records (instruction, input, output) over names.txt, their lengths drawn log-normally
    around ``mean_tokens`` (a name and its reversal take about 7 tokens), as long as Alpaca's on average."""
    names = (ROOT / "data" / "names.txt").read_text().split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = max(1, min(400, round(rng.lognormvariate(math.log(mean_tokens / 7), 0.6))))
            picked = [rng.choice(names) for _ in range(k)]
            rec = {"instruction": "Reverse each of the following names, keeping their order.",
                   "input": ", ".join(picked), "output": ", ".join(x[::-1] for x in picked)}
            f.write(json.dumps(rec) + "\n")


def overrides(args, data: Path) -> list[str]:
    init = ["model.init=random", f"model.init_seed={args.seed}"] if args.random_init else []
    return [f"model={args.model}", *init, f"model.device={args.device}", f"model.dtype={args.dtype}",
            f"train.precision={args.precision}", f"data.train={data}", "data.format=alpaca",
            f"data.max_length={args.max_length}",
            "data.validation_size=0", "data.unique_by=null", "data.group_by_length=false",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.schedule=constant",
            "train.warmup_steps=0", "train.weight_decay=0", "train.max_grad_norm=1.0", f"train.seed={args.seed}",
            "train.checkpoint_every=0", "train.log_every=1", "train.mode=full", "eval.before=false",
            "eval.generate=false", "output.save_model=false", "output.report_to=[]"]


def peak_mb(device: str) -> float:
    """CUDA max allocated on a GPU; this process's peak RSS on the CPU (each framework has its own process)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_base(args, path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.random_init:  # as tunelab's model.init=random does: from the config, seeded
        from transformers import AutoConfig

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        return model.to(args.device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device)


def run_plain(args, path, examples, batches, pad_id):
    """The loop people write: padded batches, model(**batch, labels=...) (full logits), eager mode (no compile)."""
    model = load_base(args, path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=args.device == "cuda")
    losses, tok_s = [], []
    for idx in batches:
        b = {k: v.to(args.device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        sync(args.device)
        t0 = time.perf_counter()
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tok_s.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
    return losses, tok_s


def run_tunelab(args, data: Path, lora: bool):
    import tunelab

    extra = [f"train.packing={'false' if args.no_packing else 'true'}", f"train.pack_length={args.pack_length}",
             f"model.attention={args.attention}"]
    if args.compile:
        extra += ["train.compile=true", f"train.compile_backend={args.compile}"]
    if lora:
        extra += ["train.mode=lora", "lora.r=16", "lora.alpha=32", "lora.targets=[q_proj,v_proj]"]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(BASE_RECIPE, overrides(args, data) + extra + [f"output.dir={out}"])
        run = tunelab.train(cfg, quiet=True)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["tokens_per_s"] for r in rows]


def run_trl(args, path, examples, batches, tok, defaults: bool):
    from datasets import Dataset
    from trl import SFTConfig

    order = [i for idx in batches for i in idx]
    rows = Dataset.from_list([{"prompt": examples[i].prompt, "completion": examples[i].completion} for i in order])
    step_tokens = [sum(len(examples[i].input_ids) for i in idx) for idx in batches]

    from trl_timing import in_order_trainer, step_timer

    InOrder = in_order_trainer()  # the same batches, in the same order, as the others

    bf16 = args.dtype == "bfloat16"
    extra = {} if defaults else {"gradient_checkpointing": False}
    with tempfile.TemporaryDirectory() as tmp:
        conf = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=args.device == "cpu", bf16=bf16, seed=args.seed, completion_only_loss=True,
                         max_length=args.max_length, dataloader_num_workers=0, disable_tqdm=True, **extra)
        timer = step_timer(lambda: sync(args.device))
        model = load_base(args, path)
        trainer = InOrder(model=model, args=conf, train_dataset=rows, processing_class=tok, callbacks=[timer])
        trainer.train()
    return timer.losses, [n / t for n, t in zip(step_tokens, timer.times)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on cuda")
    p.add_argument("--precision", default="pure", choices=["pure", "mixed"],
                   help="tunelab's train.precision (pure: bf16 weights and AdamW, as the plain loop and TRL here)")
    p.add_argument("--data", help="Alpaca JSONL (instruction, input, output); default: a synthetic set")
    p.add_argument("--examples", type=int, default=2000, help="synthetic examples")
    p.add_argument("--mean-tokens", type=int, default=370, help="synthetic examples' mean length")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="sdpa", help="tunelab's model.attention (sdpa, flex_attention, ...)")
    p.add_argument("--pack-length", type=int, default=16384)
    p.add_argument("--no-packing", action="store_true", help="tunelab without packing (length regrouping)")
    p.add_argument("--random-init", action="store_true", help="seeded fresh weights (same in every framework)")
    p.add_argument("--save-skeleton", metavar="DIR", help="write --model's config.json and tokenizer to DIR, exit")
    p.add_argument("--compile", nargs="?", const="inductor", default=None,
                   help="tunelab with train.compile (each decoder layer; optional backend, default inductor)")
    p.add_argument("--lora", action="store_true", help="also time tunelab with LoRA r=16 on q,v")
    p.add_argument("--trl-defaults", action="store_true", help="TRL with its own defaults (gradient checkpointing)")
    p.add_argument("--skip", default="", help="comma-separated: plain,trl,tunelab")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--data-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def steady(xs: list[float]) -> float:
    """Throughput over the steps after the first two (which pay one-off costs: allocation, autotuning), as a
    median: a later step that recompiles (train.compile, a new shape) does not drag the figure."""
    return statistics.median(xs[2:]) if len(xs) > 2 else statistics.median(xs)


def run_one(args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    data = Path(args.data_file)
    path = resolve_model_path(args.model)
    cfg = load_config(BASE_RECIPE, overrides(args, data))
    tok = load_tokenizer(cfg.model, path)
    examples = build_dataset(cfg, tok)[0]["train"]
    batches = epoch_batches([len(e.input_ids) for e in examples], args.batch, args.seed, 0, False)[: args.steps]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.only == "plain":
        losses, tok_s = run_plain(args, path, examples, batches, tok.pad_token_id)
    elif args.only == "trl":
        losses, tok_s = run_trl(args, path, examples, batches, tok, args.trl_defaults)
    else:
        losses, tok_s = run_tunelab(args, data, lora=args.only == "tunelab_lora")
    mean_len = statistics.fmean(len(examples[i].input_ids) for idx in batches for i in idx)
    return {"losses": losses, "tok_s": tok_s, "peak_mb": peak_mb(args.device), "mean_tokens": mean_len}


def save_skeleton(model: str, out: Path) -> None:
    """The model's config.json and tokenizer files, no weights: enough for --random-init elsewhere."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def main() -> None:
    args = parse_args()
    if args.save_skeleton:
        save_skeleton(args.model, Path(args.save_skeleton))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("sft_gpu.py: no CUDA device here (use --device cpu for a smoke run)")
    skip = set(filter(None, args.skip.split(",")))
    runs = [n for n in ("plain", "trl", "tunelab") if n not in skip]
    if args.lora:
        runs.append("tunelab_lora")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "alpaca_synthetic.jsonl"
        if not args.data:
            synthetic_alpaca(data, args.examples, args.mean_tokens, args.seed)
        results = {}
        for name in runs:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name, "--data-file", str(data)],
                                  capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = results[name] = json.loads(lines[-1][len("RESULT "):])
            print(f"{name:13s} {steady(r['tok_s']):10.1f} tok/s   peak {r['peak_mb']:8.0f} MB   "
                  f"{time.perf_counter() - t0:6.1f} s   loss {' '.join(f'{x:.4f}' for x in r['losses'][:8])} ...",
                  flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    out: dict[str, object] = {"machine": f"{gpu}, torch {torch.__version__}", "model": args.model,
                              "steps": args.steps, "batch": args.batch, "dtype": args.dtype,
                              "attention": args.attention, "packing": not args.no_packing,
                              "compile": args.compile,
                              "random_init": args.random_init}
    for name, r in results.items():
        out[f"{name}_tok_s"] = round(steady(r["tok_s"]), 1)
        out[f"{name}_peak_mb"] = round(r["peak_mb"])
        out.setdefault("mean_tokens", round(r["mean_tokens"], 1))
    for other in ("trl", "plain"):
        if "tunelab" in results and other in results:
            out[f"speedup_vs_{other}"] = round(out["tunelab_tok_s"] / out[f"{other}_tok_s"], 2)
    if "tunelab" in results and "plain" in results and out["plain_peak_mb"]:
        out["memory_vs_plain"] = round(out["tunelab_peak_mb"] / out["plain_peak_mb"], 3)
    if "tunelab_lora" in results and "tunelab" in results:
        out["lora_vs_full"] = round(out["tunelab_lora_tok_s"] / out["tunelab_tok_s"], 2)
    for other in ("plain", "trl"):
        if "tunelab" in results and other in results:
            out[f"loss_diff_vs_{other}"] = round(max(abs(a - b) for a, b in zip(results["tunelab"]["losses"],
                                                                                 results[other]["losses"])), 6)
    curves = [results[n]["losses"] for n in ("tunelab", "plain", "trl") if n in results]
    if len(curves) > 1:
        out["max_abs_loss_diff"] = round(max(abs(a - b) for c in curves[1:] for a, b in zip(curves[0], c)), 6)
    print(json.dumps(out))
    if len(results) < len(runs):
        sys.exit(f"sft_gpu.py: {', '.join(n for n in runs if n not in results)} failed (see above)")


if __name__ == "__main__":
    main()
