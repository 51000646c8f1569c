"""A small interpreter of Go's text/template, the language of Ollama's TEMPLATE, for tests without Ollama:
text, {{ expr }}, if / else if / else / end, range $i, $x := pipeline, $var := expr, trim markers ({{- -}}),
and the functions eq, ne, not, and, or, len, slice, index. Enough to render the templates tunelab writes (and
Ollama's own message templates), from their text."""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _lex(src: str) -> list[tuple[str, str]]:
    """('text', s) and ('action', body) items, trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip())
    items.append(("text", src[pos:]))
    return [(k, v) for k, v in items if k == "action" or v]


def _parse(items, i=0, stop=("end",)):
    """A list of nodes up to one of the ``stop`` keywords; returns (nodes, index of the stop item)."""
    nodes: list[Any] = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split()[0] if body else ""
        if word in stop or body.startswith("else"):
            return nodes, i
        if word == "if":
            branches, i = [], i
            cond = body[2:].strip()
            while True:
                block, i = _parse(items, i + 1, ("end", "else"))
                branches.append((cond, block))
                tail = items[i][1]
                if tail == "end":
                    break
                cond = tail[len("else"):].strip()
                cond = cond[2:].strip() if cond.startswith("if") else None
                if cond is None:
                    block, i = _parse(items, i + 1, ("end",))
                    branches.append((None, block))
                    break
            nodes.append(("if", branches))
            i += 1
        elif word == "range":
            m = re.match(r"range\s+(?:(\$\w*)\s*,\s*(\$\w*)\s*:=\s*)?(.*)", body, re.S)
            assert m, body
            block, i = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), m.group(3), block))
            i += 1
        else:
            nodes.append(("action", body))
            i += 1
    return nodes, i


def _tokens(expr: str) -> list[str]:
    return [t for t in _TOKEN.findall(expr) if t.strip()]


def _value(tokens: list[str], scope: dict, dot: Any) -> Any:
    """Evaluate a pipeline's tokens (a function call, or one operand)."""
    args, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(("value", _value(tokens[i + 1:j - 1], scope, dot)))
            i = j
            continue
        args.append(("token", t))
        i += 1
    values = [_operand(v, scope, dot) if k == "token" else v for k, v in args]
    head = args[0][1] if args[0][0] == "token" else None
    if head in _FUNCS:
        return _FUNCS[head](*values[1:])
    assert len(values) == 1, tokens
    return values[0]


def _operand(t: str, scope: dict, dot: Any) -> Any:
    if t in _FUNCS:
        return t
    if t.startswith('"'):
        return bytes(t[1:-1], "utf-8").decode("unicode_escape")
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    if t in ("true", "false"):
        return t == "true"
    if t.startswith("$"):
        name, _, path = t.partition(".")
        value = scope["$"] if name == "$" else scope[name]
        return _fields(value, path)
    if t.startswith("."):
        return _fields(dot, t[1:])
    raise ValueError(f"unknown operand {t!r}")


def _fields(value: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _truthy(v: Any) -> bool:
    return bool(v)


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "len": len, "slice": lambda x, i=0, j=None: x[i:j], "index": lambda x, *k: _index(x, k),
}


def _index(x, keys):
    for k in keys:
        x = x[k]
    return x


def _run(nodes, scope: dict, dot: Any, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            m = re.match(r"(\$\w+)\s*:?=\s*(.*)", node[1], re.S)
            if m:
                scope[m.group(1)] = _value(_tokens(m.group(2)), scope, dot)
            else:
                v = _value(_tokens(node[1]), scope, dot)
                out.append("" if v is None else str(v))
        elif kind == "if":
            for cond, block in node[1]:
                if cond is None or _truthy(_value(_tokens(cond), scope, dot)):
                    _run(block, dict(scope), dot, out)
                    break
        elif kind == "range":
            _, ivar, xvar, expr, block = node
            for i, item in enumerate(_value(_tokens(expr), scope, dot)):
                inner = dict(scope)
                if ivar:
                    inner[ivar] = i
                if xvar:
                    inner[xvar] = item
                _run(block, inner, item, out)


def render(template: str, data: dict) -> str:
    """``template`` rendered with ``data`` as its dot (and $)."""
    nodes, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, {"$": data}, data, out)
    return "".join(out)
