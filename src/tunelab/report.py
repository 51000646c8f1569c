"""report.html: one self-contained page per run (or several runs side by side), viewable offline.

Everything is read from the run directory (config.yaml, data_stats.json, data_samples.json,
metrics.jsonl, before.json, eval.json, predictions.jsonl, mixture.json), so a report can be rebuilt
at any time with ``tunelab report RUN_DIR``. Plots are inline SVG drawn here: no JavaScript, no
network, no plotting library.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from . import atomic
from .config import flatten, read_yaml
from .data.types import IGNORE
from .errors import TunelabError, one_line

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:.92em}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:.85em}.sup{background:#c8f0c8}
.ok{color:#1a7f37}.bad{color:#c62828}.plots{display:flex;flex-wrap:wrap;gap:12px}.muted{color:#777}
svg{background:#fff;border:1px solid #e5e5e5}
"""


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if 0 <= v <= 1 and not v.is_integer():
            return f"{v:.4f}"
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="num">{esc(fmt(c))}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
            else f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str = "step",
               width: int = 520, height: int = 300, log_y: bool = False) -> str:
    """An SVG line chart: one polyline a series, axes with a few ticks, a legend."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return ""
    left, right, top, bottom = 60, 16, 28, 40
    xs, ys = [p[0] for p in pts], [math.log10(p[1]) if log_y else p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = (max(y0 - pad, 0.0) if y0 >= 0 and not log_y else y0 - pad), y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}" class="chart">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{esc(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        label = 10 ** yv if log_y else yv
        parts.append(f'<line x1="{left - 4}" y1="{sy(yv):.1f}" x2="{width - right}" y2="{sy(yv):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{_tick(label)}</text>')
        xv = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                     f'font-size="11">{_tick(xv)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="12">{esc(xlabel)}</text>')
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        good = [(x, math.log10(y) if log_y else y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if not good:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        if len(good) == 1:
            parts.append(f'<circle cx="{sx(good[0][0]):.1f}" cy="{sy(good[0][1]):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        if len(series) > 1:
            ly = top + 14 * i + 6
            parts.append(f'<rect x="{width - right - 150}" y="{ly - 8}" width="10" height="10" fill="{color}"/>')
            parts.append(f'<text x="{width - right - 136}" y="{ly + 1}" font-size="11">{esc(name[:22])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tick(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10 or v == 0:
        return f"{v:.0f}" if float(v).is_integer() or a >= 100 else f"{v:.1f}"
    return f"{v:.3g}"


def smooth(points: list[tuple[float, float]], k: int) -> list[tuple[float, float]]:
    """A trailing mean over k points (the raw per-step loss is noisy)."""
    out, acc = [], []
    for x, y in points:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append((x, sum(acc) / len(acc)))
    return out


def _read_json(path: Path, kind: type = dict) -> Any:
    """A run's JSON file (None where it has none); a file that is not what the run writes is one line."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TunelabError(f"not valid JSON ({one_line(e)[:120]}): a run writes it; remove it or rerun the "
                           "command that wrote it", str(path)) from None
    if not isinstance(obj, kind):
        raise TunelabError(f"expected a JSON {'object' if kind is dict else 'list'}, got {type(obj).__name__}",
                           str(path))
    return obj


def _lines(path: Path, keep_all: bool = False) -> Any:
    """A run's text file as lines (as one text with ``keep_all``); absent: none."""
    if not path.exists():
        return "" if keep_all else []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TunelabError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(path)) from None
    return text if keep_all else [x for x in text.splitlines() if x.strip()]


def load_run(run: Path) -> dict[str, Any]:

    if not (run / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", str(run))
    metrics = []
    for line in _lines(run / "metrics.jsonl"):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut by a crash
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            metrics.append({k: v for k, v in rec.items()
                            if k == "step" or not isinstance(v, (int, float)) or math.isfinite(v)})
    preds = []
    for line in _lines(run / "predictions.jsonl")[:50]:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            preds.append(rec)
    config_text = _lines(run / "config.yaml", keep_all=True)
    config = read_yaml(config_text, str(run / "config.yaml"))
    if not isinstance(config, dict):
        raise TunelabError("expected a mapping of sections", str(run / "config.yaml"))
    return {"dir": run, "config": config, "config_text": config_text, "metrics": metrics,
            "eval": _read_json(run / "eval.json"), "before": _read_json(run / "before.json"),
            "stats": _read_json(run / "data_stats.json"), "samples": _read_json(run / "data_samples.json", list),
            "predictions": preds}


def curves(runs: list[dict[str, Any]]) -> str:
    """Training loss (smoothed), learning rate and gradient norm; validation metrics over steps."""
    charts = []
    label = dict(zip((id(r) for r in runs), run_labels([r["dir"] for r in runs])))
    for key, title, log_y in (("loss", "training loss (smoothed)", True), ("lr", "learning rate", False),
                              ("grad_norm", "gradient norm", True), ("val_loss", "validation loss", False),
                              ("exact_match", "exact match (held out)", False),
                              ("accuracy", "accuracy (held out)", False), ("tokens_per_s", "tokens/s", False)):
        series = {}
        for r in runs:
            pts = [(m["step"], float(m[key])) for m in r["metrics"] if key in m and m[key] is not None]
            if key == "loss":
                pts = smooth(pts, max(1, len(pts) // 50))
            if pts:
                series[label[id(r)]] = pts
        if series:
            charts.append(line_chart(series, title, log_y=log_y))
    return '<div class="plots">' + "".join(charts) + "</div>" if charts else '<p class="muted">no metrics yet</p>'


def summary_rows(r: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    ev, before = r["eval"] or {}, r["before"] or (r["eval"] or {}).get("before") or {}
    rows = []
    for k in ("exact_match", "held_out_exact_match", "seen_exact_match", "accuracy", "macro_f1", "rouge_l",
              "val_loss", "test_loss"):
        if k in ev:
            rows.append((k, before.get(k), ev[k]))
    toks = [m["tokens_per_s"] for m in r["metrics"] if "tokens_per_s" in m]
    for k, v in (("steps", ev.get("steps")), ("train time (s)", ev.get("train_time_s")),
                 ("total time (s)", ev.get("total_time_s")),
                 ("tokens/s (mean)", round(sum(toks) / len(toks), 1) if toks else None),
                 ("trainable parameters", ev.get("trainable_parameters")),
                 ("total parameters", ev.get("total_parameters")), ("peak memory RSS (MB)", ev.get("peak_rss_mb")),
                 ("peak CUDA memory (MB)", ev.get("peak_cuda_mb")), ("best step", ev.get("best_step")),
                 ("stopped early at", ev.get("stopped_early_at")), ("skipped steps", ev.get("skipped_steps"))):
        if v is not None:
            rows.append((k, None, v))
    return rows


def _samples_html(samples: list[dict] | None) -> str:
    if not samples:
        return ""
    out = []
    for s in samples:
        body = "".join(f'<span class="sup">{esc(t)}</span>' if sup else esc(t) for t, sup in s["segments"])
        out.append(f'<p class="muted">{esc(s["where"])}</p><pre class="example">{body}</pre>')
    return "<h3>examples (supervised tokens highlighted)</h3>" + "".join(out)


def _data_html(stats: dict | None, samples: list | None) -> str:
    if not stats:
        return ""
    rows = []
    for split in ("train", "validation", "test"):
        st = stats.get(split)
        if not st:
            continue
        share = st["supervised_tokens"] / st["tokens"] if st.get("tokens") else 0.0
        rows.append([split, st["examples"], st["tokens"], st["supervised_tokens"], round(share, 4),
                     st["length_mean"], st["length_median"], st["length_max"], st.get("dropped_too_long", 0)])
    out = "<h2>data</h2>" + table(["split", "examples", "tokens", "supervised", "supervised share", "mean length",
                                   "median", "max", "dropped (too long)"], rows)
    if "mixture" in stats:
        mix = stats["mixture"]
        out += "<h3>mixture</h3>" + table(["task", "examples", "share", "templates", "held-out templates"], [
            [k + (" (held-out task)" if v["held_out_task"] else ""), v["examples"], v["share"],
             len(v["templates"]), ", ".join(v["held_out_templates"])] for k, v in mix["tasks"].items()])
    if "sni" in stats:
        out += "<h3>tasks</h3>" + table(["task", "instances", "role"], [
            *([k, v, "trained"] for k, v in stats["sni"]["train_tasks"].items()),
            *([k, v, "held out"] for k, v in stats["sni"]["eval_tasks"].items())])
    return out + _samples_html(samples)


def _eval_html(r: dict[str, Any]) -> str:
    ev = r["eval"]
    if not ev:
        return '<h2>evaluation</h2><p class="muted">the run has not finished: no eval.json yet</p>'
    before = r["before"] or {}
    out = ["<h2>before and after fine-tuning</h2>"]
    preds = r["predictions"]
    if preds:
        bsamples = {s.get("prompt"): s for s in before.get("samples", [])}
        rows = []
        for p in preds[:20]:
            b = bsamples.get(p.get("prompt"))
            rows.append([p.get("input", p.get("prompt")), p["expected"].strip(), b["output"].strip() if b else "",
                         p["output"].strip(), "✓" if p["correct"] else "✗"])
        out.append(table(["input", "expected", "before", "after", ""], rows, "samples"))
    if "by_task" in ev:
        bt = before.get("by_task", {})
        rows = []
        for task, res in ev["by_task"].items():
            for t, c in res["templates"].items():
                was = bt.get(task, {}).get("templates", {}).get(t, {}).get("exact_match")
                rows.append([f"{task}/{t}", "held out" if c["held_out"] else "trained", c["n"], was,
                             c["exact_match"]])
        out.append("<h3>exact match per task and template</h3>" + table(
            ["task/template", "", "items", "before", "after"], rows))
    if "variations" in ev:
        bv = before.get("variations", {}).get("templates", {})
        rows = [[t, "held out" if c["held_out"] else "trained", bv.get(t, {}).get("exact_match"), c["exact_match"]]
                for t, c in ev["variations"]["templates"].items()]
        rows += [["mean", "", before.get("variations", {}).get("mean"), ev["variations"]["mean"]],
                 ["worst", "", before.get("variations", {}).get("worst"), ev["variations"]["worst"]]]
        out.append("<h3>robustness to prompt variations</h3>" + table(["variation", "", "before", "after"], rows))
    if "control" in ev:
        bc = before.get("control", {})
        rows = [[k, bc.get("by_kind", {}).get(k), v] for k, v in ev["control"]["by_kind"].items()]
        rows.append(["all", bc.get("score"), ev["control"]["score"]])
        out.append("<h3>control set: what else changed</h3>" + table(["kind", "before", "after"], rows))
    if "confusion" in ev:
        labels = ev["labels"]
        out.append("<h3>confusion matrix (rows: true class, columns: predicted)</h3>" + table(
            ["", *labels], [[lab, *row] for lab, row in zip(labels, ev["confusion"])]))
    return "".join(out)


def _kd_html(cfg: dict) -> str:
    kd = cfg.get("kd") or {}
    if not kd.get("teacher"):
        return ""
    rows = [[k, kd[k]] for k in ("teacher", "alpha", "temperature", "divergence", "top_k", "cache") if k in kd]
    return "<h2>distillation</h2>" + table(["setting", "value"], rows)


_LAYOUT_ERRORS = (TypeError, KeyError, AttributeError, ValueError, IndexError)


def _laid_out(runs: list[Path], render: Any) -> str:
    """render(), with a run file that parses but is not laid out as tunelab writes it made one line."""
    try:
        return render()
    except TunelabError:
        raise
    except _LAYOUT_ERRORS as e:
        where = ", ".join(str(r) for r in runs)
        raise TunelabError(f"a file of the run is not laid out as tunelab writes it ({type(e).__name__}: "
                           f"{one_line(e)[:100]}): rerun the command that wrote it", where) from None


def render_run(run: Path) -> str:
    return _laid_out([run], lambda: _render_run(run))


def _render_run(run: Path) -> str:
    r = load_run(run)
    cfg = r["config"]
    rows = [[k, b, a] for k, b, a in summary_rows(r)]
    title = f"{cfg.get('name', run.name)} — tunelab report"
    body = [f"<h1>{esc(cfg.get('name', run.name))}</h1>",
            f'<p class="muted">{esc(cfg.get("description", ""))} · task {esc(cfg.get("task"))} · model '
            f'{esc(cfg.get("model", {}).get("name"))} · train.mode {esc(cfg.get("train", {}).get("mode"))}</p>',
            "<h2>summary</h2>", table(["", "before", "after"], rows, "summary"),
            "<h2>training curves</h2>", curves([r]), _eval_html(r), _kd_html(cfg),
            _data_html(r["stats"], r["samples"]),
            "<h2>configuration</h2>", f'<pre class="config">{esc(r["config_text"])}</pre>']
    return page(title, "".join(body))


def run_labels(dirs: list[Path]) -> list[str]:
    """A name for each run: its directory's name, or as many of its path's last parts as tell it from the
    others (a/run, b/run); the same directory given twice is numbered."""
    parts = [Path(os.path.abspath(d)).parts for d in dirs]
    labels = []
    for p in parts:
        k = 1
        while k < len(p) and any(q != p and q[-k:] == p[-k:] for q in parts):
            k += 1
        labels.append(str(Path(*p[-k:])))
    return [f"{x} #{labels[:i + 1].count(x)}" if labels.count(x) > 1 else x for i, x in enumerate(labels)]


def render_compare(runs: list[Path]) -> str:
    return _laid_out(runs, lambda: _render_compare(runs))


def _render_compare(runs: list[Path]) -> str:
    loaded = [load_run(r) for r in runs]
    names = run_labels([r["dir"] for r in loaded])
    keys: list[str] = []
    for r in loaded:
        for k, _, _ in summary_rows(r):
            if k not in keys:
                keys.append(k)
    values = [{k: a for k, _, a in summary_rows(r)} for r in loaded]
    rows = [[k, *(v.get(k) for v in values)] for k in keys]
    diff = _config_diff([r["config"] for r in loaded])
    body = ["<h1>runs side by side</h1>", "<h2>summary</h2>",
            table(["", *names], rows, "summary"),
            "<h2>training curves</h2>", curves(loaded)]
    if diff:
        body += ["<h2>what differs in the configurations</h2>",
                 table(["key", *names], diff)]
    return page("tunelab: runs compared", "".join(body))


def _config_diff(cfgs: list[dict]) -> list[list[Any]]:
    flat = [flatten(c) for c in cfgs]
    keys = sorted(set().union(*flat))
    return [[k, *(json.dumps(f.get(k)) for f in flat)] for k in keys
            if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


FOOTER = '<p class="muted">written by tunelab · self-contained: no scripts, no network</p>'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}{FOOTER}</body></html>\n")


def write_report(run: Path) -> Path:
    atomic.write_text(run / "report.html", render_run(run))
    return run / "report.html"


def write_compare(runs: list[Path], out: Path) -> Path:
    atomic.write_text(out, render_compare(runs))
    return out


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page this module wrote (``tunelab report`` replaces one without --force)."""
    try:
        if not path.is_file():  # (a FIFO is never opened: it would block)
            return False
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 400))
            return FOOTER.encode() in f.read()
    except OSError:
        return False


def data_samples(examples: list, tok, n: int = 3) -> list[dict[str, Any]]:
    """The first training examples as (text, supervised) segments, for the report."""
    out = []
    for e in examples[:n]:
        segs: list[list[Any]] = []
        for tid, lab in zip(e.input_ids, e.labels):
            sup = lab != IGNORE
            if segs and segs[-1][1] == sup:
                segs[-1][0].append(tid)
            else:
                segs.append([[tid], sup])
        out.append({"where": e.where, "segments": [[tok.decode(ids), sup] for ids, sup in segs]})
    return out
