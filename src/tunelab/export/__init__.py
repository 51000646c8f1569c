"""A run's model in the forms other tools load (``tunelab export``, ``tunelab merge``):

- ``hf``: one transformers directory, LoRA folded in, with the tokenizer, the chat template and a
  generation_config.json that stops at the end of a turn (transformers, vLLM, TGI) — ``merge``;
- ``gguf``: one GGUF file for llama.cpp and LM Studio — ``gguf_file``;
- ``ollama``: that GGUF file with a Modelfile whose template, stop token and system prompt are the run's —
  ``ollama``;
- a classification run: a transformers *ForSequenceClassification directory — ``merge.export_classifier``.

Outputs are checked before the model loads and written atomically; an existing one is replaced only with
``force`` (and a directory only when tunelab made it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from .. import atomic, ownership
from ..errors import TunelabError
from ..tasks import ChatTask, task_of
from ..train.rundir import input_paths, run_config
from .gguf_file import QUANTS, write_gguf
from .merge import export_classifier, export_hf, merge_adapter, write_merged

__all__ = ["FORMATS", "QUANTS", "export_classifier", "export_hf", "export_run", "merge_adapter", "write_gguf"]

Format = Literal["hf", "gguf", "ollama"]
FORMATS = ("hf", "gguf", "ollama")
GGUF_NAME = "model.gguf"


def export_run(run: Path, out: str | os.PathLike, fmt: Format | None = None, quant: str = "f16",
               force: bool = False) -> Path:
    """Export a run (``fmt`` None: a classification run's sequence-classification model, else ``hf``)."""
    run = Path(run)
    cfg = run_config(run)
    task = task_of(cfg)
    if not task.by_generation:
        if fmt is not None:
            raise TunelabError(f"a classification run exports as a sequence-classification model (tunelab export "
                               f"RUN OUT, without --format); {fmt} is for generation and chat runs", str(run))
        return export_classifier(run, out, force)
    if quant not in QUANTS:
        raise TunelabError(f"unknown quantization {quant!r}: {', '.join(QUANTS)}", "--quant")
    if fmt in (None, "hf"):
        return export_hf(run, out, force)
    if fmt == "ollama" and not isinstance(task, ChatTask):
        raise TunelabError("an Ollama model needs a chat template, and this generation run has none: export "
                           "--format gguf and prompt it as it was trained (llama.cpp's completion), or train a "
                           "chat run (task: chat)", str(run))
    inputs = [str(run), *input_paths(cfg)]
    if fmt == "gguf":
        target = ownership.output_file(out, force, inputs)
        if target.suffix != ".gguf":
            raise TunelabError("a GGUF export is one file: give a path ending in .gguf", str(target))
        with tempfile.TemporaryDirectory(prefix=".tunelab-export-", dir=target.parent) as tmp:
            merged = Path(tmp) / "hf"
            merged.mkdir()
            write_merged(run, merged)
            atomic.write_file(target, lambda p: write_gguf(merged, p, quant, run.name, _turn_ends(merged)))
        return target
    target = ownership.free_out_dir(out, force, inputs)
    ownership.check_not_locked(target)
    atomic.write_dir(target, lambda d: _write_ollama(run, cfg, d, quant), marker="ollama export")
    return target


def _turn_ends(merged: Path) -> list[int]:
    """The ids generation stops on (generation_config.json's eos_token_id, which saved_files wrote)."""
    gen = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
    ids = gen.get("eos_token_id")
    return ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []


def _write_ollama(run: Path, cfg: Any, d: Path, quant: str) -> None:
    from transformers import AutoTokenizer

    from ..data import chat
    from . import ollama

    merged = d / ".hf"
    merged.mkdir()
    write_merged(run, merged)
    tok = AutoTokenizer.from_pretrained(merged)
    tmpl = chat.resolve_template("model", tok, cfg.chat.stop)
    wrappers = ollama.wrappers(tmpl, tok)
    ollama.check_wrappers(wrappers, tmpl, tok)
    ends = _turn_ends(merged)
    stops = [str(tok.convert_ids_to_tokens(int(i))) for i in ends]
    _, system = task_of(cfg).chat_defaults(cfg)  # the run's default system prompt (none with system_mode: none)
    write_gguf(merged, d / GGUF_NAME, quant, run.name, ends)
    (d / "Modelfile").write_text(ollama.modelfile(wrappers, stops, system, GGUF_NAME), encoding="utf-8")
    (d / "README.md").write_text(
        f"# {run.name} for Ollama\n\nExported by tunelab from {run} ({quant}).\n\n"
        "```bash\nollama create NAME -f Modelfile\nollama run NAME\n```\n", encoding="utf-8")
    shutil.rmtree(merged)
