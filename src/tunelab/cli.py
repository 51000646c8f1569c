"""The command line: tunelab train | eval | merge | data show.

User errors print one line (``tunelab: <where>: <what>``) and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import atomic
from .errors import TunelabError, one_line

EPILOG = "Overrides are dotted keys: train.lr=1e-4 train.max_steps=50 model=PATH output.dir=runs/x"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.loop import train

    cfg = load_config(args.recipe, args.overrides)
    train(cfg, resume=args.resume, quiet=args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.formats import build_splits
    from .evaluate import before_after_table
    from .models import load_model, load_tokenizer, load_trained
    from .train.loop import _without_samples, eval_split, evaluate_run

    target = Path(args.target)
    is_run = target.is_dir() and (target / "config.yaml").exists()
    if target.is_dir() and not is_run:
        raise TunelabError("not a run directory (no config.yaml) nor a recipe file", str(target))
    cfg = load_config(target, args.overrides)
    tok = load_tokenizer(cfg.model)
    splits, _ = build_splits(cfg.data, tok, cfg.train.seed)
    split_name, examples = eval_split(cfg, splits)
    model, tok = load_trained(target, cfg.model) if is_run else load_model(cfg.model)
    res = evaluate_run(model, tok, cfg, examples, splits["validation"], args.quiet)
    if "samples" in res:
        print(before_after_table(None, res, cfg.eval.show).replace("after fine-tuning:", f"{target}:"))
    out = {"target": str(target), "split": split_name, **_without_samples(res)}
    print(json.dumps(out))
    if args.out:
        atomic.write_json(Path(args.out), out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models import load_trained

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", str(run))
    if not (run / "adapter").is_dir():
        raise TunelabError("no adapter/ to merge (only LoRA runs have one; full runs already have model/)",
                           str(run))
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise TunelabError("output directory exists and is not empty (--force replaces it)", str(out))
    cfg = load_config(run)
    model, tok = load_trained(run, cfg.model)
    merged = model.merge_and_unload()  # W = W0 + (alpha/r)·B·A folded into each target layer

    def write(d: Path) -> None:
        merged.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    atomic.write_dir(out, write)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def _marked(tok, ids: list[int], labels: list[int], color: bool) -> str:
    """The tokens of one example, those carrying loss inside ⟦ ⟧ (or highlighted on a terminal)."""
    parts, inside = [], False
    for i, label in zip(ids, labels):
        sup = label != -100
        if sup and not inside:
            parts.append("\x1b[42;30m" if color else "⟦")
        elif not sup and inside:
            parts.append("\x1b[0m" if color else "⟧")
        inside = sup
        parts.append(tok.decode([i]))
    if inside:
        parts.append("\x1b[0m" if color else "⟧")
    return "".join(parts)


def cmd_data_show(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.formats import build_splits
    from .models import load_tokenizer

    cfg = load_config(args.recipe, args.overrides)
    tok = load_tokenizer(cfg.model)
    splits, stats = build_splits(cfg.data, tok, cfg.train.seed)
    examples = splits[args.split]
    color = sys.stdout.isatty()
    print(f"{args.split}: {len(examples)} examples; supervised tokens are "
          + ("highlighted" if color else "inside ⟦ ⟧"))
    for e in examples[: args.n]:
        print(f"--- {e.where} ({len(e.input_ids)} tokens, {e.n_supervised} supervised)")
        print(_marked(tok, e.input_ids, e.labels, color))
        if args.ids:
            print("input_ids:", e.input_ids)
            print("labels:   ", e.labels)
    print("--- statistics")
    for split, st in stats.items():
        print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune pre-trained language models.",
                                epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model from a recipe", epilog=EPILOG)
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run directory or a recipe's model", epilog=EPILOG)
    e.add_argument("target", help="run directory, or recipe YAML (evaluates its model; model=... to choose)")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--out", help="also write the metrics as JSON to this file")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF directory)")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("data", help="inspect data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    ds = dsub.add_parser("show", help="print tokenized examples with the loss-carrying tokens marked",
                         epilog=EPILOG)
    ds.add_argument("recipe")
    ds.add_argument("overrides", nargs="*", help="key=value overrides")
    ds.add_argument("-n", type=int, default=5, help="examples to print (default 5)")
    ds.add_argument("--split", default="train", choices=["train", "validation", "test"])
    ds.add_argument("--ids", action="store_true", help="also print input_ids and labels")
    ds.set_defaults(func=cmd_data_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        _quiet_libraries()
        return args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"tunelab: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
