"""Data files a user can point tunelab at, however wrong: each is read promptly, with bounded work, or
refused on one line naming the file (and line, row, field) — never a hang, a traceback, or a binary
value trained as its repr. Valid data computes exactly what it did."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe
from guard import changes, one_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.config import DataConfig, SourceConfig, load_config
from tunelab.data import formats
from tunelab.data.formats import Pair, encode, to_pairs
from tunelab.data.readers import read_source
from tunelab.data.sni import read_tasks
from tunelab.errors import TunelabError
from tunelab.tasks import build_dataset

SPECIAL = "not a regular file (a device, FIFO or socket)"
NUL = "a NUL byte"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _release(fifo: Path) -> None:
    """Open a FIFO for writing and close it: a reader blocked on it sees the end of the file."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def promptly(fn, *args, fifo: Path | None = None, seconds: float = 20):
    """fn(*args) in a thread; a failure (not a hang) if it is still running after ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            _release(fifo)
            t.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def refused(fn, *args, expected: str, where: str, fifo: Path | None = None) -> TunelabError:
    """fn(*args) raises promptly a one-line TunelabError holding ``expected`` whose place names ``where``."""
    with pytest.raises(TunelabError) as e:
        promptly(fn, *args, fifo=fifo)
    assert expected in e.value.message, str(e.value)
    assert e.value.where is not None and where in e.value.where, str(e.value)
    assert "\n" not in str(e.value)
    return e.value


@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "data.jsonl"
    os.mkfifo(p)
    yield p
    _release(p)


def _src(path, **kw) -> SourceConfig:
    return SourceConfig(path=str(path), **kw)


# ---------------------------------------------------------------- 1. only regular files are data

def test_a_fifo_as_training_data_is_one_line_not_a_hang(tmp_path, tiny_model, names_file, fifo):
    """As a user meets it: `tunelab train` on a recipe whose data.train is a FIFO, in a process of its own."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, names_file,
                          data={"train": {"path": str(fifo), "text_field": "name"}})
    before = snapshot(tmp_path)
    try:
        proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "--quiet", "train", str(recipe)],
                              capture_output=True, text=True, timeout=120, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail("tunelab train was still reading the FIFO after 120 s")
    one_line(proc.returncode, proc.stderr, f"{fifo}: {SPECIAL}")
    assert changes(before, snapshot(tmp_path)) == []


def test_dev_zero_as_training_data_is_refused_before_reading(tmp_path):
    """/dev/zero never ends: read in a process with a memory cap and a timeout, so a regression fails fast."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from tunelab.config import SourceConfig\nfrom tunelab.data.readers import read_source\n"
            "from tunelab.errors import TunelabError\n"
            "try:\n    read_source(SourceConfig(path='/dev/zero', format='text'))\n"
            "except TunelabError as e:\n    print(e)\n    sys.exit(2)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.fail("still reading /dev/zero after 60 s")
    assert proc.returncode == 2 and proc.stdout.strip() == f"/dev/zero: {SPECIAL}", proc.stdout + proc.stderr


def test_a_fifo_as_validation_data(tmp_path, fifo):
    cfg = DataConfig(train=_src(tmp_path / "t.txt", text_field="name"), validation=_src(fifo))
    (tmp_path / "t.txt").write_text("emma\nliam\n")
    refused(formats.split_records, cfg, 0, expected=SPECIAL, where=str(fifo), fifo=fifo)


def test_a_link_to_a_fifo_and_a_socket(tmp_path, fifo):
    link = tmp_path / "link.jsonl"
    link.symlink_to(fifo)
    refused(read_source, _src(link), expected=SPECIAL, where=str(link), fifo=fifo)
    sock_path = tmp_path / "s.jsonl"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        refused(read_source, _src(sock_path), expected=SPECIAL, where=str(sock_path))
    real = tmp_path / "real.jsonl"  # a link to a regular file is data
    real.write_text('{"q": "a"}\n')
    (tmp_path / "ok.jsonl").symlink_to(real)
    assert [r.fields for r in read_source(_src(tmp_path / "ok.jsonl"))] == [{"q": "a"}]


def test_a_fifo_as_an_sni_task_file(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "good.json").write_text(json.dumps({"Definition": "Copy.", "Instances": [{"input": "a", "output": "a"}]}))
    os.mkfifo(d / "task2.json")
    try:
        refused(read_tasks, str(d), expected=SPECIAL, where=str(d / "task2.json"), fifo=d / "task2.json")
    finally:
        _release(d / "task2.json")


def test_a_directory_named_like_an_sni_task_file(tmp_path):
    d = tmp_path / "tasks"
    (d / "sub.json").mkdir(parents=True)
    refused(read_tasks, str(d), expected="is a directory", where=str(d / "sub.json"))


def test_a_fifo_as_the_variations_file(fifo):
    from tunelab.probes import load_variations

    v = fifo.with_suffix(".yaml")
    fifo.rename(v)
    try:
        refused(load_variations, str(v), expected=SPECIAL, where=str(v), fifo=v)
    finally:
        _release(v)


def test_a_fifo_as_the_control_set(fifo):
    from tunelab.probes import load_control

    refused(load_control, str(fifo), expected=SPECIAL, where=str(fifo), fifo=fifo)


def test_a_fifo_as_generate_input(fifo):
    from tunelab.gen_data import prompts_from_file

    refused(prompts_from_file, str(fifo), "prompt", expected=SPECIAL, where=str(fifo), fifo=fifo)


def test_a_fifo_as_self_instruct_seeds(fifo):
    from tunelab.selfinstruct import read_seeds

    refused(read_seeds, str(fifo), expected=SPECIAL, where=str(fifo), fifo=fifo)


# ---------------------------------------------------------------- 2. bounded work

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_jsonl_is_one_line_naming_the_line(tmp_path, tiny_model, capfd):
    data = tmp_path / "deep.jsonl"
    data.write_text(f'{{"prompt": "a", "completion": "b"}}\n{{"prompt": {DEEP}, "completion": "b"}}\n')
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, data,
                          data={"train": str(data), "prompt": "{prompt}", "completion": "{completion}",
                                "unique_by": None, "validation_size": 0})
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(recipe)], capfd)
    one_line(code, err, f"{data}:2: JSON nested too deeply")
    assert changes(before, snapshot(tmp_path)) == []


def test_deep_json_file_names_the_line(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text('[\n{"q": "a"},\n{"q": ' + DEEP + "}\n]\n")
    refused(read_source, _src(p), expected="JSON nested too deeply", where=f"{p}:3")


def test_deep_sni_task_names_the_file(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t.json").write_text('{"Definition": "x",\n "Instances": ' + DEEP + "}")
    refused(read_tasks, str(d), expected="JSON nested too deeply", where=f"{d / 't.json'}:2")


def test_deep_yaml_variations_names_the_file(tmp_path):
    from tunelab.probes import load_variations

    p = tmp_path / "v.yaml"
    p.write_text(DEEP)
    refused(load_variations, str(p), expected="nested too deeply", where=str(p))


def test_a_number_python_will_not_convert_is_one_line(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text('{"q": "a"}\n{"q": ' + "9" * 5000 + "}\n")
    refused(read_source, _src(p), expected="a number of more than", where=f"{p}:2")


def test_min_tokens_and_cannot_fit_by_hand():
    from tunelab.data.lengths import TokenBound, cannot_fit, min_tokens

    assert min_tokens(0, 7) == 0 and min_tokens(1, 7) == 1 and min_tokens(14, 7) == 2 and min_tokens(15, 7) == 3
    assert not cannot_fit(48 * 7, 48, 7)  # 336 characters may be 48 tokens of 7: they may fit
    assert cannot_fit(48 * 7 + 1, 48, 7)  # 337 need at least 49 tokens
    assert not cannot_fit(10**9, 48, None)  # no bound known: tokenize to tell
    b = TokenBound(7, dropped="\x04")
    assert b.min_tokens(("a" * 8, "\x04" * 100)) == 2  # the dropped characters count for nothing
    assert b.cannot_fit(("a" * 337,), 48) and not b.cannot_fit(("a" * 300, "\x04" * 100), 48)
    assert b.makes_tokens("a\x04") and not b.makes_tokens("\x04\x04") and not TokenBound(7).makes_tokens("")


def _tok(model=None, normalizer=None, pre_tokenizer=None, added=None, **kw):
    """A small fast tokenizer assembled from tokenizers parts."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(model or models.BPE(**kw))
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer if pre_tokenizer is not None else pre_tokenizers.ByteLevel(add_prefix_space=False)
    if model is None:
        tk.train_from_iterator(["Reverse the name: emma. Answer: amme"] * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
    if added is not None:
        tk.add_special_tokens([AddedToken(added, rstrip=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def test_the_bound_of_each_kind_of_tokenizer(tiny_model):
    from tokenizers import models, normalizers, pre_tokenizers

    from tunelab.config import ModelConfig
    from tunelab.data.lengths import TokenBound, token_bound
    from tunelab.models import load_tokenizer

    tiny = load_tokenizer(ModelConfig(name=str(tiny_model)))
    b = token_bound(tiny)
    assert b == TokenBound(max(len(t) for t in tiny.get_vocab()), "")  # byte-level BPE: the longest token
    assert token_bound(_tok()).chars_per_token == max(len(t) for t in _tok().get_vocab())
    nfc = _tok(normalizer=normalizers.NFC())
    assert token_bound(nfc).chars_per_token == 4 * max(len(t) for t in nfc.get_vocab())  # 4 code points -> 1
    # what can make one token of any number of characters, or none: no bound, every text tokenized
    assert token_bound(_tok(normalizer=normalizers.Strip())) is None  # strips spaces, however many
    assert token_bound(_tok(normalizer=normalizers.Replace(" ", ""))) is None
    assert token_bound(_tok(pre_tokenizer=pre_tokenizers.Whitespace())) is None  # drops whitespace
    assert token_bound(_tok(added="<|x|>")) is None  # rstrip: covers the spaces after it
    assert token_bound(_tok(model=models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))) is None
    assert token_bound(_tok(model=models.BPE({"<eos>": 0, "a": 1}, [], unk_token="<eos>", fuse_unk=True),
                            pre_tokenizer=pre_tokenizers.Metaspace())) is None
    # a byte-level BPE without a token for a byte and no unknown token drops that byte's character
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = [c for c in ByteLevel.alphabet() if c != "Ą"]  # Ą: byte 0x04 in GPT-2's byte alphabet
    holed = _tok(model=models.BPE({c: i for i, c in enumerate(["<eos>", *alphabet])}, []))
    assert holed("\x04" * 50, add_special_tokens=False)["input_ids"] == []
    assert token_bound(holed) == TokenBound(5, "\x04")


PIECES = st.one_of(st.text(max_size=40), st.sampled_from(
    ["<eos>", "<pad>", "<unk>", " " * 60, "\u0301" * 20, "e\u0301", "\u1100\u1161\u11a8", "\x00", "\x04" * 9,
     "\U00041234", "\n\n\n", "😀", "中文", "Reverse the name: emma. Answer:"]))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(PIECES, max_size=12), st.booleans(), st.sampled_from(["tiny", "nfc", "metaspace", "holed"]))
def test_no_text_makes_fewer_tokens_than_the_bound(tokenizers, parts, special, kind):
    """The claim itself, on random text with special tokens, combining marks, long runs of spaces."""
    from tunelab.data.lengths import token_bound

    tok = tokenizers[kind]
    text = "".join(parts)
    bound = token_bound(tok)
    assert bound is not None
    n = len(tok(text, add_special_tokens=special)["input_ids"])
    assert n >= bound.min_tokens((text,)), (text, n, bound)


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.config import ModelConfig
    from tunelab.models import load_tokenizer

    llama = T(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))  # SentencePiece-like
    llama.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    llama.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    llama.train_from_iterator(["Reverse the name: emma. Answer: amme naïve café 中文"] * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]],
        show_progress=False))
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = [c for c in ByteLevel.alphabet() if c != "Ą"]
    return {"tiny": load_tokenizer(ModelConfig(name=str(tiny_model))), "nfc": _tok(normalizer=normalizers.NFC()),
            "metaspace": PreTrainedTokenizerFast(tokenizer_object=llama, unk_token="<unk>", eos_token="</s>"),
            "holed": _tok(model=models.BPE({c: i for i, c in enumerate(["<eos>", *alphabet])}, []),
                          pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))}


def _pairs() -> list[Pair]:
    """Names and texts around the bound (48 tokens of at most 7 characters: 336), some far over it."""
    names = (Path(__file__).resolve().parents[2] / "data" / "names.txt").read_text().split()[:300]
    pairs = [Pair(f"Reverse the name: {n}. Answer:", f" {n[::-1]}", f"n:{i}") for i, n in enumerate(names)]
    for i, k in enumerate([30, 100, 300, 330, 336, 337, 340, 400, 2000, 50_000]):
        pairs.append(Pair("Reverse the name: " + "ab " * (k // 3), " x" * (k // 2), f"long:{i}"))
        pairs.append(Pair("Q:", "emma" * k, f"word:{i}"))
        pairs.append(Pair("Q:" + "\x04" * k, "\x04" * k + "a", f"control:{i}"))
        pairs.append(Pair("Q:", "\x04" * k, f"control-only:{i}"))
        pairs.append(Pair("Q:", " " * k, f"blank:{i}"))
    return pairs


@pytest.mark.parametrize("kind", ["tiny", "holed"])
@pytest.mark.parametrize("empty_target, completion_tokens", [("drop", "bpe"), ("drop", "chars"), ("error", "bpe")])
def test_examples_are_identical_with_and_without_the_shortcut(tokenizers, monkeypatch, kind, empty_target,
                                                              completion_tokens):
    from tunelab.data.lengths import token_bound

    tok = tokenizers[kind]
    if tok.eos_token_id is None:
        pytest.skip("no EOS")
    cfg = DataConfig(max_length=48, truncation="drop", empty_target=empty_target, completion_tokens=completion_tokens)
    pairs = _pairs()
    if empty_target == "error":
        pairs = [p for p in pairs if p.completion.strip() and not p.where.startswith("control")]
    bound = token_bound(tok)
    seen: list[str] = []
    real = formats.tokenize

    def spy(texts, *a, **kw):
        seen.extend(texts)
        return real(texts, *a, **kw)

    monkeypatch.setattr(formats, "tokenize", spy)
    fast, fast_stats = encode(pairs, tok, cfg, "train")
    assert not [t for t in seen if bound.cannot_fit((t,), 48)], "a text too long to fit was tokenized"
    monkeypatch.setattr(formats, "token_bound", lambda tok: None)
    slow, slow_stats = encode(pairs, tok, cfg, "train")
    assert fast_stats == slow_stats and fast_stats.dropped_long >= 10
    assert [(e.input_ids, e.labels, e.where, e.prompt_len) for e in fast] == \
           [(e.input_ids, e.labels, e.where, e.prompt_len) for e in slow]


def test_a_long_example_is_refused_without_tokenizing_under_truncation_error(tokenizers):
    cfg = DataConfig(max_length=48, truncation="error")
    with pytest.raises(TunelabError, match=r"example has at least \d+ tokens, more than data.max_length=48"):
        promptly(encode, [Pair("Q:", "emma" * 10_000, "f.jsonl:3")], tokenizers["tiny"], cfg, "train", seconds=5)


def test_a_60_mb_line_is_dropped_in_seconds(tmp_path, tiny_model):
    """One 60 MB record among names: dropped (data.truncation: drop, the default) without tokenizing it."""
    from tunelab.models import load_tokenizer

    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"prompt": f"Reverse the name: {n}. Answer:", "completion": f" {n[::-1]}"})
            for n in ("emma", "liam", "olivia", "noah")]
    with open(data, "w") as f:
        f.write("\n".join(rows[:2]) + "\n")
        f.write(json.dumps({"prompt": "Q:", "completion": "emma liam " * 6_000_000}) + "\n")
        f.write("\n".join(rows[2:]) + "\n")
    cfg = load_config(write_recipe(tmp_path / "r.yaml", tiny_model, data, data={
        "train": str(data), "prompt": "{prompt}", "completion": "{completion}", "unique_by": None,
        "validation_size": 0}))
    tok = load_tokenizer(cfg.model)
    start = time.monotonic()
    splits, stats, _ = build_dataset(cfg, tok)
    took = time.monotonic() - start
    assert stats["train"]["dropped_too_long"] == 1 and len(splits["train"]) == 4
    assert took < 30, f"{took:.0f} s"


# ---------------------------------------------------------------- 3. only text is text

@pytest.mark.parametrize("name, content, line", [
    ("names.txt", b"emma\nol\x00ivia\n", 2),
    ("data.csv", b"name\nemma\nol\x00ivia\n", 3),
    ("data.jsonl", b'{"name": "emma"}\n{"name": "ol\x00ivia"}\n', 2),
    ("data.json", b'[{"name": "emma"},\n{"name": "ol\x00ivia"}]\n', 2),
    ("utf16.csv", "name\nemma\n".encode("utf-16-le"), 1),  # UTF-16 without a byte order mark
])
def test_a_nul_byte_is_refused_naming_the_line(tmp_path, name, content, line):
    p = tmp_path / name
    p.write_bytes(content)
    refused(read_source, _src(p, text_field="name"), expected=NUL, where=f"{p}:{line}")


def test_a_nul_byte_in_training_data_is_one_line(tmp_path, tiny_model, capfd):
    data = tmp_path / "names.txt"
    data.write_bytes(b"emma\nliam\nol\x00ivia\nnoah\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, data, data={"validation_size": 0})
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(recipe)], capfd)
    one_line(code, err, f"{data}:3: {NUL}")
    assert changes(before, snapshot(tmp_path)) == []


def _parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_a_parquet_binary_column_is_not_trained_as_its_repr(tmp_path, tiny_model, capfd):
    data = _parquet(tmp_path / "d.parquet", name=[b"emma", b"liam", b"noah"])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, data, data={"validation_size": 0})
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(recipe)], capfd)
    one_line(code, err, f"{data}[row 0]: field 'name' is binary data (bytes), not text (used by data.prompt)")
    assert changes(before, snapshot(tmp_path)) == []
    data = _parquet(tmp_path / "d2.parquet", name=["emma", "liam"], image=[b"\x89PNG", b"\x89PNG"])
    pairs = to_pairs(read_source(_src(data)), DataConfig(prompt="{name}:", completion=" {name|reverse}"))
    assert [(p.prompt, p.completion) for p in pairs] == [("emma:", " amme"), ("liam:", " mail")]  # unused: fine


def test_binary_values_in_classification_and_instruction_templates(tmp_path):
    from tunelab.config import ClassifyConfig, TaskConfig, TemplateConfig
    from tunelab.data.instruct import render_pair, resolve_task
    from tunelab.tasks.classification import label_names

    data = _parquet(tmp_path / "d.parquet", text=["fine", "bad"], label=[b"pos", b"neg"])
    records = read_source(_src(data))
    with pytest.raises(TunelabError, match="field 'label' is binary data") as e:
        label_names(records, ClassifyConfig(text="{text}", label="{label}"))
    assert e.value.where == f"{data}[row 0]"
    task = resolve_task(TaskConfig(name="t", templates=[TemplateConfig(prompt="{label}?", completion="{text}")]), 0)
    import random

    with pytest.raises(TunelabError, match="field 'label' is binary data") as e:
        render_pair(task, task.templates[0], records[1], random.Random(0))
    assert e.value.where == f"{data}[row 1]"


# ---------------------------------------------------------------- 4. any bytes: records or one line

HOSTILE = st.lists(st.one_of(
    st.binary(max_size=60), st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\x00", b"\n", b",", b'"', b"{", b"}", b"[", b"]", b'{"a": "b"}\n', b"[" * 3000,
                     b"9" * 5000, b"\xef\xbb\xbf", b"\r", b'"\\ud800"', b"\\u0000"])), max_size=8).map(b"".join)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(HOSTILE, st.sampled_from(["jsonl", "csv", "text", "json"]))
def test_any_bytes_read_as_records_or_one_line_naming_the_file(tmp_path_factory, content, fmt):
    """Arbitrary bytes as a data file: records, or a TunelabError on one line naming the file (a file with a
    NUL byte is not text: always the error) — never another exception, never a hang."""
    p = tmp_path_factory.mktemp("any") / f"data.{'txt' if fmt == 'text' else fmt}"
    p.write_bytes(content)
    try:
        records = promptly(read_source, _src(p), seconds=10)
    except TunelabError as e:
        assert "\n" not in str(e) and e.where is not None and e.where.startswith(str(p)), str(e)
    else:
        assert b"\x00" not in content, "a NUL byte was read as text"
        assert all(isinstance(r.fields, dict) and r.where.startswith(str(p)) for r in records)


def test_variations_file_not_utf8_is_one_line(tmp_path):
    from tunelab.probes import load_variations

    p = tmp_path / "v.yaml"
    p.write_bytes(b"- prompt: caf\xe9\n  completion: x\n")
    refused(load_variations, str(p), expected="not UTF-8", where=str(p))
    p.write_text(yaml.safe_dump([{"prompt": "Q: {name}", "completion": " {name|reverse}"}]))  # a valid one reads
    assert [(t.prompt, t.completion) for t in load_variations(str(p)).templates] == [("Q: {name}", " {name|reverse}")]


