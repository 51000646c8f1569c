"""A grid of runs over recipe keys, run one after another, resumable, collected into one table.

``tunelab sweep RECIPE --over data.train_size=100,300,1000 --over model.init=pretrained,random`` runs
every combination as an ordinary ``tunelab train`` (a process of its own, so that each run's peak
memory and failures are its own) in ``OUT/<cell>/``. A cell whose ``eval.json`` exists is finished and
is not run again; a cell with checkpoints continues from them. The table (``sweep.md``, ``sweep.csv``,
``sweep.json``) holds each cell's values, its main metric, validation loss, trainable parameters, time
and peak memory; ``sweep.png`` plots the main metric against the first axis when matplotlib is there.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import atomic
from .errors import TunelabError

METRICS = ("exact_match", "accuracy")


def parse_axes(specs: list[str], allow_empty: bool = False) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` -> (key, [v1, v2]); each value stays text (the recipe override parser types it)."""
    from .config import _suggest, all_keys

    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise TunelabError(f"expected key=v1,v2,..., got {spec!r}", "--over")
        if key not in all_keys():
            raise TunelabError(f"unknown key {key}{_suggest(key)}", f"--over {spec}")
        vals = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in vals):
            raise TunelabError(f"empty value in the axis {key}", f"--over {spec}")
        if any(k == key for k, _ in axes):
            raise TunelabError(f"{key} is swept twice", f"--over {spec}")
        axes.append((key, vals))
    if not axes and not allow_empty:
        raise TunelabError("give at least one --over key=v1,v2,... (or --variant)", "sweep")
    return axes


VARIANT = "variant"


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME: key=value key=value`` -> {NAME: [overrides]}: named bundles of overrides, one axis."""
    import shlex

    from .config import _suggest, all_keys, parse_override

    variants: dict[str, list[str]] = {}
    for spec in specs:
        name, colon, rest = spec.partition(":")
        name = name.strip()
        if not colon or not name or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise TunelabError(f"expected NAME: key=value ..., with a name of letters, digits, . _ + -; got {spec!r}",
                               "--variant")
        if name in variants:
            raise TunelabError(f"variant {name} is given twice", f"--variant {spec}")
        try:
            items = shlex.split(rest)
        except ValueError as e:
            raise TunelabError(f"variant {name}: {e}", f"--variant {spec}") from None
        if not items:
            raise TunelabError(f"variant {name} sets nothing", f"--variant {spec}")
        for item in items:
            key, _ = parse_override(item)
            if key not in all_keys():
                raise TunelabError(f"unknown key {key}{_suggest(key)}", f"--variant {spec}")
        variants[name] = items
    return variants


def overrides_of(assign: list[tuple[str, str]], variants: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for k, v in assign:
        out += variants[v] if k == VARIANT else [f"{k}={v}"]
    return out


def cell_name(assign: list[tuple[str, str]]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in assign]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "__".join(parts))


def cells(axes: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    keys = [k for k, _ in axes]
    return [list(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def run_sweep(recipe: str, overrides: list[str], axes: list[tuple[str, list[str]]], out: Path,
              quiet: bool = False, variants: dict[str, list[str]] | None = None) -> list[dict]:
    """Every cell of the grid (the variants, if any, are its first axis), then the table."""
    from .config import load_config

    variants = variants or {}
    if variants:
        axes = [(VARIANT, list(variants)), *axes]
    grid = cells(axes)
    names = [cell_name(a) for a in grid]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TunelabError(f"two cells would share the directory {clash[0]}: give the variants distinct names",
                           "sweep")
    # every cell's configuration is checked before anything runs
    for assign in grid:
        load_config(recipe, [*overrides, *overrides_of(assign, variants), f"output.dir={out / cell_name(assign)}"])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, assign in enumerate(grid, 1):
        d = out / cell_name(assign)
        label = ", ".join(f"{k}={v}" for k, v in assign)
        cell_overrides = [*overrides, *overrides_of(assign, variants)]
        if (d / "cell.json").exists() and json.loads((d / "cell.json").read_text()) != cell_overrides:
            raise TunelabError(f"the cell {label} was run with other overrides "
                               f"({json.loads((d / 'cell.json').read_text())}): remove it, or sweep into another --out",
                               str(d))
        if (d / "eval.json").exists():
            print(f"[{i}/{len(grid)}] {label}: finished before", file=sys.stderr)
        else:
            print(f"[{i}/{len(grid)}] {label} -> {d}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "tunelab.cli", *(["--quiet"] if quiet else []), "train", recipe,
                   *overrides, *overrides_of(assign, variants), f"output.dir={d}"]
            if (d / "checkpoints").is_dir():
                cmd.append("--resume")
            proc = subprocess.run(cmd, env={**os.environ}, stderr=subprocess.PIPE, text=True)
            if d.is_dir() and not (d / "cell.json").exists():
                atomic.write_json(d / "cell.json", cell_overrides)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise TunelabError(f"the run {label} failed (exit {proc.returncode}): {last}; fix it and run the "
                                   "same sweep again: finished cells are kept", str(d))
        rows.append(collect(d, assign))
    write_table(out, axes, rows)
    return rows


def collect(d: Path, assign: list[tuple[str, str]]) -> dict:
    ev = json.loads((d / "eval.json").read_text())
    metric = next((m for m in METRICS if m in ev), None)
    return {**dict(assign), "run": d.name, "metric": metric, "value": ev.get(metric) if metric else None,
            "val_loss": ev.get("val_loss"), "trainable_parameters": ev.get("trainable_parameters"),
            "train_time_s": ev.get("train_time_s"), "peak_rss_mb": ev.get("peak_rss_mb")}


def write_table(out: Path, axes: list[tuple[str, list[str]]], rows: list[dict]) -> None:
    cols = [k for k, _ in axes] + ["metric", "value", "val_loss", "trainable_parameters", "train_time_s",
                                   "peak_rss_mb"]

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    atomic.write_text(out / "sweep.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(out / "sweep.csv", buf.getvalue())
    atomic.write_json(out / "sweep.json", {"axes": [{"key": k, "values": v} for k, v in axes], "rows": rows})
    print("\n".join(md))
    plot(out, axes, rows)


def plot(out: Path, axes: list[tuple[str, list[str]]], rows: list[dict]) -> None:
    """The main metric against the first axis, a line for each combination of the others."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    first = axes[0][0]
    others = [k for k, _ in axes[1:]]
    lines: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        if r["value"] is None:
            continue
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={r[k]}" for k in others) or r["metric"]
        lines.setdefault(name, []).append((r[first], r["value"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    numeric = all(_is_number(x) for pts in lines.values() for x, _ in pts)
    for name, pts in lines.items():
        xs = [float(x) for x, _ in pts] if numeric else [x for x, _ in pts]
        ax.plot(xs, [y for _, y in pts], marker="o", label=name)
    if numeric and all(float(x) > 0 for pts in lines.values() for x, _ in pts):
        ax.set_xscale("log")
    ax.set_xlabel(first)
    ax.set_ylabel(rows[0]["metric"] or "metric")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic.write_file(out / "sweep.png", lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False
