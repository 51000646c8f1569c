"""What a saved model carries besides its weights and tokenizer, so that other tools use it as it was trained.

A generation or chat run's adapter/ or model/, and the model ``tunelab merge`` writes, hold:

- ``chat_template.jinja`` (chat runs): the template the run rendered its conversations with, written by the
  tokenizer's ``save_pretrained`` (transformers 5 writes a tokenizer's template to that file, not into
  tokenizer_config.json). A base tokenizer trained with ``chat.template: chatml`` or a .jinja file has no
  template of its own: without this file ``apply_chat_template`` fails or renders another one.
- ``generation_config.json``: the model's own, with ``eos_token_id`` a list of every token the run stops on
  (the model's EOS, the tokenizer's, a chat template's end-of-turn token). transformers' ``generate`` and
  vLLM read it: without ``<|im_end|>`` there, they run past the end of a turn.

Classification runs save none of these (their export writes its own tokenizer: ``classify``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from .config import Config
from .data import chat
from .errors import TunelabError
from .tasks import ChatTask, task_of

log = logging.getLogger("tunelab")
TEMPLATE_FILE = "chat_template.jinja"  # (transformers' name for it)


def write_use_files(out_dir: Path, cfg: Config, model, tok, saved: Path | None = None) -> None:
    """Into ``out_dir``, where the weights and ``tok`` are already saved: the run's chat template (a chat run)
    and generation_config.json (the model's own, ``eos_token_id`` extended with the tokens the run stops on).

    ``saved``: the run's adapter/ when a merge writes the model; a template the run read from a .jinja file is
    then the copy saved there at training (the file may have changed or gone since). A run saved before
    tunelab kept one, whose file is gone, is merged without its template (a warning)."""
    from transformers import GenerationConfig

    task = task_of(cfg)
    if not task.by_generation:
        return
    is_chat = isinstance(task, ChatTask)
    kept = saved / TEMPLATE_FILE if saved is not None else None
    if is_chat and kept is not None and kept.is_file() and cfg.chat.template not in (
            "auto", "model", *chat.SHIPPED):
        cfg = dataclasses.replace(cfg, chat=dataclasses.replace(cfg.chat, template=str(kept)))
    try:
        stops = task.stop_ids(cfg, tok)
        source = chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop).source if is_chat else None
    except TunelabError as e:
        if saved is None:  # (training resolved the template already: only an old run's merge gets here)
            raise
        log.warning("%s: the merged model carries no chat template", e)
        stops, source = [], None
    own = tok.chat_template
    if source is not None and source != (own.get("default") if isinstance(own, dict) else own):
        # (the tokenizer's own template(s) are saved already; another is set for this save only: the run's
        # tokenizer decides what chat.template=auto means)
        tok.chat_template = source
        try:
            tok.save_pretrained(out_dir)
        finally:
            tok.chat_template = own
    gen = getattr(model, "generation_config", None)
    gen = copy.deepcopy(gen) if gen is not None else GenerationConfig.from_model_config(model.config)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = [i for i in dict.fromkeys([*eos, tok.eos_token_id, *stops]) if isinstance(i, int)]
    # (not gen.save_pretrained: it refuses a changed config that its checks only warn about in the model's own,
    # such as a published config's temperature without do_sample)
    gen.to_json_file(Path(out_dir) / "generation_config.json", use_diff=True)
