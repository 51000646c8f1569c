"""tunelab: fine-tune pre-trained language models and see what fine-tuning does."""

# The subpackage tunelab.train and the module tunelab.report share their names with the functions below:
# loading them first (both are light) keeps a later import from rebinding tunelab.train / tunelab.report.
from . import report as _report_module  # noqa: F401
from . import train as _train_package  # noqa: F401
from .config import Config, load_config
from .errors import TunelabError

__version__ = "0.1.0"


def train(cfg: Config, resume: bool = False, quiet: bool = False):
    """Run a recipe end to end (see tunelab.train.loop.train); returns the run directory."""
    from .train.loop import train as _train

    return _train(cfg, resume=resume, quiet=quiet)


def results(run_dir) -> dict:
    """A finished run's evaluation: eval.json, with ``before`` (the base model's, with its samples) and
    ``predictions`` (the fine-tuned model's outputs on the held-out examples)."""
    import json
    from pathlib import Path

    run = Path(run_dir)
    if not (run / "eval.json").exists():
        raise TunelabError("no eval.json: the run has not finished", str(run))
    out = json.loads((run / "eval.json").read_text())
    if (run / "before.json").exists():
        out["before"] = json.loads((run / "before.json").read_text())
    preds = run / "predictions.jsonl"
    out["predictions"] = [json.loads(x) for x in preds.read_text().splitlines()] if preds.exists() else []
    return out


def examples(cfg: Config, split: str = "train", n: int = 5) -> list[str]:
    """The first n tokenized examples of a split as text, the tokens that carry loss inside ⟦ ⟧."""
    from .data.formats import marked
    from .models import load_tokenizer
    from .tasks import build_dataset

    tok = load_tokenizer(cfg.model)
    splits, _, _ = build_dataset(cfg, tok)
    return [marked(tok, e.input_ids, e.labels) for e in splits[split][:n]]


def report(*run_dirs, out=None):
    """Write a run's report.html (or, for several runs, one page comparing them); returns its path."""
    from pathlib import Path

    from .report import write_compare, write_report

    runs = [Path(r) for r in run_dirs]
    if len(runs) == 1 and out is None:
        return write_report(runs[0])
    return write_compare(runs, Path(out or "runs/compare.html"))


def student(teacher, out_dir, keep_every: int | None = None, layers: list[int] | None = None):
    """A smaller student cut from a teacher's decoder layers (as ``tunelab student``, replacing out_dir when
    tunelab made it); returns out_dir. See tunelab.teacher.cut_student."""
    import sys

    from .errors import one_line
    from .teacher import cut_student

    try:  # keep_every wins over layers, as it always has
        cut = cut_student(teacher, out_dir, keep_every=keep_every or None,
                          layers=None if keep_every else list(layers or []), force=True)
    except OSError as e:  # what the system refused: a TunelabError, as every failure here
        raise TunelabError(e.strerror or one_line(e), str(e.filename or out_dir)) from e
    print(cut.summary(), file=sys.stderr)
    return out_dir


__all__ = ["Config", "TunelabError", "examples", "load_config", "report", "results", "student", "train",
           "__version__"]
