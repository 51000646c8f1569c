"""tunelab train | eval | sweep | report: training runs, their evaluation, grids of them, their pages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import atomic
from ..errors import TunelabError
from ..ownership import output_file


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..train.loop import train

    cfg = load_config(args.recipe, args.overrides)
    train(cfg, resume=args.resume, quiet=args.quiet, recipe=args.recipe)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_target, target_config, target_record, target_tables
    from ..train.rundir import input_paths

    target = Path(args.target)
    cfg = target_config(target, args.overrides)
    if args.out:  # a bad --out is found before evaluating, not after
        output_file(args.out, force=args.force, inputs=[str(target), *input_paths(cfg)])
    ev = evaluate_target(target, cfg, base=args.base, quiet=args.quiet)
    for part in target_tables(ev, cfg.eval.show):
        print(part)
    record = target_record(ev)
    print(json.dumps(record))
    if args.out:
        atomic.write_json(Path(args.out), record)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import parse_axes, parse_variants, run_sweep

    variants = parse_variants(args.variant)
    axes = parse_axes(args.over, allow_empty=bool(variants))
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.recipe).stem}"
    run_sweep(args.recipe, args.overrides, axes, out, quiet=args.quiet, variants=variants)
    print(f"sweep table: {out / 'sweep.md'}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import is_report, write_compare, write_report

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "config.yaml").exists():
            raise TunelabError("not a run directory (no config.yaml)", str(r))
    if len(runs) == 1 and not args.out:
        print(write_report(runs[0]))
        return 0
    spec = args.out or "runs/compare.html"
    out = output_file(spec, force=args.force or is_report(Path(spec)), inputs=[str(r) for r in runs])
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_compare(runs, out))
    return 0
