"""Read records (dicts) from JSONL, JSON, CSV, Parquet, plain text, or an HF dataset.

Every record remembers where it came from (``file:line``) so that later errors can name it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import SourceConfig
from ..errors import TunelabError, one_line
from .types import Record

csv.field_size_limit(2**31 - 1)  # a long text field (a document, a conversation) is data, not an error

_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
        ".txt": "text", ".text": "text"}


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = Path(path).suffix.lower()
    if ext not in _EXT:
        raise TunelabError(f"cannot tell the format from the extension {ext!r}; set format "
                           f"(jsonl, json, csv, parquet, text)", path)
    return _EXT[ext]


def check_file(path: str, missing: str = "data file not found") -> None:
    """A file to read data from must be a regular file (or a link to one): a device (/dev/zero), a FIFO or
    a socket would be read forever or block. ``os.stat`` does not open it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TunelabError(missing, path) from None
    except OSError as e:  # a loop of links, a name too long, a directory that cannot be searched
        raise TunelabError(f"cannot read: {e.strerror or one_line(e)}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise TunelabError("is a directory, not a data file", path)
    if not stat.S_ISREG(st.st_mode):
        raise TunelabError("not a regular file (a device, FIFO or socket)", path)


def read_source(src: SourceConfig) -> list[Record]:
    if src.dataset is not None:
        return _read_hf(src)
    assert src.path is not None
    path = src.path
    check_file(path)
    fmt = detect_format(path, src.format)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
              "text": _read_text}[fmt]
    try:
        return reader(path, src)
    except UnicodeDecodeError as e:
        raise TunelabError(f"not UTF-8 text ({one_line(e)})", path) from None
    except OSError as e:  # no permission to read, an I/O error
        raise TunelabError(f"cannot read: {e.strerror or one_line(e)}", path) from None


NUL = "a NUL byte: binary data (or UTF-16 text), not UTF-8 text"


def _lines(f, path: str) -> Iterator[tuple[int, str]]:
    """The file's lines, numbered from 1; a NUL byte, which no text holds, is an error."""
    for i, line in enumerate(f, 1):
        if "\x00" in line:
            raise TunelabError(NUL, f"{path}:{i}")
        yield i, line


def _read_text(path: str, src: SourceConfig) -> list[Record]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in _lines(f, path):
            line = line.rstrip("\r\n")
            if line.strip():
                out.append(Record({src.text_field: line.strip()}, f"{path}:{i}"))
    return out


def parse_json(text: str, path: str, line: int | None = None) -> Any:
    """json.loads, its failures one line naming ``path:line`` (``line``: the line ``text`` is, for JSONL):
    malformed JSON, nesting deeper than Python's stack, a number of more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TunelabError(f"malformed JSON: {e.msg} (column {e.colno})", f"{path}:{line or e.lineno}") from None
    except RecursionError:
        raise TunelabError("JSON nested too deeply (more [ and { inside each other than Python reads)",
                           f"{path}:{line or _deepest_line(text)}") from None
    except ValueError:  # an integer of more digits than int() converts
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise TunelabError(f"a number of more than {digits} digits (write it as a string)",
                           f"{path}:{line}" if line else path) from None


_JSON_MARKS = re.compile(r'[\[\]{}"\\\n]')


def _deepest_line(text: str) -> int:
    """The line where JSON's nesting is deepest (outside strings): where a too-deep nesting is."""
    depth = best = 0
    line = best_line = 1
    in_str = escaped = False
    for m in _JSON_MARKS.finditer(text):
        c = m.group()
        if escaped:  # the character after a backslash in a string
            escaped = False
            line += c == "\n"
        elif c == "\n":
            line += 1
        elif in_str:
            escaped, in_str = c == "\\", c != '"'
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif c in "]}":
            depth -= 1
    return best_line


def _read_jsonl(path: str, src: SourceConfig) -> list[Record]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in _lines(f, path):
            if not line.strip():
                continue
            obj = parse_json(line, path, i)
            if not isinstance(obj, dict):
                raise TunelabError(f"expected a JSON object, got {type(obj).__name__}", f"{path}:{i}")
            if "\\ud" in line.lower():
                _check_surrogates(obj, f"{path}:{i}")
            out.append(Record(obj, f"{path}:{i}"))
    return out


def _check_surrogates(obj: dict, where: str) -> None:
    """JSON can spell half of a UTF-16 pair (\\ud800) on its own: not text any tokenizer can read."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise TunelabError("JSON nested too deeply (more [ and { inside each other than Python reads)",
                           where) from None
    except UnicodeEncodeError:
        raise TunelabError("a string holds a lone UTF-16 surrogate (an escape such as \\ud800 without its "
                           "pair): not valid text", where) from None


def whole_text(path: str, encoding: str = "utf-8-sig") -> str:
    """A text file's contents; a NUL byte, which no text holds, is an error naming its line."""
    text = Path(path).read_text(encoding=encoding)
    nul = text.find("\x00")
    if nul >= 0:
        raise TunelabError(NUL, f"{path}:{text.count(chr(10), 0, nul) + 1}")
    return text


def _read_json(path: str, src: SourceConfig) -> list[Record]:
    text = whole_text(path)
    obj = parse_json(text, path)
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]} style
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TunelabError("expected a JSON list of objects (or an object holding one list)", path)
        obj = lists[0]
    if not isinstance(obj, list):
        raise TunelabError("expected a JSON list of objects", path)
    out = []
    escapes = "\\ud" in text.lower()
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise TunelabError(f"item {i} is not a JSON object", path)
        if escapes:
            _check_surrogates(item, f"{path}[{i}]")
        out.append(Record(item, f"{path}[{i}]"))
    return out


def _read_csv(path: str, src: SourceConfig) -> list[Record]:
    try:  # strict finds a quote left open (else it swallows the rest of the file); it also refuses what the
        return _csv_records(path, strict=True)  # usual reading takes (`"a" ,b`): read those as usual
    except csv.Error:
        return _csv_records(path, strict=False)


def _csv_records(path: str, strict: bool) -> list[Record]:
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader((line for _, line in _lines(f, path)), strict=strict)
        line = 0
        try:
            if not reader.fieldnames:
                raise TunelabError("CSV file has no header row", path)
            names = [c for c in reader.fieldnames if c.strip()]  # unnamed columns (trailing commas) are no field
            dupes = sorted({c for c in names if names.count(c) > 1})
            if dupes:
                raise TunelabError(f"the header names {', '.join(map(repr, dupes))} more than once", f"{path}:1")
            line = reader.line_num  # the header's
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise TunelabError("more values than header columns", f"{path}:{line}")
                out.append(Record(dict(row), f"{path}:{line}"))
        except csv.Error as e:
            if strict and "end of data" not in str(e):
                raise
            # the record after the last one read: where a quote left open begins
            hint = " (a quote opened in this record is never closed)" if "end of data" in str(e) else ""
            raise TunelabError(f"malformed CSV: {one_line(e)}{hint}", f"{path}:{line + 1}") from None
    return out


def _read_parquet(path: str, src: SourceConfig) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise TunelabError("reading Parquet needs pyarrow: pip install pyarrow", path) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types
        raise TunelabError(f"cannot read Parquet: {one_line(e)}", path) from None
    return [Record(row, f"{path}[row {i}]") for i, row in enumerate(table.to_pylist())]


def _read_hf(src: SourceConfig) -> list[Record]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise TunelabError("loading a dataset by name needs the datasets package", src.dataset) from None
    try:
        ds = datasets.load_dataset(src.dataset, src.subset, split=src.split)
    except Exception as e:  # datasets raises many kinds (network, missing split, ...)
        raise TunelabError(f"cannot load dataset: {one_line(e)[:300]}", f"dataset {src.dataset}") from None
    return [Record(dict(row), f"{src.dataset}[{src.split}][{i}]") for i, row in enumerate(ds)]
