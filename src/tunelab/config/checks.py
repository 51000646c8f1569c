"""Cross-field rules that types alone cannot express: pure functions over a built config."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..data.templates import check_template, fields_of
from ..errors import TunelabError
from .keys import SEED_KEYS, SEED_LIMIT, SOURCE_KEYS
from .messages import Located
from .schema import Config

Need = Callable[[bool, str, str], None]


def check(cfg: Config, loc: Located) -> None:
    """Cross-field rules that types alone cannot express: the first one broken is a TunelabError at the key's
    location (recipe file and line, or the override). Nothing in ``cfg`` is changed."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise TunelabError(f"{key}: {msg}", loc.of(key))

    _train(cfg, need, loc)
    _lora(cfg, need, loc)
    _data(cfg, need, loc)
    _task(cfg, need, loc)
    _kd_and_mixtures(cfg, need, loc)
    _eval(cfg, need, loc)


def _train(cfg: Config, need: Need, loc: Located) -> None:
    """Optimisation, schedule, checkpoints, seeds and the run's name."""
    t = cfg.train
    need(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(t.epochs >= 1, "train.epochs", "must be at least 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1")
    need(t.lr > 0, "train.lr", "must be positive")
    need(math.isfinite(t.lr), "train.lr", "must be finite")
    need(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be non-negative")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "must be positive")
    need(t.dropout is None or 0 <= t.dropout < 1, "train.dropout", "must be in [0, 1)")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    need(t.loss_chunk >= 1, "train.loss_chunk", "must be at least 1")
    need(t.pack_length >= 2, "train.pack_length", "must be at least 2")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")  # AdamW's own bounds
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    need(t.adam_eps >= 0, "train.adam_eps", "must be non-negative")
    for key in SEED_KEYS:
        section, _, leaf = key.partition(".")
        seed = getattr(getattr(cfg, section), leaf)
        need(seed is None or 0 <= seed < SEED_LIMIT, key,
             f"a seed is a whole number from 0 to 2**32 - 1 ({SEED_LIMIT - 1}), got {seed}")
    need(cfg.output.dir is not None or bool(cfg.name.strip()), "name",
         "empty: the run's directory is runs/<name>: give a name (or output.dir)")
    if t.compile:
        import torch
        import torch._dynamo

        need(hasattr(torch.compiler, "set_stance"), "train.compile",
             f"needs torch >= 2.6 (this is {torch.__version__})")

        backends = torch._dynamo.list_backends(exclude_tags=())
        need(t.compile_backend in backends, "train.compile_backend",
             f"unknown torch.compile backend {t.compile_backend!r} (one of: {', '.join(backends)})")
    need(not t.packing or (cfg.task != "classification" and cfg.kd.teacher is None), "train.packing",
         "packing applies to supervised fine-tuning of a causal LM (not classification or token-level distillation)")
    for k in ("log_every", "eval_every", "checkpoint_every"):
        need(getattr(t, k) >= 0, f"train.{k}", "must be non-negative")
    if t.early_stopping_patience is not None:
        need(t.early_stopping_patience >= 1, "train.early_stopping_patience", "must be at least 1")
        need(t.eval_every > 0, "train.eval_every", "early stopping needs periodic evaluation: set train.eval_every")
        need(t.best_metric == "val_loss" or cfg.eval.during_training, "eval.during_training",
             f"train.best_metric={t.best_metric} is measured during training only with eval.during_training=true")
    need(t.mode != "freeze" or bool(t.trainable), "train.trainable",
         "mode=freeze needs at least one parameter-name pattern to train")


def _lora(cfg: Config, need: Need, loc: Located) -> None:
    """LoRA's rank, scale and targets."""
    need(cfg.lora.r >= 1, "lora.r", "must be at least 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be positive")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(bool(cfg.lora.targets), "lora.targets", "must name at least one module (or all-linear)")


def _data(cfg: Config, need: Need, loc: Located) -> None:
    """Data sources, lengths and held-out sizes."""
    d = cfg.data
    need(d.train is not None or cfg.sni.dir is not None
         or (bool(cfg.instruct.tasks) and all(tc.source is not None for tc in cfg.instruct.tasks)),
         "data.train", "a training source is required")
    need(d.max_length >= 2, "data.max_length", "must be at least 2")
    for k in ("validation_size", "test_size"):
        v = getattr(d, k)
        need(v >= 0 and (v < 1 or float(v).is_integer()), f"data.{k}", "must be a count or a fraction in [0, 1)")
    need(d.train_size is None or d.train_size >= 1, "data.train_size", "must be at least 1")
    for split in SOURCE_KEYS:
        src = getattr(d, split)
        if src is not None:
            need((src.path is None) != (src.dataset is None), f"data.{split}",
                 "give exactly one of path or dataset")


def _task(cfg: Config, need: Need, loc: Located) -> None:
    """What the task allows: classification's templates, precision, weights, synthetic records."""
    t, d = cfg.train, cfg.data
    if cfg.task == "classification":
        check_template(cfg.classify.text, loc.of("classify.text"))
        check_template(cfg.classify.label, loc.of("classify.label"))
        if cfg.classify.labels is not None:
            need(len(cfg.classify.labels) >= 2, "classify.labels", "needs at least two classes")
            need(len(set(cfg.classify.labels)) == len(cfg.classify.labels), "classify.labels", "has duplicates")
    need(t.precision != "mixed" or cfg.model.dtype != "float16", "train.precision",
         "mixed keeps float32 weights and autocasts to bfloat16: set model.dtype to float32 or bfloat16 (it is "
         "float16)")
    need(cfg.model.dtype != "float16" or t.mode == "lora", "model.dtype",
         "float16 training without loss scaling is unstable: use float32 or bfloat16 (or mode=lora)")
    need(d.weight_field is None or cfg.task != "classification", "data.weight_field",
         "example weights are for generation and chat tasks")
    need(d.completion_tokens == "bpe" or cfg.task == "generation", "data.completion_tokens",
         f"chars is for generation completions; a {cfg.task} task keeps the tokenizer's tokens")
    sy = d.synthetic
    need(sy.count >= 0, "data.synthetic.count", "must be non-negative")
    need(sy.order >= 1, "data.synthetic.order", "must be at least 1")
    if sy.count:
        need(sy.field is not None, "data.synthetic.field", "name the record field to synthesise (e.g. name)")
        need(cfg.task == "generation" and d.format == "template" and d.formatter is None
             and not cfg.instruct.tasks and cfg.sni.dir is None, "data.synthetic",
             "synthetic records are for template-formatted generation data (task: generation)")
        need(d.weight_field is None, "data.synthetic",
             f"synthetic records have no {d.weight_field!r} field to weight them by (data.weight_field)")
        other = sorted({f for tpl in (d.prompt, d.completion) for f in fields_of(tpl)} - {sy.field})
        need(not other, "data.synthetic.field",
             f"synthetic records have only the field {sy.field!r}, but the templates use {', '.join(other)}")


def _kd_and_mixtures(cfg: Config, need: Need, loc: Located) -> None:
    """Distillation, instruction mixtures and SNI: generation (and chat) tasks only."""
    t = cfg.train
    k = cfg.kd
    if k.teacher is not None or k.cache is not None:
        need(cfg.task in ("generation", "chat"), "kd.teacher", "distillation is for generation and chat tasks")
        need(k.temperature > 0, "kd.temperature", f"must be positive, got {k.temperature}")
        need(0 <= k.alpha <= 1, "kd.alpha", f"must be in [0, 1], got {k.alpha}")
        need(0 < k.beta < 1, "kd.beta", f"must be in (0, 1), got {k.beta}")
        need(k.top_k >= 1, "kd.top_k", "must be at least 1")
        need(k.chunk >= 1, "kd.chunk", "must be at least 1")
        need(k.teacher is not None, "kd.teacher", "kd.cache needs the teacher it caches (kd.teacher)")
    if cfg.instruct.tasks:
        need(cfg.task == "generation", "instruct.tasks",
             f"instruction-tuning tasks are a generation task, not {cfg.task}")
    if t.early_stopping_patience is not None:
        need(not cfg.instruct.tasks and cfg.sni.dir is None, "train.early_stopping_patience",
             "early stopping would choose the checkpoint on the held-out templates and tasks it then reports; "
             "not with instruct.tasks or sni.dir")
    sn = cfg.sni
    if sn.dir is not None:
        need(cfg.task == "generation", "sni.dir", "Super-NaturalInstructions tasks are a generation task")
        need(not cfg.instruct.tasks, "sni.dir", "give sni.dir or instruct.tasks, not both")
        need(sn.positive >= 0 and sn.negative >= 0, "sni.positive", "example counts must be non-negative")
        need(sn.definition or sn.positive > 0, "sni.definition",
             "an encoding needs the definition or at least one positive example")
        need(sn.train_instances is None or sn.train_instances >= 1, "sni.train_instances", "must be at least 1")
        need(sn.eval_instances >= 1, "sni.eval_instances", "must be at least 1")


def _eval(cfg: Config, need: Need, loc: Located) -> None:
    """Evaluation during and after training."""
    e = cfg.eval
    if e.display:
        check_template(e.display, loc.of("eval.display"))
    need(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be at least 1")
    need(e.max_examples is None or e.max_examples >= 1, "eval.max_examples", "must be at least 1 (or null: all)")
    need(e.batch_size >= 1, "eval.batch_size", "must be at least 1")
