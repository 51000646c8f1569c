"""Checking a model directory's files: a user's input, checked as such.

Weights that do not fit config.json (another shape, a tensor missing or left over) are an error, never drawn
at random or dropped with a warning (``check_loading``); weights holding NaN or inf (``check_finite``), and a
tokenizer with ids past the embedding (``check_vocabulary``), are refused at load; pickle weights are refused
unless allowed (``check_weights_are_safe``); and when transformers or PEFT fail on a damaged file (they raise
KeyError, TypeError, their own validation errors ...), ``diagnose`` finds the file and says in one line what
is wrong with it. ``models`` loads, and calls these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import TunelabError, one_line


def _unreadable(err: Exception, where: str, name: str = "") -> TunelabError:
    return TunelabError(f"a weights or config file here is corrupt or truncated ({name}{': ' if name else ''}"
                        f"{one_line(err)[:200]})", where)


def _corrupt_errors() -> tuple[type[Exception], ...]:
    """What a truncated safetensors file or a broken JSON config raises while loading."""
    import json

    from safetensors import SafetensorError

    return SafetensorError, json.JSONDecodeError


# ---- what is wrong with a model directory, found when transformers or PEFT fail on it (they raise KeyError,
# TypeError, AttributeError, their own validation errors ... for a file of the wrong structure)

_JSON_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
               "generation_config.json", "added_tokens.json", "adapter_config.json")


def _read_json(path: Path) -> tuple[dict[str, Any] | None, TunelabError | None]:
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


def _wrong_type(conf: dict, fields: dict[str, _Kinds]) -> str | None:
    """The first field of ``conf`` whose value is not of its kinds (None is always allowed; a bool is no number)."""
    for key, (kinds, name) in fields.items():
        v = conf.get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            return f"{key} must be {name}, got {type(v).__name__} {str(v)[:40]!r}"
    return None


_Kinds = tuple[tuple[type, ...], str]  # the types a field may hold, and their name in an error
_TOKEN: _Kinds = ((str, dict), "a token (text)")
_TOKENS: _Kinds = ((list, dict), "a list of tokens")
_TOKENIZER_FIELDS: dict[str, _Kinds] = {
    **{k: _TOKEN for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                           "mask_token")},
    "additional_special_tokens": _TOKENS, "extra_special_tokens": _TOKENS, "tokenizer_class": ((str,), "text"),
    "chat_template": ((str, list, dict), "text"), "model_max_length": ((int, float), "a number"),
    "added_tokens_decoder": ((dict,), "an object"),
}
_ADAPTER_FIELDS: dict[str, _Kinds] = {
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
        assert value is not None, "_read_json gives a value whenever it gives no error"
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
