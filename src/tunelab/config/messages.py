"""Values and keys as one readable line, and where a key was given (file:line or the override)."""

from __future__ import annotations

import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

from .keys import unindexed


def type_name(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "a string"
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


class Brief(reprlib.Repr):
    """A value as Python writes it, cut short: messages stay one readable line whatever the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 8
        self.maxstring = self.maxother = 120

    def repr_int(self, x: int, level: int) -> str:  # repr() of an int over 4300 digits raises
        if x.bit_length() > 256:
            digits = int((abs(x).bit_length() - 1) * math.log10(2))  # at most the count, by one at most
            while abs(x) >= 10**digits:
                digits += 1
            return f"<an integer of {digits} digits>"
        return repr(x)


BRIEF = Brief()


def show(value: Any) -> str:
    return BRIEF.repr(value)


def show_key(key: str) -> str:
    """A key for a message: as written, unless it is long or holds characters that would break the line."""
    return key if key.isprintable() and len(key) <= 120 else show(key)


def override_where(item: str) -> str:
    """'override KEY=VALUE', the value cut short when long (a message stays one readable line)."""
    if item.isprintable() and len(item) > 120:
        return f"override {item[:100]}..."
    return f"override {show_key(item)}"


class Located:
    """Maps dotted keys to a location string (recipe file and line, or the override)."""

    def __init__(self) -> None:
        self.where: dict[str, str] = {}
        self.default = "config"
        self.saved_run = False  # the config.yaml a run saved (counts written as floats before they were ints)

    def of(self, key: str) -> str:
        parts = key.split(".")
        while parts:
            here = ".".join(parts)
            w = self.where.get(here) or self.where.get(unindexed(here))  # an override sets instruct.tasks
            if w:
                return w
            parts.pop()
        return self.default
