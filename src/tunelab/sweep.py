"""A grid of runs over recipe keys, run one after another, resumable, collected into one table.

``tunelab sweep RECIPE --over data.train_size=100,300,1000 --over model.init=pretrained,random`` runs
every combination as an ordinary ``tunelab train`` (a process of its own, so that each run's peak
memory and failures are its own) in ``OUT/<cell>/``. A cell whose ``eval.json`` exists is finished and
is not run again; a stopped cell continues from its last checkpoint (afresh if it wrote none). A cell
directory whose ``config.yaml`` disagrees with this sweep's configuration of the cell (other overrides, an
edited recipe) is an error, never taken for this sweep's result. The table (``sweep.md``, ``sweep.csv``,
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

from . import atomic, ownership
from .errors import TunelabError

METRICS = ("exact_match", "accuracy")


def split_values(text: str) -> list[str]:
    """``v1,v2,...`` at its top-level commas: a comma inside brackets or braces (a YAML list or mapping:
    ``[q_proj,v_proj]``) or inside quotes (``"Reverse, please: {name}"``) stays in its value."""
    out: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_axes(specs: list[str], allow_empty: bool = False) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` -> (key, [v1, v2]); each value stays text (the recipe override parser types it).
    Values split at top-level commas only (see split_values)."""
    from .config import all_keys, suggest

    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        if not eq or not key:
            raise TunelabError(f"expected key=v1,v2,..., got {spec!r}", "--over")
        if key not in all_keys():
            raise TunelabError(f"unknown key {key}{suggest(key)}", f"--over {spec}")
        vals = split_values(values)
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

    from .config import all_keys, parse_override, suggest

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
                raise TunelabError(f"unknown key {key}{suggest(key)}", f"--variant {spec}")
        variants[name] = items
    return variants


def overrides_of(assign: list[tuple[str, str]], variants: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for k, v in assign:
        out += variants[v] if k == VARIANT else [f"{k}={v}"]
    return out


MAX_CELL_NAME = 96  # characters of a cell's directory name (file systems allow 255 bytes)


def cell_name(assign: list[tuple[str, str]]) -> str:
    """The cell's directory: its values, made safe; a long one is cut and told apart by a hash of the whole."""
    parts = [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in assign]
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", "__".join(parts)).strip(".") or "cell"
    if len(name) > MAX_CELL_NAME:
        import hashlib

        digest = hashlib.sha256(json.dumps(assign).encode()).hexdigest()[:10]
        name = f"{name[:MAX_CELL_NAME - 11]}-{digest}"
    return name


IGNORED_KEYS = ("name", "output.dir", "output.overwrite", "train.resume")  # do not change what a cell computes


def settings(cfg_dict: dict) -> dict:
    """A configuration (as a dict) flattened, as JSON would give it back, less what names or places the run."""
    from .config import flatten

    flat = json.loads(json.dumps(flatten(cfg_dict)))
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS}


def check_cell(d: Path, label: str, want: dict) -> None:
    """A cell directory already there must hold the same run: its config.yaml (written when the run starts)
    agrees with this sweep's configuration of the cell on every key the two share."""
    import yaml

    saved = d / "config.yaml"
    if not saved.is_file():
        return
    have = settings(yaml.safe_load(saved.read_text()) or {})
    diff = [f"{k}: {have[k]!r} there, {want[k]!r} here" for k in sorted(have.keys() & want.keys())
            if have[k] != want[k]]
    if diff:
        shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise TunelabError(f"the cell {label} was run with other settings ({shown}): remove it, or sweep into "
                           "another --out", str(d))


def cells(axes: list[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    keys = [k for k, _ in axes]
    return [list(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def run_sweep(recipe: str, overrides: list[str], axes: list[tuple[str, list[str]]], out: Path,
              quiet: bool = False, variants: dict[str, list[str]] | None = None) -> list[dict]:
    """Every cell of the grid (the variants, if any, are its first axis), then the table."""
    from .config import load_config
    from .train.rundir import input_paths

    variants = variants or {}
    if variants:
        axes = [(VARIANT, list(variants)), *axes]
    grid = cells(axes)
    names = [cell_name(a) for a in grid]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TunelabError(f"two cells would share the directory {clash[0]}: give the variants distinct names",
                           "sweep")
    from .config import parse_override

    swept = {k for k, _ in axes if k != VARIANT}
    for name, items in variants.items():
        both = sorted(swept & {parse_override(item)[0] for item in items})
        if both:
            raise TunelabError(f"{both[0]} is set by the variant {name} and swept by --over: one of them would "
                               "be lost", f"--variant {name}")
    if out.exists() and not out.is_dir():
        raise TunelabError("--out is a file, not a directory", str(out))
    # every cell's configuration is checked before anything runs
    cfgs = [load_config(recipe, [*overrides, *overrides_of(assign, variants), f"output.dir={out / cell_name(assign)}"])
            for assign in grid]
    check_sweep_dir(out, [recipe, *(p for cfg in cfgs for p in input_paths(cfg))])
    wanted = [settings(cfg.to_dict()) for cfg in cfgs]
    for assign, want in zip(grid, wanted):
        check_cell(out / cell_name(assign), ", ".join(f"{k}={v}" for k, v in assign), want)
    out.mkdir(parents=True, exist_ok=True)
    if not ownership.is_marked(out):
        ownership.mark(out, "sweep")
    rows = []
    for i, assign in enumerate(grid, 1):
        d = out / cell_name(assign)
        label = ", ".join(f"{k}={v}" for k, v in assign)
        if (d / "eval.json").exists():
            print(f"[{i}/{len(grid)}] {label}: finished before", file=sys.stderr)
        else:
            print(f"[{i}/{len(grid)}] {label} -> {d}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "tunelab.cli", *(["--quiet"] if quiet else []), "train", recipe,
                   *overrides, *overrides_of(assign, variants), f"output.dir={d}"]
            if d.is_dir():  # a stopped cell: its last checkpoint, or afresh if it never wrote one
                cmd.append("--resume")
            proc = subprocess.run(cmd, env={**os.environ}, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise TunelabError(f"the run {label} failed (exit {proc.returncode}): {last}; fix it and run the "
                                   "same sweep again: finished cells are kept", str(d))
        rows.append(collect(d, assign))
    write_table(out, axes, rows)
    return rows


TABLES = ("sweep.md", "sweep.csv", "sweep.json", "sweep.png")


def check_sweep_dir(out: Path, inputs: list[str]) -> None:
    """The sweep's directory is not what it reads, and its tables replace only a sweep's own (a directory
    tunelab marked, or one holding nothing but the cells' run directories and the tables)."""
    ownership.check_not_input(out, inputs, "--out")
    if not out.is_dir() or ownership.is_marked(out):
        return
    entries = [p for p in out.iterdir() if p.name != ownership.LOCK]
    cells = [p for p in entries if p.is_dir() and (p / "config.yaml").exists()]
    a_sweep = bool(cells) and all(p.name in TABLES or p in cells for p in entries)  # (written before the marker)
    tables = [p.name for p in entries if p.name in TABLES]
    if tables and not a_sweep:
        raise TunelabError(f"holds {tables[0]}, which tunelab did not write (the directory holds other files): "
                           "choose another --out", str(out))


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
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

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
