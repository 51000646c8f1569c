"""Batched, KV-cached greedy generation against one prompt at a time, on held-out names.

The evaluation path of tunelab (tunelab.generate.generate: prompts sorted by length, left-padded, HF
generate with the KV cache) against the same model answering the same prompts one at a time (KV cache
on, and once more with it off). The outputs must be identical; the script says so and prints the times
side by side, ending with one line of JSON:

    python benchmarks/generation.py                  # 200 names, the built-in model
    python benchmarks/generation.py --n 50 --model PATH --no-uncached
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.config import ModelConfig  # noqa: E402
from tunelab.generate import generate  # noqa: E402
from tunelab.models import load_model  # noqa: E402


def one_at_a_time(model, tok, prompts: list[str], max_new_tokens: int, use_cache: bool) -> list[str]:
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=True)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-uncached", action="store_true", help="skip one-at-a-time without the KV cache")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (ROOT / "data" / "names.txt").read_text().split()
    names = sorted(set(names), key=names.index)[-args.n:]  # the end of the file: unlike the training split
    prompts = [f"Reverse the name: {n}. Answer:" for n in names]
    model, tok = load_model(ModelConfig(name=args.model, device="cpu"))
    model.eval()
    generate(model, tok, prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up

    t = time.perf_counter()
    batched = [o[0] for o in generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch)]
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    single = one_at_a_time(model, tok, prompts, args.max_new_tokens, use_cache=True)
    t_single = time.perf_counter() - t
    t_uncached = None
    if not args.no_uncached:
        t = time.perf_counter()
        uncached = one_at_a_time(model, tok, prompts, args.max_new_tokens, use_cache=False)
        t_uncached = time.perf_counter() - t
        same_uncached = sum(a.strip() == b.strip() for a, b in zip(uncached, single))
        print(f"identical outputs, cached vs uncached one at a time: {same_uncached}/{len(prompts)}")
    same = sum(a.strip() == b.strip() for a, b in zip(batched, single))
    print(f"{'batched, KV cache (tunelab)':34s} {t_batched:8.2f} s   {len(prompts) / t_batched:7.1f} prompts/s")
    print(f"{'one at a time, KV cache':34s} {t_single:8.2f} s   {len(prompts) / t_single:7.1f} prompts/s")
    if t_uncached is not None:
        print(f"{'one at a time, no KV cache':34s} {t_uncached:8.2f} s   {len(prompts) / t_uncached:7.1f} prompts/s")
    print(f"identical outputs, batched vs one at a time: {same}/{len(prompts)}")
    result = {"n": len(prompts), "batch": args.batch, "max_new_tokens": args.max_new_tokens,
              "batched_s": round(t_batched, 3), "one_at_a_time_s": round(t_single, 3),
              "one_at_a_time_no_cache_s": None if t_uncached is None else round(t_uncached, 3),
              "speedup": round(t_single / t_batched, 2),
              "speedup_vs_no_cache": None if t_uncached is None else round(t_uncached / t_batched, 2),
              "identical_outputs": same, "threads": torch.get_num_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
