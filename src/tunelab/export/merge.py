"""A run's model as a transformers directory other tools load: a LoRA adapter folded into its base model
(``tunelab merge``, ``tunelab export --format hf``), a full run's model as it is, or a classification run as a
transformers *ForSequenceClassification (``tunelab export``). Each checks the output directory before the
model loads, and writes it atomically with tunelab's marker."""

from __future__ import annotations

import os
from pathlib import Path

from .. import atomic, ownership
from ..errors import TunelabError
from ..saved_files import write_use_files
from ..tasks import task_of
from ..train.rundir import input_paths, run_config


def merge_adapter(run: Path, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Fold a LoRA run's adapter into its base model and write it, with the tokenizer, the chat template the
    run trained with and the tokens it stops on (``saved_files``), as an HF directory."""
    cfg = run_config(run)
    if not task_of(cfg).by_generation:
        raise TunelabError("merging would drop the classification head: use tunelab export", str(run))
    if not (run / "adapter").is_dir():
        raise TunelabError("no adapter/ to merge (only LoRA runs have one; full runs already have model/)",
                           str(run))
    return export_hf(run, out_dir, force)


def export_hf(run: Path, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """A generation or chat run's model as one transformers directory: the adapter folded in (LoRA) or the
    trained model/ as it is, with the tokenizer, the chat template and generation_config.json."""
    cfg = run_config(run)
    out = ownership.free_out_dir(out_dir, force, [str(run), *input_paths(cfg)])
    ownership.check_not_locked(out)  # (again: the model took a while to load)
    atomic.write_dir(out, lambda d: write_merged(run, d), marker="merged model")
    return out


def write_merged(run: Path, d: Path) -> None:
    """Write a generation or chat run's model, merged, into the directory ``d``."""
    from ..models import load_trained

    cfg = run_config(run)
    if not task_of(cfg).by_generation:
        raise TunelabError("a classification run exports as a sequence-classification model (tunelab export "
                           "RUN OUT, without --format)", str(run))
    model, tok = load_trained(run, cfg.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # W = W0 + (alpha/r)·B·A folded into each target layer
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    adapter = run / "adapter"
    write_use_files(d, cfg, model, tok, saved=adapter if adapter.is_dir() else run / "model")


def export_classifier(run: Path, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Write a classification run as a transformers sequence-classification model."""
    from ..classify import export_sequence_classification
    from ..models import load_trained_classifier

    cfg = run_config(run)
    if task_of(cfg).by_generation:
        raise TunelabError("export writes a sequence-classification model; for a LoRA generation run use "
                           "tunelab merge", str(run))
    out = ownership.free_out_dir(out_dir, force, [str(run), *input_paths(cfg)])
    model, tok = load_trained_classifier(run, cfg.model)
    ownership.check_not_locked(out)
    atomic.write_dir(out, lambda d: export_sequence_classification(model, d, tok), marker="classifier export")
    return out
