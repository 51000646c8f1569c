"""Dotted keys: every valid one, their types, which name files, suggestions for a misspelt one, and the bounds
on what a recipe may hold."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Union

from .schema import Config

# Keys whose scalar value is shorthand for one field of the section: `model=X` sets model.name.
SHORTHAND = {"model": "name", "data.train": "path", "data.validation": "path", "data.test": "path",
              "instruct.tasks.source": "path"}
FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl")
SOURCE_KEYS = ("train", "validation", "test")

# Bounds on what is read: a recipe is a small text file; anything past these is a mistake or an attack (a
# "billion laughs" of nested aliases, a FIFO or /dev/zero given as the recipe), refused in one line.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values in a recipe or an override's value, with aliases expanded
MAX_YAML_DEPTH = 64  # nesting, with aliases expanded (a recipe needs about 6)
INT_LIMIT = 2**63  # an integer setting reaches torch and the tokenizers as a 64-bit integer
SEED_LIMIT = 2**32  # seeds: 32 bits, as numpy and most tools take (the data order uses seed * 100_003 + epoch)
SEED_KEYS = ("train.seed", "model.init_seed", "data.split_seed")
# Keys naming a file, a directory or a model (unindexed; shorthand sections too): an empty string is never
# meant (`output.dir=$UNSET` would silently write to the default)
PATH_KEYS = frozenset({"output.dir", "model", "model.name", "sni.dir", "kd.teacher", "kd.cache", "chat.template",
                        "eval.variations", "eval.control", "instruct.tasks.source", "instruct.tasks.source.path",
                        *(f"data.{s}" for s in SOURCE_KEYS), *(f"data.{s}.path" for s in SOURCE_KEYS)})


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, for suggestions."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        sub = dataclass_of(hints[f.name])
        if sub is not None:
            keys.extend(all_keys(sub, key + "."))
    return keys


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping (a config as a dict) as {dotted.key: value}."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def dataclass_of(tp: Any) -> type | None:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def unindexed(key: str) -> str:
    """A key with its list indices dropped: instruct.tasks[1].weight -> instruct.tasks.weight."""
    return re.sub(r"\[\d+\]", "", key)


def suggest(key: str) -> str:
    if len(key) > 200:
        return ""
    keys = all_keys()
    key = unindexed(key)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean {close[0]}?)" if close else ""



def field_type(key: str) -> Any:
    """The type hint of a dotted key (None if unknown)."""
    cls: Any = Config
    tp: Any = None
    for part in key.split("."):
        sub = dataclass_of(cls) if cls is not None else None
        if sub is None:
            return None
        hints = typing.get_type_hints(sub)
        if part not in hints:
            return None
        tp = cls = hints[part]
    return tp


def is_text_field(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType)
                         and str in typing.get_args(tp) and not any(
                             typing.get_origin(a) is list or dataclasses.is_dataclass(a) for a in typing.get_args(tp)))

