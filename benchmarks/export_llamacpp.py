"""The main job's model exported, in transformers and in llama.cpp, side by side.

For a run directory (default: runs/reverse_names, what `make demo` writes): the merged transformers model
scored with tunelab's batched evaluation, and the GGUF exports (f16, q8_0, q4_1, q4_0) run by llama.cpp
(llama-cpp-python: `make llamacpp`), one prompt at a time with greedy decoding, on the same held-out names.
Prints, per runtime: exact match, the share of outputs identical to transformers', prompts per second, and
the file size; then one line of JSON.

    python benchmarks/export_llamacpp.py                       # runs/reverse_names, its 500 held-out names
    python benchmarks/export_llamacpp.py --run PATH --n 200
    python benchmarks/export_llamacpp.py --chat-run runs/chat_names   # a chat run through llama.cpp's chat API

With --chat-run: the run's held-out conversations answered through llama.cpp's own chat formatting (the
template embedded in the GGUF, llama-cpp-python's create_chat_completion), scored like tunelab eval (exact
match of the last assistant turn), beside the run's eval.json; and how many answers stopped at the end of
their turn rather than at the token limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.export import export_run  # noqa: E402
from tunelab.metrics import exact_match  # noqa: E402


def held_out(run: Path, n: int):
    """The run's first ``n`` validation examples (prompt tokens, expected completion), as its evaluation has
    them."""
    from tunelab.models import load_tokenizer, resolve_model_path
    from tunelab.tasks import build_dataset
    from tunelab.train.rundir import run_config

    cfg = run_config(run)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.name))
    splits, _, _ = build_dataset(cfg, tok)
    examples = splits["validation"][:n]
    return [(e.input_ids[:e.prompt_len], e.completion) for e in examples], cfg.eval.max_new_tokens


def transformers_outputs(merged: Path, prompts, max_new_tokens: int) -> tuple[list[str], float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.generate import generate

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    start = time.perf_counter()
    out = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=64)
    return [o for (o,) in out], time.perf_counter() - start


def llamacpp_outputs(path: Path, prompts, max_new_tokens: int) -> tuple[list[str], float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=64, verbose=False)
    vocab = llm._model.vocab
    outs = []
    start = time.perf_counter()
    for ids in prompts:
        toks: list[int] = []
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(vocab, t) or len(toks) >= max_new_tokens:
                break
            toks.append(t)
        outs.append(llm.detokenize(toks).decode("utf-8", errors="replace"))
    return outs, time.perf_counter() - start


def chat_check(run: Path, quant: str) -> None:
    """A chat run's held-out conversations through llama.cpp's chat formatting, against tunelab eval."""
    import llama_cpp

    from tunelab.data import chat
    from tunelab.data.formats import split_records
    from tunelab.train.rundir import run_config

    cfg = run_config(run)
    records = split_records(cfg.data, cfg.train.seed)["validation"]
    if cfg.eval.max_examples:
        records = records[:cfg.eval.max_examples]
    scored = json.loads((run / "eval.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = export_run(run, Path(tmp) / "chat.gguf", "gguf", quant)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False)
        right = stopped = 0
        start = time.perf_counter()
        for r in records:
            msgs = chat.conversation(r.fields, cfg.chat, r.where)
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            out = llm.create_chat_completion(msgs[:last], temperature=0.0, max_tokens=cfg.eval.max_new_tokens)
            choice = out["choices"][0]
            stopped += choice["finish_reason"] == "stop"
            right += exact_match(choice["message"]["content"] or "", msgs[last]["content"])
        secs = time.perf_counter() - start
    n = len(records)
    print(f"{run}: {n} held-out conversations, llama.cpp {quant} through its chat formatting (embedded template)")
    print(f"  exact match {right / n:.1%} (tunelab eval: {scored['exact_match']:.1%} over {scored['n']}); "
          f"stopped at the end of the turn: {stopped}/{n}; {n / secs:.1f} conversations/s")
    print(json.dumps({"chat_run": str(run), "n": n, "llamacpp_exact_match": round(right / n, 4),
                      "tunelab_eval_exact_match": scored["exact_match"], "stopped": stopped}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "reverse_names"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--chat-run", help="a chat run: score it through llama.cpp's chat formatting instead")
    ap.add_argument("--quant", default="f16", help="the GGUF type for --chat-run")
    args = ap.parse_args()
    if args.chat_run:
        return chat_check(Path(args.chat_run), args.quant)
    run = Path(args.run)
    examples, max_new = held_out(run, args.n)
    prompts = [p for p, _ in examples]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_run(run, Path(tmp) / "hf", "hf")
        hf_out, hf_s = transformers_outputs(merged, prompts, max_new)
        size = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
        rows.append(("transformers (float32, batched)", hf_out, hf_s, size))
        for quant in ("f16", "q8_0", "q4_1", "q4_0"):
            path = export_run(run, Path(tmp) / f"{quant}.gguf", "gguf", quant)
            out, secs = llamacpp_outputs(path, prompts, max_new)
            rows.append((f"llama.cpp {quant} (one at a time)", out, secs, path.stat().st_size))
    n = len(examples)
    print(f"{run}: {n} held-out names, greedy, at most {max_new} new tokens, 2 threads")
    print(f"{'runtime':<34}{'exact match':>12}{'same as HF':>12}{'prompts/s':>11}{'file MB':>10}")
    result = {}
    for name, outs, secs, size in rows:
        em = sum(exact_match(o, ref) for o, (_, ref) in zip(outs, examples)) / n
        same = sum(o.strip() == h.strip() for o, h in zip(outs, hf_out)) / n
        print(f"{name:<34}{em:>11.1%}{same:>11.1%}{n / secs:>11.1f}{size / 1e6:>10.1f}")
        result[name] = {"exact_match": round(em, 4), "same_as_transformers": round(same, 4),
                        "prompts_per_s": round(n / secs, 2), "file_mb": round(size / 1e6, 1)}
    print(json.dumps({"n": n, "run": str(run), "results": result}))


if __name__ == "__main__":
    main()
