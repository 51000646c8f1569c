"""Recipes and dotted ``key=value`` overrides read into the schema's dataclasses: unknown keys get a "did you
mean", wrong types name the key and, for recipe files, the line; then the checks in ``checks`` run."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..errors import TunelabError, one_line
from .checks import check
from .keys import (
    FILE_SUFFIXES,
    INT_LIMIT,
    MAX_RECIPE_BYTES,
    PATH_KEYS,
    SHORTHAND,
    SOURCE_KEYS,
    all_keys,
    field_type,
    is_text_field,
    suggest,
    unindexed,
)
from .messages import Located, override_where, show, show_key, type_name
from .schema import Config
from .yaml_reader import load_yaml


class _OutOfRange(TunelabError):
    """A number too large for its setting: said as such, not as "expected an integer or null"."""


def _coerce(value: Any, tp: Any, key: str, loc: Located) -> Any:
    """Check (and gently coerce) one value against a type hint."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, loc)
            except TunelabError as e:
                if isinstance(value, dict) and dataclasses.is_dataclass(arg) or isinstance(e, _OutOfRange):
                    raise  # a section's own error (unknown key, wrong type inside) says more
                errors.append(e)
        raise TunelabError(f"{key}: expected {type_name(tp)}, got {show(value)}", loc.of(key))
    if origin is Literal:  # a choice: read as text, then one of the listed values
        choices = typing.get_args(tp)
        value = _coerce(value, str, key, loc)
        if value not in choices:
            raise TunelabError(f"{key}: must be one of {', '.join(choices)}; got {show(value)}", loc.of(key))
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        plain = unindexed(key)
        if isinstance(value, str) and plain in SHORTHAND:
            value = {SHORTHAND[plain]: value}
        if not isinstance(value, dict):
            raise TunelabError(f"{key}: expected a section (mapping), got {show(value)}", loc.of(key))
        return _build(tp, value, key + ".", loc)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise TunelabError(f"{key}: expected {type_name(tp)}, got {show(value)}", loc.of(key))
        return [_coerce(v, inner, f"{key}[{i}]", loc) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        too_long = isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{4300,}\s*", value)  # YAML could not read it
        if too_long or isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            raise _OutOfRange(f"{key}: {show(value)} is out of range: an integer setting is below 2**63 (it "
                              "reaches torch as a 64-bit integer)", loc.of(key))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            try:
                number = float(number)
            except OverflowError:
                raise _OutOfRange(f"{key}: {show(value)} is too large for a number", loc.of(key)) from None
            if math.isnan(number):
                raise TunelabError(f"{key}: expected a number, got nan (not a number)", loc.of(key))
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an integer of more than 4300 digits
                pass
    else:  # pragma: no cover - only the types above are used
        return value
    raise TunelabError(f"{key}: expected {type_name(tp)}, got {show(value)}", loc.of(key))


def _check_count_or_fraction(value: Any, key: str, loc: Located) -> None:
    """data.validation_size and test_size: an integer is a count of examples, a float below 1 a fraction.
    A float of 1 or more (1.0: one example? all of them?) is refused rather than guessed."""
    if isinstance(value, str):  # YAML 1.1 reads 1e3 as a string
        try:
            value = float(value)
        except ValueError:
            return  # _coerce says what is wrong
    if not isinstance(value, float) or not value >= 1:
        return  # a count, a fraction, or (negative, nan) refused by check
    if value.is_integer() and loc.saved_run and not loc.of(key).startswith("override "):
        return  # a run's config.yaml from before counts were saved as integers: 500.0 is 500
    n = int(value) if value.is_integer() else None
    fix = (f"write {n} for {'one example' if n == 1 else f'{n} examples'}" if n is not None
           else "write a whole number of examples")
    raise TunelabError(f"{key}: {show(value)} is neither a count (an integer) nor a fraction below 1: {fix}, "
                       "or a fraction below 1 (0.1 holds out a tenth)", loc.of(key))


def _build(cls: type, raw: dict, prefix: str, loc: Located) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = prefix + str(k)
        if k not in names:
            raise TunelabError(f"unknown key {show_key(key)}{suggest(key)}", loc.of(key))
        if names[k].metadata.get("count_or_fraction"):
            _check_count_or_fraction(v, key, loc)
        val = _coerce(v, hints[k], key, loc)
        kwargs[k] = val
    return cls(**kwargs)


def parse_section(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    """A config section (dataclass) from a plain mapping read elsewhere, with the same checks as a recipe."""
    loc = Located()
    loc.default = where
    if not isinstance(raw, dict):
        raise TunelabError(f"{prefix.rstrip('.') or 'entry'}: expected a mapping, got {show(raw)}", where)
    return _build(cls, raw, prefix, loc)



def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise TunelabError(f"expected key=value, got {show(item)}", "override")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = load_yaml(text, override_where(item), prefix=key + ".")[0] if text.strip() else None
    except yaml.YAMLError:
        value = text
    except TunelabError:  # past the bounds (or a key given twice): refused, unless the text is the value
        if not is_text_field(field_type(key)):
            raise
        value = text
    if isinstance(value, (dict, list)) and is_text_field(field_type(key)):
        value = text  # a template such as eval.display={name} is text, not a YAML mapping
    elif (value is None or isinstance(value, str)) and is_text_field(field_type(key)) and _drops_comment(text):
        value = text  # data.prompt=Item #1: {name}: the '#' is the template's, not a YAML comment
    return key, value


def _drops_comment(text: str) -> bool:
    """Whether YAML would read part of ``text`` as a comment (and so drop it)."""
    m = re.search(r"(^|\s)#", text)
    if m is None:
        return False
    try:
        before = text[: m.start()]
        whole = load_yaml(text, "override")[0]
        return load_yaml(before, "override")[0] == whole if before.strip() else whole is None
    except (yaml.YAMLError, TunelabError):
        return False


def _set_dotted(raw: dict, key: str, value: Any, loc: Located) -> None:
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        sub = node.get(p)
        here = ".".join(parts[: i + 1])
        if sub is None:
            sub = node[p] = {}
        elif isinstance(sub, str) and here in SHORTHAND:
            sub = node[p] = {SHORTHAND[here]: sub}
        elif not isinstance(sub, dict):
            raise TunelabError(f"{here} is not a section; cannot set {key}", loc.of(key))
        node = sub
    node[parts[-1]] = value


def _resolve_source_paths(raw: dict, base: Path) -> None:
    """Data paths in a recipe are relative to the recipe file."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in SOURCE_KEYS:
        src = data.get(split)
        if isinstance(src, str):
            src = data[split] = {"path": src}
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = os.path.realpath(base / os.path.expanduser(src["path"]))
    instruct = raw.get("instruct")
    tasks = instruct.get("tasks") if isinstance(instruct, dict) else None
    for task in tasks if isinstance(tasks, list) else []:
        src = task.get("source") if isinstance(task, dict) else None
        if isinstance(src, str):
            src = task["source"] = {"path": src}
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            src["path"] = os.path.realpath(base / os.path.expanduser(src["path"]))
    sni = raw.get("sni")
    if isinstance(sni, dict) and isinstance(sni.get("dir"), str):
        sni["dir"] = os.path.realpath(base / os.path.expanduser(sni["dir"]))
    ev = raw.get("eval")
    if isinstance(ev, dict):
        for key in ("variations", "control"):
            value = ev.get(key)
            if isinstance(value, str) and value.endswith(FILE_SUFFIXES):  # a file, not a built-in task's name
                ev[key] = os.path.realpath(base / os.path.expanduser(value))
    chat = raw.get("chat")
    if isinstance(chat, dict):
        chat["template"] = _template_file(chat.get("template"), base)


def _template_file(value: Any, base: Path) -> Any:
    """chat.template naming a Jinja file relative to ``base`` (the recipe's folder; the working directory
    for an override) -> its absolute path, so that the run finds it from anywhere. Anything else stays as
    written: a template's name, or a path that is not a file there (a run's saved config.yaml keeps a path
    written before paths were resolved, relative to the working directory as it was then)."""
    from ..data.chat import SHIPPED

    if not isinstance(value, str) or value in ("auto", "model", *SHIPPED):
        return value
    path = base / os.path.expanduser(value)
    try:
        is_file = path.is_file()
        if not is_file and path.exists() and not path.is_dir():
            raise TunelabError("not a regular file (a device, FIFO or socket): a chat template is a .jinja file",
                               str(path))
    except OSError:  # a name too long for a file name: not a file, so a template's name (refused later)
        is_file = False
    return os.path.realpath(path) if is_file else value


_RUN_FILES = ("data_stats.json", "metrics.jsonl", "checkpoints", ".tunelab")  # beside a run's config.yaml


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _read_recipe(p: Path, where: str) -> str:
    """A recipe's text: a regular file (a FIFO or a device would block or never end) of at most
    MAX_RECIPE_BYTES, opened without blocking and read no further than that."""
    too_big = f"larger than {MAX_RECIPE_BYTES // 2**20} MiB: a recipe is a small YAML file (is this the right file?)"
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise TunelabError(f"{_file_kind(st.st_mode)}, not a recipe file: give a YAML file", where)
        if st.st_size > MAX_RECIPE_BYTES:
            raise TunelabError(too_big, where)
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):  # replaced between the two looks
                raise TunelabError(f"{_file_kind(mode)}, not a recipe file: give a YAML file", where)
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise TunelabError(f"cannot read the recipe: {e.strerror or e}", where) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise TunelabError(too_big, where)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TunelabError(f"not UTF-8 text ({e.reason} at byte {e.start})", where) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text gave it (universal newlines)


_BLANK_HINT = {"output.dir": "leave it out (or null) to write runs/<name>, or give a directory",
               "model": "give a model alias, directory or hub id",
               "model.name": "give a model alias, directory or hub id"}


def _check_strings(value: Any, key: str, loc: Located) -> None:
    """Every string in ``value`` (at ``key``; a whole recipe when key is ""), before any path is resolved: no
    NUL character and nothing Python cannot write as UTF-8 (a lone surrogate); a file, directory or model key
    never empty (null or leaving it out gives the default)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{key}.{k}" if key else str(k), loc)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{key}[{i}]", loc)
    elif isinstance(value, str):
        plain = unindexed(key)
        if "\x00" in value:
            raise TunelabError(f"{show_key(key)}: contains a NUL character (\\0)", loc.of(key))
        try:
            value.encode("utf-8", "surrogateescape" if plain in PATH_KEYS and plain != "output.dir" else "strict")
        except UnicodeEncodeError:
            raise TunelabError(f"{show_key(key)}: {show(value)} is not valid UTF-8 text (a lone surrogate, or "
                               "bytes that are not UTF-8)", loc.of(key)) from None
        if plain in PATH_KEYS and not value.strip():
            hint = _BLANK_HINT.get(plain, "give a path, or leave it out (or null) for the default")
            raise TunelabError(f"{show_key(key)}: empty: {hint}", loc.of(key))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or a run's saved config.yaml), apply overrides, validate."""
    loc = Located()
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir() and (p / "config.yaml").exists():
            p = p / "config.yaml"
        if not p.exists():
            raise TunelabError("recipe not found", str(path))
        if p.is_dir():
            raise TunelabError("a directory, not a recipe file (nor a run directory with config.yaml)", str(path))
        text = _read_recipe(p, str(path))
        try:
            loaded, lines = load_yaml(text, str(path), filename=str(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise TunelabError(f"invalid YAML: {one_line(getattr(e, 'problem', e))}", where) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise TunelabError("a recipe must be a YAML mapping of sections", str(path))
        raw = loaded
        loc.where.update(lines)
        loc.default = str(path)
        loc.saved_run = p.name == "config.yaml" and any((p.parent / n).exists() for n in _RUN_FILES)
        _check_strings(raw, "", loc)
        _resolve_source_paths(raw, Path(os.path.realpath(p.parent)))
        raw.setdefault("name", p.stem if p.name != "config.yaml" else p.parent.name)
    cwd = Path.cwd()
    for item in overrides:
        key, value = parse_override(item)
        where = override_where(item)
        loc.where[key] = where
        if key not in all_keys():
            raise TunelabError(f"unknown key {show_key(key)}{suggest(key)}", where)
        if key in PATH_KEYS and not item.partition("=")[2].strip():
            raise TunelabError(f"{key}: empty value (an unset shell variable?): give one, or write {key}=null "
                               "for the default", where)
        if key in SHORTHAND and isinstance(value, str):  # model=X sets model.name, keeping the section
            key = f"{key}.{SHORTHAND[key]}"
            loc.where[key] = where
        _check_strings(value, key, loc)
        _set_dotted(raw, key, value, loc)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "data" and parts[1] in SOURCE_KEYS and parts[2] == "path":
            src = raw["data"][parts[1]]
            if isinstance(src.get("path"), str):  # paths given on the command line are relative to the cwd
                src["path"] = os.path.realpath(cwd / os.path.expanduser(src["path"]))
        if key in ("eval.variations", "eval.control") and isinstance(value, str) and value.endswith(FILE_SUFFIXES):
            raw["eval"][parts[1]] = os.path.realpath(cwd / os.path.expanduser(value))
        if key == "chat.template":
            raw["chat"]["template"] = _template_file(value, cwd)
        if key == "sni.dir" and isinstance(value, str):
            raw["sni"]["dir"] = os.path.realpath(cwd / os.path.expanduser(value))
    cfg = _build(Config, raw, "", loc)
    _normalise(cfg)
    check(cfg, loc)
    return cfg


def _normalise(cfg: Config) -> None:
    """Spellings of one value said one way: train.resume true/false (or yes/no) as auto/never."""
    t = cfg.train
    if t.resume is False or t.resume in ("false", "False", "no"):
        t.resume = "never"
    elif t.resume is True or t.resume in ("true", "True", "yes"):
        t.resume = "auto"



def save_config(cfg: Config, path: str | os.PathLike) -> None:
    d = cfg.to_dict()
    for k in ("validation_size", "test_size"):  # a count is written as an integer: 500, not 500.0 (a fraction's form)
        v = d["data"][k]
        if isinstance(v, float) and v >= 1 and v.is_integer():
            d["data"][k] = int(v)
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
