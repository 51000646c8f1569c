"""Prompt templates over record fields.

``{name}`` inserts a field; ``{name|reverse}`` (filters chain: ``{name|reverse|upper}``) inserts a
derived value; ``{{`` and ``}}`` are literal braces. Filters are the derived fields the names tasks
need; anything richer belongs in a ``module:function`` formatter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import TunelabError

VOWELS = set("aeiouAEIOU")

FILTERS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "lower": str.lower,
    "title": str.title,
    "strip": str.strip,
    "len": lambda s: str(len(s)),
    "first": lambda s: s[:1],
    "last": lambda s: s[-1:],
    "vowels": lambda s: str(sum(c in VOWELS for c in s)),
    "consonants": lambda s: str(sum(c.isalpha() and c not in VOWELS for c in s)),
    "chars": lambda s: " ".join(s),
    "sorted": lambda s: "".join(sorted(s)),
    "isvowel": lambda s: "yes" if s[:1] in VOWELS else "no",  # does the text start with a vowel?
    "double": lambda s: s + s,
    "capitalize": lambda s: s[:1].upper() + s[1:],
}

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def fields_of(template: str) -> list[str]:
    """The record fields a template reads, in order."""
    return [m.group(1).split("|")[0].strip() for m in _FIELD.finditer(template) if m.group(1) is not None]


def check_template(template: str, key: str) -> None:
    """Syntax check up front, so a bad filter fails before any data is read."""
    for m in _FIELD.finditer(template):
        expr = m.group(1)
        if expr is None:
            continue
        name, *filters = [p.strip() for p in expr.split("|")]
        if not name:
            raise TunelabError(f"empty field in template {template!r}", key)
        for f in filters:
            if f not in FILTERS:
                raise TunelabError(f"unknown filter {f!r} in template {template!r} "
                                   f"(filters: {', '.join(FILTERS)})", key)
    rest = _FIELD.sub("", template)
    if "{" in rest or "}" in rest:
        raise TunelabError(f"unbalanced brace in template {template!r} (write {{{{ or }}}} for a literal)",
                           key)


def render(template: str, record: dict[str, Any], where: str, key: str = "template") -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        name, *filters = [p.strip() for p in m.group(1).split("|")]
        if name not in record:
            raise TunelabError(f"missing field {name!r} (used by {key})", where)
        value = record[name]
        if isinstance(value, (bytes, bytearray, memoryview)):  # a Parquet binary column: its str() is a repr
            raise TunelabError(f"field {name!r} is binary data (bytes), not text (used by {key}): store it as "
                               "a string column", where)
        if isinstance(value, (list, dict)):
            raise TunelabError(f"field {name!r} is a {'list' if isinstance(value, list) else 'JSON object'}, "
                               f"not text (used by {key})", where)
        text = "" if value is None else str(value)
        for f in filters:
            text = FILTERS[f](text)
        return text

    return _FIELD.sub(sub, template)


OPTION_STYLES = ("dash", "letter", "number")


def option_key(i: int, style: str) -> str:
    """The key of the i-th option: '-' (dash), 'A', 'B', ... (letter) or '1', '2', ... (number)."""
    if style == "letter":
        return chr(ord("A") + i) if i < 26 else f"A{i}"
    if style == "number":
        return str(i + 1)
    return "-"


def render_options(options: list[str], style: str = "dash", header: str = "OPTIONS:") -> str:
    """FLAN's options block: ``OPTIONS:\n- yes\n- no`` (dash), ``(A) yes`` (letter), ``1. yes`` (number)."""
    lines = [header] if header else []
    for i, opt in enumerate(options):
        k = option_key(i, style)
        lines.append(f"- {opt}" if style == "dash" else f"({k}) {opt}" if style == "letter" else f"{k}. {opt}")
    return "\n".join(lines)
