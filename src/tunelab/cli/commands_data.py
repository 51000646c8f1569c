"""tunelab data show | recipes: the examples a recipe makes, and the recipes tunelab ships."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import TunelabError


def cmd_data_show(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.formats import marked
    from ..models import load_tokenizer
    from ..tasks import build_dataset

    cfg = load_config(args.recipe, args.overrides)
    tok = load_tokenizer(cfg.model)
    splits, stats, labels = build_dataset(cfg, tok)
    examples = splits[args.split]
    color = sys.stdout.isatty()
    if labels is not None:
        print(f"{args.split}: {len(examples)} examples, {len(labels)} classes: {', '.join(labels)}")
    else:
        print(f"{args.split}: {len(examples)} examples; supervised tokens are "
              + ("highlighted" if color else "inside ⟦ ⟧"))
    for e in examples[: args.n]:
        if labels is not None:
            print(f"--- {e.where} ({len(e.input_ids)} tokens) label {e.completion!r} (class {e.label})")
            print(tok.decode(e.input_ids))
        else:
            group = f" [{e.group}{', held out' if e.held_out else ''}]" if e.group else ""
            print(f"--- {e.where}{group} ({len(e.input_ids)} tokens, {e.n_supervised} supervised)")
            print(marked(tok, e.input_ids, e.labels, color))
        if args.ids:
            print("input_ids:", e.input_ids)
            if labels is None:
                print("labels:   ", e.labels)
    print_statistics(stats)
    return 0


def print_statistics(stats: dict) -> None:
    """The data statistics of ``data show``: per split, and the mixture or SNI tasks where there are any."""
    print("--- statistics")
    for split, st in stats.items():
        if split == "mixture":
            from ..data.instruct import mixture_table

            print(mixture_table(st))
            continue
        if split == "chat":
            from ..tasks.chat import chat_lines

            print("\n".join(chat_lines(st)))
            continue
        if split == "sni":
            print(f"tasks: trained on {st['train_tasks']}; held out {st['eval_tasks']}; encoding {st['encoding']}")
            continue
        print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in st.items()))


def recipes_dir() -> Path:
    # src/tunelab/cli/commands_data.py -> the repository root, where recipes/ is
    return Path(os.environ.get("TUNELAB_RECIPES") or Path(__file__).resolve().parents[3] / "recipes")


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    folder = recipes_dir()
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise TunelabError("no recipes found (set TUNELAB_RECIPES to the recipes folder)", str(folder))
    rows = []
    for f in files:
        try:
            meta = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            meta = None
        desc = meta.get("description", "") if isinstance(meta, dict) else ""
        rows.append((str(f.relative_to(Path.cwd())) if f.is_relative_to(Path.cwd()) else str(f), desc))
    width = max(len(name) for name, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0
