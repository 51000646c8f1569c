"""Teachers for distillation: loading, vocabulary checks, the top-k cache, and students cut from a teacher."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import atomic
from .config import Config, KDConfig, ModelConfig
from .data.types import IGNORE
from .errors import TunelabError

log = logging.getLogger("tunelab")


def _is_run(path: str) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.yaml").exists()


def teacher_tokenizer(kd: KDConfig):
    from .config import load_config
    from .models import load_tokenizer

    assert kd.teacher is not None, "called for a distillation recipe, which names its teacher"
    if _is_run(kd.teacher):
        return load_tokenizer(load_config(kd.teacher).model)
    return load_tokenizer(ModelConfig(name=kd.teacher))


def check_vocab(student_tok, teacher_tok) -> int:
    """The shared vocabulary size; a real mismatch (different tokens or ids) is an error."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        differ = len(set(s.items()) ^ set(t.items()))
        raise TunelabError(f"the teacher's tokenizer differs from the student's ({len(t)} vs {len(s)} tokens, "
                           f"{differ} entries differ): token-level distillation needs one tokenizer",
                           "kd.teacher")
    return len(student_tok)


def load_teacher(cfg: Config, student_tok, device: torch.device):
    """The teacher in eval mode without gradients, in its own dtype and device (a LoRA run merged)."""
    from .config import load_config
    from .models import load_model, load_trained
    from .tasks import task_of

    kd = cfg.kd
    assert kd.teacher is not None, "called for a distillation recipe, which names its teacher"
    dtype, dev = teacher_placement(cfg, device)
    if _is_run(kd.teacher):
        tcfg = load_config(kd.teacher)
        if not task_of(tcfg).by_generation:
            raise TunelabError("the teacher is a classification run; a teacher must generate", "kd.teacher")
        mcfg = ModelConfig(**{**tcfg.model.__dict__, "dtype": dtype, "device": dev})
        model, tok = load_trained(Path(kd.teacher), mcfg)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        model, tok = load_model(ModelConfig(name=kd.teacher, dtype=dtype, device=dev))
    vocab = check_vocab(student_tok, tok)
    from .train.forward import split_head

    if split_head(model) is None:
        raise TunelabError("this teacher's logits are not head(hidden states) (logit scaling or soft-capping): "
                           "token-level distillation does not support it", "kd.teacher")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, vocab


def teacher_placement(cfg: Config, device: torch.device
                      ) -> tuple[Literal["float32", "bfloat16", "float16", "auto"], Literal["cpu", "cuda"]]:
    """The teacher's dtype and device as configured (kd.teacher_dtype / kd.teacher_device, auto: the student's)."""
    kd = cfg.kd
    dtype = cfg.model.dtype if kd.teacher_dtype == "auto" else kd.teacher_dtype
    dev: Literal["auto", "cpu", "cuda"] = (
        "cuda" if kd.teacher_device == "auto" and device.type == "cuda" else kd.teacher_device)
    return dtype, "cpu" if dev == "auto" else dev


def legacy_fingerprint(examples, teacher: str) -> str:
    """The fingerprint of caches written before it covered the teacher's dtype (still accepted)."""
    return _fingerprint(teacher, examples, teacher)


def examples_fingerprint(examples, teacher: str = "", dtype: str = "") -> str:
    """The data (tokens and masks) and the teacher (its name, or a local directory's absolute path and the
    size and modification time of every weights file in it, and the dtype it ran in) a cache was computed for."""
    root = Path(teacher)
    return _fingerprint(f"{root.resolve() if root.exists() else teacher}|{dtype}", examples, teacher)


def _fingerprint(name: str, examples, teacher: str) -> str:
    h = hashlib.sha256()
    h.update(name.encode())
    root = Path(teacher)
    if root.is_dir():
        for f in sorted(root.rglob("*")):
            if f.suffix in (".safetensors", ".bin", ".pt", ".gguf") and f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def build_cache(teacher, examples, vocab: int, k: int, pad_id: int, batch_size: int = 32,
                progress: bool = False) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probabilities at every supervised position of every example, in order."""
    from tqdm.auto import tqdm

    from .data.batching import collate
    from .train.forward import body_hidden, split_head

    parts = split_head(teacher)
    assert parts is not None, "load_teacher refuses a teacher whose logits are not head(hidden)"
    body, head = parts
    device = next(teacher.parameters()).device
    logps, idxs, counts = [], [], []
    for s in tqdm(range(0, len(examples), batch_size), desc="teacher top-k", disable=not progress, leave=False):
        batch = collate(examples[s:s + batch_size], pad_id)
        ids, mask, labels = (batch[x].to(device) for x in ("input_ids", "attention_mask", "labels"))
        hidden = body_hidden(body, ids, mask)[:, :-1]
        sel = labels[:, 1:] != IGNORE
        logits = head(hidden[sel])[:, :vocab].float()
        lp, ix = torch.log_softmax(logits, -1).topk(min(k, vocab), dim=-1)
        logps.append(lp.cpu())
        idxs.append(ix.to(torch.int32).cpu())
        counts.extend(sel.sum(1).tolist())
    offsets = torch.zeros(len(examples) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return {"logp": torch.cat(logps), "index": torch.cat(idxs), "offsets": offsets}


def load_or_build_cache(cfg: Config, student_tok, examples, device: torch.device, quiet: bool):
    """(cache tensors, vocab): read ``kd.cache`` if it exists and matches the data, else compute and write it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    kd = cfg.kd
    assert kd.cache is not None, "called when the recipe sets kd.cache"
    path = Path(kd.cache)
    from .models import resolve_device, resolve_dtype

    dtype, dev = teacher_placement(cfg, device)
    fp = examples_fingerprint(examples, str(kd.teacher), str(resolve_dtype(dtype, resolve_device(dev))))
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            cache = load_file(str(path))
        except Exception as e:  # not a safetensors file, truncated, ...
            raise TunelabError(f"not a teacher cache ({type(e).__name__})", str(path)) from None
        known = fp if meta.get("fingerprint_version") == "2" else legacy_fingerprint(examples, str(kd.teacher))
        if meta.get("fingerprint") != known or _meta_int(meta, "examples") != len(examples):
            raise TunelabError("the cached teacher log-probabilities were computed for other data or another "
                               "teacher: delete the file or point kd.cache elsewhere", str(path))
        top_k = _meta_int(meta, "top_k")
        if top_k != min(kd.top_k, len(student_tok)):
            raise TunelabError(f"the cache holds top-{meta.get('top_k')} log-probabilities, the recipe asks for "
                               f"kd.top_k={kd.top_k}", str(path))
        vocab = check_vocab(student_tok, teacher_tokenizer(kd))
        assert top_k is not None, "equal to min(kd.top_k, vocabulary size): checked above"
        check_cache(cache, examples, top_k, vocab, path)
        log.info("teacher top-%s log-probabilities from %s", meta.get("top_k"), path)
        return cache, vocab
    teacher, vocab = load_teacher(cfg, student_tok, device)
    if not quiet:
        log.info("computing the teacher's top-%d log-probabilities over %d examples -> %s", kd.top_k,
                 len(examples), path)
    cache = build_cache(teacher, examples, vocab, kd.top_k, student_tok.pad_token_id, progress=not quiet)
    meta = {"fingerprint": fp, "fingerprint_version": "2", "examples": str(len(examples)),
            "top_k": str(min(kd.top_k, vocab)),
            "teacher": str(kd.teacher)}
    atomic.write_file(path, lambda p: save_file(cache, str(p), metadata=meta))
    del teacher
    return cache, vocab


def _meta_int(meta: dict, key: str) -> int | None:
    try:
        return int(meta.get(key, ""))
    except ValueError:
        return None


def check_cache(cache: dict[str, torch.Tensor], examples, k: int, vocab: int, path: Path) -> None:
    """A cache whose metadata matches the data but whose tensors are not what build_cache writes (a damaged
    or edited file) is a one-line error, not an index error in the middle of training."""
    def bad(problem: str) -> TunelabError:
        return TunelabError(f"the teacher cache is damaged: {problem} (delete the file: it is computed again)",
                            str(path))

    if set(cache) != {"logp", "index", "offsets"}:
        raise bad(f"it holds {sorted(cache)}, not logp, index and offsets")
    logp, index, offsets = cache["logp"], cache["index"], cache["offsets"]
    counts = [sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples]  # supervised positions of each example
    if offsets.dtype != torch.long or list(offsets.shape) != [len(examples) + 1] \
            or offsets.tolist() != [0, *itertools.accumulate(counts)]:
        raise bad("its offsets do not match the examples' supervised tokens")
    rows = int(offsets[-1])
    if not logp.is_floating_point() or list(logp.shape) != [rows, k] or list(index.shape) != [rows, k] \
            or index.dtype != torch.int32:
        raise bad(f"logp {list(logp.shape)} and index {list(index.shape)} are not the {rows} x {k} of the offsets")
    if rows and (bool(torch.isnan(logp).any()) or bool((logp > 1e-3).any())):
        raise bad("logp holds NaN or values above 0 (not log-probabilities)")
    if rows and (int(index.min()) < 0 or int(index.max()) >= vocab):
        raise bad(f"index holds token ids outside the vocabulary of {vocab}")


def cached_rows(cache: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache rows of these examples (dataset indices), concatenated in order."""
    offs = cache["offsets"]
    rows = torch.cat([torch.arange(int(offs[i]), int(offs[i + 1])) for i in index.tolist()])
    return cache["logp"][rows], cache["index"][rows]


def slice_layers(model, keep: list[int]):
    """A smaller model of the same architecture keeping these decoder layers (with the teacher's weights)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = base.config.num_hidden_layers
    bad = [i for i in keep if not 0 <= i < n]
    if bad or not keep or len(set(keep)) != len(keep):
        raise TunelabError(f"layers to keep must be distinct indices in 0..{n - 1}, got {keep}", "--layers")
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TunelabError(f"cannot cut layers from {type(base).__name__}: its decoder layers are not "
                           "model.layers (Llama-style models are supported)", "student")
    student = copy.deepcopy(base)
    sbody = getattr(student, student.base_model_prefix)
    sbody.layers = torch.nn.ModuleList([copy.deepcopy(layers[i]) for i in keep])
    for new_i, layer in enumerate(sbody.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_i  # the KV cache is indexed by position in the stack
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_i
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def student_layers(n: int, keep_every: int | None = None, layers: str | list[int] | None = None) -> list[int]:
    """The layers of an ``n``-layer teacher a student keeps: exactly ``layers`` (a list, or its comma-separated
    text as --layers takes it), or every ``keep_every``-th from 0, and the last."""
    if (layers is None) == (keep_every is None):
        raise TunelabError("give --keep-every K or --layers I,J,...", "student")
    if isinstance(layers, str):
        try:
            return [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise TunelabError(f"--layers takes comma-separated integers, got {layers!r}", "--layers") from None
    if layers is not None:
        return list(layers)
    assert keep_every is not None  # (exactly one of the two was given)
    if keep_every < 1:
        raise TunelabError("--keep-every must be at least 1", "--keep-every")
    keep = list(range(0, n, keep_every))
    if keep[-1] != n - 1:
        keep.append(n - 1)  # keep the last layer: it feeds the output head
    return keep


@dataclass
class Student:
    """A student ``cut_student`` wrote: where, which of the teacher's layers, and the parameter counts."""

    path: Path
    layers: list[int]
    teacher_layers: int
    parameters: int
    teacher_parameters: int

    def summary(self) -> str:
        n_s, n_t = self.parameters, self.teacher_parameters
        return (f"student with layers {self.layers} of {self.teacher_layers}: {n_s:,} parameters "
                f"({n_s / n_t:.0%} of {n_t:,}); written to {self.path}")


def cut_student(teacher: str | Path, out_dir: str | Path, keep_every: int | None = None,
                layers: str | list[int] | None = None, force: bool = False) -> Student:
    """A smaller student cut from a teacher (a run directory, or a model by alias, directory or hub id):
    some of its decoder layers with their weights (``student_layers``), written to ``out_dir`` as a
    transformers model with the teacher's tokenizer; ``force`` replaces an out_dir tunelab made."""
    import contextlib

    from . import ownership
    from .config import load_config
    from .models import load_model, load_trained, resolve_model_path
    from .train.rundir import input_paths

    spec = str(teacher)
    is_run = _is_run(spec)
    reads: list[str | None] = [spec, *(input_paths(load_config(spec)) if is_run else [])]
    with contextlib.suppress(TunelabError):
        reads.append(resolve_model_path(spec) if not is_run else None)
    out = ownership.free_out_dir(out_dir, force, reads)  # checked before the teacher is loaded
    if is_run:
        model, tok = load_trained(Path(spec), load_config(spec).model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        model, tok = load_model(ModelConfig(name=spec, device="cpu"))
    n = model.config.num_hidden_layers
    keep = student_layers(n, keep_every, layers)
    student = slice_layers(model, keep)

    def write(d: Path) -> None:
        student.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    ownership.check_not_locked(out)
    atomic.write_dir(out, write, marker="student model")
    return Student(out, keep, n, sum(p.numel() for p in student.parameters()),
                   sum(p.numel() for p in model.parameters()))
