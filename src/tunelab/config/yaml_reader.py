"""Reading YAML within bounds: alias expansion, depth, repeated keys and values Python cannot hold are one
TunelabError with the file and line, never a hang or a traceback."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import TunelabError, one_line
from .keys import MAX_YAML_DEPTH, MAX_YAML_NODES
from .messages import show_key


class _TooDeep(Exception):
    def __init__(self, mark: Any):
        super().__init__()
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops composing past MAX_YAML_DEPTH levels (before Python's recursion limit)
    and reports a value Python cannot hold (an integer of 5000 digits, 30 February) as a YAML error with its
    line instead of a bare ValueError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError) as e:
            problem = ("an integer of more than 4300 digits" if "integer string conversion" in str(e)
                       else f"cannot read this value ({one_line(e)})")
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _children(node: Any) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expansion_problem(root: Any) -> tuple[str, Any] | None:
    """What is wrong with a composed YAML tree read with its aliases expanded (as every walk over the loaded
    value sees it): more than MAX_YAML_NODES values, deeper than MAX_YAML_DEPTH, or holding itself.
    Linear in the distinct nodes: each node's expanded size and depth is computed once, without recursion."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded
    open_: set[int] = set()  # the nodes on the path from the root: one seen again holds itself
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        kids = _children(node)
        if leaving:
            open_.discard(id(node))
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            if size > MAX_YAML_NODES:
                return (f"aliases expand this YAML to more than {MAX_YAML_NODES:,} values (a recipe has a few "
                        "dozen): write the values out instead of nesting aliases", node.start_mark)
            if depth > MAX_YAML_DEPTH:
                return f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", node.start_mark
            done[id(node)] = (size, depth)
        elif id(node) in done:
            continue
        elif id(node) in open_:
            return "an alias refers to a value that holds it (a recursive structure): write the values out", \
                node.start_mark
        else:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    return None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_key(root: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key given twice in one mapping: (dotted key, its first key node, its second). PyYAML keeps
    the second silently; `<<` merges are not repeats (a mapping's own keys override merged ones)."""
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, prefix)]
    while stack:
        node, pre = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], Any] = {}
            later = []
            for knode, vnode in node.value:
                if isinstance(knode, yaml.ScalarNode) and knode.tag != _MERGE_TAG:
                    ident = (knode.tag, knode.value)
                    if ident in first:
                        return pre + knode.value, first[ident], knode
                    first[ident] = knode
                    later.append((vnode, f"{pre}{knode.value}."))
                else:
                    later += [(knode, pre), (vnode, pre)]
            stack.extend(reversed(later))
        elif isinstance(node, yaml.SequenceNode):
            base = pre[:-1] if pre else ""
            stack.extend(reversed([(item, f"{base}[{i}].") for i, item in enumerate(node.value)]))
    return None


def load_yaml(text: str, where: str, prefix: str = "", filename: str | None = None) -> tuple[Any, dict[str, str]]:
    """YAML text -> (its value, dotted key -> 'file:line' when ``filename`` is given), with the bounds above
    and no repeated keys. Refusals are TunelabErrors at ``where`` (``filename:line`` for a file); a text
    that is not YAML raises yaml.YAMLError, for the caller to word."""

    def at(mark: Any) -> str:
        return f"{filename}:{mark.line + 1}" if filename and mark is not None else where

    loader = _BoundedLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except _TooDeep as e:
            raise TunelabError(f"nested more than {MAX_YAML_DEPTH} levels deep (a recipe needs a few)",
                               at(e.mark)) from None
        if node is None:
            return None, {}
        problem = _expansion_problem(node)
        if problem is not None:
            raise TunelabError(problem[0], at(problem[1]))
        dup = _duplicate_key(node, prefix)
        if dup is not None:
            key, first, second = dup
            also = f" (first on line {first.start_mark.line + 1})" if filename else ""
            raise TunelabError(f"{show_key(key)} is given twice{also}: YAML would silently keep only the last; "
                               "give it once", at(second.start_mark))
        lines = _key_lines(node, filename) if filename else {}
        return loader.construct_document(node), lines
    except RecursionError:  # not expected past the bounds above; never a traceback
        raise TunelabError("nested too deeply to read", where) from None
    finally:
        loader.dispose()


def read_yaml(text: str, where: str) -> Any:
    """A YAML document with the bounds a recipe has (alias expansion, depth, no repeated keys): for other
    files tunelab reads back, such as a run's config.yaml in a report. Anything wrong is one TunelabError."""
    try:
        return load_yaml(text, where, filename=where)[0]
    except yaml.YAMLError as e:
        raise TunelabError(f"invalid YAML: {one_line(getattr(e, 'problem', None) or e)[:120]}", where) from None


def _key_lines(root: Any, filename: str) -> dict[str, str]:
    """dotted key -> 'file:line' for every key of a composed YAML mapping tree (bounded by load_yaml)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    continue  # a mapping or list as a key: refused when the value is built
                key = prefix + str(knode.value)
                out[key] = f"{filename}:{knode.start_mark.line + 1}"
                walk(vnode, key + ".")
        elif isinstance(node, yaml.SequenceNode) and prefix:  # a list's items: key[i] (instruct.tasks[1].weight)
            for i, item in enumerate(node.value):
                key = f"{prefix[:-1]}[{i}]"
                out[key] = f"{filename}:{item.start_mark.line + 1}"
                walk(item, key + ".")

    walk(root, "")
    return out

