"""Templates, readers, tokenization with loss masks, splits, batch order and padding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from tunelab.config import DataConfig, ModelConfig, SourceConfig
from tunelab.data.batching import GROUP_CHUNK, collate, epoch_batches
from tunelab.data.formats import IGNORE, Example, Pair, char_tokens, encode, split_records, to_pairs
from tunelab.data.readers import Record, read_source
from tunelab.data.templates import check_template, fields_of, render
from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer

# ---------------------------------------------------------------- templates

REC = {"name": "Maria", "n": 7, "none": None}


@pytest.mark.parametrize("template, expected", [
    ("{name}", "Maria"),
    ("{name|reverse}", "airaM"),
    ("{name|upper}", "MARIA"),
    ("{name|lower}", "maria"),
    ("{name|len}", "5"),
    ("{name|vowels}", "3"),
    ("{name|consonants}", "2"),
    ("{name|first}", "M"),
    ("{name|last}", "a"),
    ("{name|chars}", "M a r i a"),
    ("{ name | reverse }", "airaM"),
    ("{name|reverse|upper}", "AIRAM"),
    ("{name|chars|len}", "9"),
    ("{name|reverse|first}", "a"),
    ("{n}", "7"),
    ("[{none}]", "[]"),
    ("Reverse the name: {name}. Answer:", "Reverse the name: Maria. Answer:"),
    ("{{name}}", "{name}"),
    ("{{ {name} }}", "{ Maria }"),
    ("{{{name}}}", "{Maria}"),
    ("no fields", "no fields"),
])
def test_render(template, expected):
    check_template(template, "data.prompt")
    assert render(template, REC, "f.jsonl:1") == expected


def test_filters_on_empty_string():
    rec = {"x": ""}
    assert render("[{x|first}][{x|last}][{x|len}][{x|vowels}][{x|reverse}]", rec, "w") == "[][][0][0][]"


def test_vowel_and_consonant_filters_count_case_and_skip_non_letters():
    rec = {"x": "Ode to Anna-Eve 2"}
    assert render("{x|vowels}", rec, "w") == "7"  # O e o A a E e
    assert render("{x|consonants}", rec, "w") == "5"  # d t n n v
    assert render("{x|title}|{x|strip}", {"x": " ab cd "}, "w") == " Ab Cd |ab cd"


def test_fields_of():
    assert fields_of("{a} {{b}} {c|upper} {a}") == ["a", "c", "a"]


def test_render_missing_field_names_record_and_key():
    with pytest.raises(TunelabError) as e:
        render("Q: {question}", {"q": 1}, "data/train.jsonl:7", "data.prompt")
    assert e.value.where == "data/train.jsonl:7"
    assert "'question'" in e.value.message and "data.prompt" in e.value.message
    assert str(e.value).startswith("data/train.jsonl:7: ")


def test_check_template_unknown_filter():
    with pytest.raises(TunelabError, match="unknown filter 'bogus'") as e:
        check_template("{name|upper|bogus}", "data.completion")
    assert e.value.where == "data.completion"
    assert "reverse" in e.value.message  # lists the known filters


@pytest.mark.parametrize("template, match", [
    ("{}", "empty field"),
    ("{ |upper}", "empty field"),
    ("{name", "unbalanced brace"),
    ("name}", "unbalanced brace"),
    ("{a}}", "unbalanced brace"),
])
def test_check_template_syntax_errors(template, match):
    with pytest.raises(TunelabError, match=match) as e:
        check_template(template, "data.prompt")
    assert e.value.where == "data.prompt"


def test_to_pairs_renders_and_checks_templates_before_reading():
    records = [Record({"name": "Ann"}, "f:1"), Record({"name": "Bob"}, "f:2")]
    cfg = DataConfig(prompt="Reverse {name}:", completion=" {name|reverse}")
    assert to_pairs(records, cfg) == [Pair("Reverse Ann:", " nnA", "f:1", {"name": "Ann"}),
                                      Pair("Reverse Bob:", " boB", "f:2", {"name": "Bob"})]
    with pytest.raises(TunelabError, match="unknown filter") as e:
        to_pairs([], DataConfig(completion="{x|nope}"))
    assert e.value.where == "data.completion"
    with pytest.raises(TunelabError, match="missing field 'name'") as e:
        to_pairs([Record({"nom": "x"}, "f:9")], cfg)
    assert e.value.where == "f:9"


# ---------------------------------------------------------------- readers


def _src(path: Path, **kw) -> SourceConfig:
    return SourceConfig(path=str(path), **kw)


def test_read_jsonl_with_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "a", "n": 1}\n\n{"q": "b", "n": 2}\n')
    recs = read_source(_src(p))
    assert [r.fields for r in recs] == [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    assert [r.where for r in recs] == [f"{p}:1", f"{p}:3"]


@pytest.mark.parametrize("text, match, line", [
    ('{"q": "a"}\n{"q": "b"}\n{"q": \n{"q": "d"}\n', "malformed JSON", 3),
    # JSON can spell half of a UTF-16 pair on its own: not text a tokenizer can read
    ('{"q": "ok \\ud83d\\ude00"}\n{"q": "bad \\ud800"}\n', "lone UTF-16 surrogate", 2),
])
def test_read_jsonl_bad_line(tmp_path, text, match, line):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(TunelabError, match=match) as e:
        read_source(_src(p))
    assert e.value.where == f"{p}:{line}"
    assert f"{p}:{line}: " in str(e.value)


def test_read_jsonl_non_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": 1}\n[1, 2]\n')
    with pytest.raises(TunelabError, match="expected a JSON object, got list") as e:
        read_source(_src(p))
    assert e.value.where == f"{p}:2"


def test_read_json_list_and_wrapped(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"q": "a"}, {"q": "b"}]))
    recs = read_source(_src(p))
    assert [r.fields["q"] for r in recs] == ["a", "b"]
    assert [r.where for r in recs] == [f"{p}[0]", f"{p}[1]"]
    p.write_text(json.dumps({"version": 2, "data": [{"q": "c"}]}))
    assert [r.fields for r in read_source(_src(p))] == [{"q": "c"}]
    p.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(TunelabError, match="one list"):
        read_source(_src(p))
    p.write_text(json.dumps([{"q": 1}, 5]))
    with pytest.raises(TunelabError, match="item 1 is not a JSON object"):
        read_source(_src(p))


def test_read_json_malformed_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"q": 1},\n {"q": }\n]\n')
    with pytest.raises(TunelabError, match="malformed JSON") as e:
        read_source(_src(p))
    assert e.value.where == f"{p}:3"


def test_read_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question,answer\nwhat,yes\n\"a, b\",no\n")
    recs = read_source(_src(p))
    assert [r.fields for r in recs] == [{"question": "what", "answer": "yes"}, {"question": "a, b", "answer": "no"}]
    assert [r.where for r in recs] == [f"{p}:2", f"{p}:3"]


def test_read_csv_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n1,2,3\n")
    with pytest.raises(TunelabError, match="more values than header") as e:
        read_source(_src(p))
    assert e.value.where == f"{p}:3"
    p.write_text("")
    with pytest.raises(TunelabError, match="no header"):
        read_source(_src(p))


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a", "b", "c"], "n": [1, 2, 3]}), p)
    recs = read_source(_src(p))
    assert [r.fields for r in recs] == [{"q": "a", "n": 1}, {"q": "b", "n": 2}, {"q": "c", "n": 3}]
    assert [r.where for r in recs] == [f"{p}[row 0]", f"{p}[row 1]", f"{p}[row 2]"]
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(TunelabError, match="cannot read Parquet") as e:
        read_source(_src(bad))
    assert e.value.where == str(bad)


def test_read_text(tmp_path):
    p = tmp_path / "names.txt"
    p.write_text("anna\n\n  bob  \r\n   \ncarl")
    recs = read_source(_src(p, text_field="name"))
    assert [r.fields for r in recs] == [{"name": "anna"}, {"name": "bob"}, {"name": "carl"}]
    assert [r.where for r in recs] == [f"{p}:1", f"{p}:3", f"{p}:5"]
    assert read_source(_src(p))[0].fields == {"text": "anna"}


def test_explicit_format_overrides_extension(tmp_path):
    p = tmp_path / "d.dat"
    p.write_text('{"q": 1}\n')
    with pytest.raises(TunelabError, match="cannot tell the format"):
        read_source(_src(p))
    assert read_source(_src(p, format="jsonl"))[0].fields == {"q": 1}


def test_read_missing_file_and_directory(tmp_path):
    p = tmp_path / "missing.jsonl"
    with pytest.raises(TunelabError, match="data file not found") as e:
        read_source(_src(p))
    assert e.value.where == str(p)
    with pytest.raises(TunelabError, match="is a directory"):
        read_source(_src(tmp_path))


def test_a_byte_order_mark_is_not_data(tmp_path):
    bom = "\ufeff"
    for name, text, first in [("d.txt", "emma\nolivia\n", {"text": "emma"}),
                              ("d.csv", "name\nemma\n", {"name": "emma"}),
                              ("d.jsonl", '{"name": "emma"}\n', {"name": "emma"}),
                              ("d.json", '[{"name": "emma"}]', {"name": "emma"})]:
        p = tmp_path / name
        p.write_text(bom + text, encoding="utf-8")
        assert read_source(_src(p))[0].fields == first, name


def test_csv_quote_left_open_duplicate_header_and_long_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('name\nemma\n"olivia\nava\n')
    with pytest.raises(TunelabError, match="malformed CSV: unexpected end of data \\(a quote opened in this record"):
        read_source(_src(p))
    p.write_text("name,name\nemma,ava\n")
    with pytest.raises(TunelabError, match="the header names 'name' more than once") as e:
        read_source(_src(p))
    assert e.value.where == f"{p}:1"
    p.write_text("text\n" + "a" * 200_000 + "\n")  # over the csv module's default field limit
    assert len(read_source(_src(p))[0].fields["text"]) == 200_000
    # what the usual reading takes still reads: a space after a closing quote, unnamed columns (trailing commas)
    p.write_text('name,x,,\n"abc" ,1,,\nemma,2,,\n')
    assert [(r.fields["name"], r.fields["x"]) for r in read_source(_src(p))] == [("abc ", "1"), ("emma", "2")]


def test_render_refuses_lists_and_objects():
    assert render("{a}|{b}|{c}|{d}", {"a": True, "b": False, "c": 3, "d": None}, "w") == "True|False|3|"
    for value, kind in (([1], "a list"), ({"x": 1}, "a JSON object")):
        with pytest.raises(TunelabError, match=f"field 'a' is {kind}, not text \\(used by data.prompt\\)") as e:
            render("{a}", {"a": value}, "f.jsonl:4", "data.prompt")
        assert e.value.where == "f.jsonl:4"


def test_read_non_utf8(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(TunelabError, match="not UTF-8") as e:
        read_source(_src(p))
    assert e.value.where == str(p)


# ---------------------------------------------------------------- encode


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("tiny_data") / "model")
    return AutoTokenizer.from_pretrained(path)


PROMPT = "Reverse the name: anna. Answer:"


def _ids(tok, text: str, special: bool) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_encode_masks_prompt_and_appends_eos(tok):
    p_ids, t_ids = _ids(tok, PROMPT, True), _ids(tok, " anna", False)
    eos = tok.eos_token_id
    assert eos == 1 and len(p_ids) >= 3 and len(t_ids) >= 1
    examples, stats = encode([Pair(PROMPT, " anna", "f:1")], tok, DataConfig(max_length=64), "train")
    (ex,) = examples
    assert ex.input_ids == p_ids + t_ids + [eos]
    assert ex.labels == [IGNORE] * len(p_ids) + t_ids + [eos]
    assert ex.labels[-1] == eos  # EOS is supervised: the model learns to stop
    assert ex.n_supervised == len(t_ids) + 1
    assert (ex.prompt, ex.completion, ex.where, ex.weight) == (PROMPT, " anna", "f:1", 1.0)
    assert stats.kept == stats.total == 1
    assert stats.lengths == [len(p_ids) + len(t_ids) + 1]
    assert stats.supervised == [len(t_ids) + 1]


def test_encode_without_eos(tok):
    t_ids = _ids(tok, " anna", False)
    (ex,), _ = encode([Pair(PROMPT, " anna", "f:1")], tok, DataConfig(add_eos=False), "train")
    assert ex.labels[-len(t_ids):] == t_ids
    assert ex.n_supervised == len(t_ids)
    assert tok.eos_token_id not in ex.input_ids


def test_completion_tokens_chars_one_token_a_character_same_text(tok):
    usual = _ids(tok, " annabelle", False)
    assert len(usual) < len(" annabelle")  # the tiny tokenizer merges these letters
    cfg = DataConfig(max_length=64, completion_tokens="chars")
    (ex,), stats = encode([Pair(PROMPT, " annabelle", "f:1")], tok, cfg, "train")
    n_p = len(_ids(tok, PROMPT, True))
    target = ex.input_ids[n_p:-1]
    assert [tok.decode([t]) for t in target] == list(" annabelle")
    assert ex.input_ids[:n_p] == _ids(tok, PROMPT, True)  # the prompt keeps the usual tokens
    assert ex.labels == [IGNORE] * n_p + target + [tok.eos_token_id]
    assert stats.supervised == [len(" annabelle") + 1]


def test_char_tokens_bytes_of_a_character_without_a_token(tok):
    (ids,) = char_tokens([" é!"], tok)
    assert tok.decode(ids) == " é!"
    assert len(ids) == 4  # space, the two UTF-8 bytes of é, !


class _PrefixSpaceTokenizer:
    """Like a sentencepiece tokenizer: every call's text starts with a word boundary ("_")."""

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [[ord("_")] + [ord(c) for c in t.replace(" ", "_")] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def batch_decode(self, batch):
        return ["".join(chr(i) for i in ids).replace("_", " ")[1:] for ids in batch]


def test_char_tokens_refuses_a_tokenizer_that_changes_lone_characters():
    with pytest.raises(TunelabError, match="does not spell ' ab' one character at a time") as e:
        char_tokens([" ab"], _PrefixSpaceTokenizer())
    assert e.value.where == "data.completion_tokens"


# ---------------------------------------------------------------- model.bos_token: a start token before prompts


@pytest.fixture(scope="module")
def chat_model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bos") / "model", chat=True)  # a <s> it never adds


def test_bos_token_starts_every_prompt_and_no_completion(chat_model_path, tmp_path):
    plain = load_tokenizer(ModelConfig(name=str(chat_model_path)))
    tok = load_tokenizer(ModelConfig(name=str(chat_model_path), bos_token="<s>"))
    s = tok.convert_tokens_to_ids("<s>")
    text = "ava spelled backwards is"
    assert plain(text)["input_ids"][0] != s
    assert tok(text)["input_ids"] == [s, *plain(text)["input_ids"]]
    assert tok(text, add_special_tokens=False)["input_ids"] == plain(text)["input_ids"]  # chat renderings
    (ex,), _ = encode([Pair(text, " ava", "f:1")], tok, DataConfig(max_length=64), "train")
    assert ex.input_ids == [s, *plain(text)["input_ids"], *plain(" ava", add_special_tokens=False)["input_ids"],
                            tok.eos_token_id]
    assert ex.labels[0] == IGNORE and ex.prompt_len == len(plain(text)["input_ids"]) + 1
    # the tokenizer saved with a run starts texts with <s> too; loading it with the option adds no second one
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(ModelConfig(name=str(chat_model_path), bos_token="<s>"), str(tmp_path / "saved"))
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_bos_token_errors(chat_model_path):
    with pytest.raises(TunelabError, match="'<nope>' is not a token") as e:
        load_tokenizer(ModelConfig(name=str(chat_model_path), bos_token="<nope>"))
    assert e.value.where == "model.bos_token"
    tok = load_tokenizer(ModelConfig(name=str(chat_model_path), bos_token="<s>"))
    saved = chat_model_path.parent / "with_s"
    tok.save_pretrained(saved)
    with pytest.raises(TunelabError, match="already adds special tokens"):
        load_tokenizer(ModelConfig(name=str(chat_model_path), bos_token="<eos>"), str(saved))


def _long_and_short(tok):
    n_p = len(_ids(tok, PROMPT, True))
    short = Pair(PROMPT, " a", "f:1")
    long = Pair(PROMPT, " annabelle annabelle", "f:2")
    n_short = n_p + len(_ids(tok, " a", False)) + 1
    n_long = n_p + len(_ids(tok, " annabelle annabelle", False)) + 1
    assert n_long > n_short + 2
    return n_p, short, long, n_short, n_long


def test_truncation_drop(tok):
    _, short, long, n_short, _ = _long_and_short(tok)
    examples, stats = encode([short, long], tok, DataConfig(max_length=n_short, truncation="drop"), "train")
    assert [e.where for e in examples] == ["f:1"]
    assert (stats.total, stats.kept, stats.dropped_long, stats.truncated) == (2, 1, 1, 0)
    assert stats.summary()["dropped_too_long"] == 1


def test_truncation_truncate(tok):
    n_p, short, long, n_short, _ = _long_and_short(tok)
    max_length = n_p + 2
    examples, stats = encode([short, long], tok, DataConfig(max_length=max_length, truncation="truncate"), "train")
    assert (stats.kept, stats.truncated, stats.dropped_long) == (2, 1, 0)
    ex = examples[1]
    full_target = _ids(tok, " annabelle annabelle", False)
    assert len(ex.input_ids) == max_length
    assert ex.labels == [IGNORE] * n_p + full_target[:2]  # cut: no EOS at the end
    assert ex.input_ids[n_p:] == full_target[:2]
    assert examples[0].input_ids[-1] == tok.eos_token_id  # the short one is untouched


def test_truncation_error(tok):
    _, short, long, n_short, n_long = _long_and_short(tok)
    with pytest.raises(TunelabError, match=f"example has {n_long} tokens, more than data.max_length={n_short}") as e:
        encode([short, long], tok, DataConfig(max_length=n_short, truncation="error"), "train")
    assert e.value.where == "f:2"


def test_truncate_prompt_longer_than_max_length(tok):
    n_p = len(_ids(tok, PROMPT, True))
    with pytest.raises(TunelabError, match="shorter than the prompt") as e:
        encode([Pair(PROMPT, " anna", "f:4")], tok, DataConfig(max_length=n_p, truncation="truncate"), "train")
    assert e.value.where == "f:4"
    assert f"({n_p} tokens)" in e.value.message


def test_all_dropped_is_an_error(tok):
    with pytest.raises(TunelabError, match="all 1 examples dropped: 1 longer") as e:
        encode([Pair(PROMPT, " anna", "f:1")], tok, DataConfig(max_length=3), "validation")
    assert e.value.where == "data.validation"


@pytest.mark.parametrize("completion", ["", "   "])
def test_empty_completion_error_vs_drop(tok, completion):
    pairs = [Pair(PROMPT, " anna", "f:1"), Pair(PROMPT, completion, "f:2")]
    with pytest.raises(TunelabError, match="empty completion") as e:
        encode(pairs, tok, DataConfig(), "train")
    assert e.value.where == "f:2"
    examples, stats = encode(pairs, tok, DataConfig(empty_target="drop"), "train")
    assert [x.where for x in examples] == ["f:1"]
    assert (stats.dropped_empty, stats.kept, stats.total) == (1, 1, 2)


def test_encode_no_pairs(tok):
    examples, stats = encode([], tok, DataConfig(), "test")
    assert examples == [] and stats.total == 0
    assert stats.summary()["examples"] == 0


# ---------------------------------------------------------------- split_records


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def twenty(tmp_path) -> Path:
    return _jsonl(tmp_path / "d.jsonl", [{"q": f"q{i}"} for i in range(20)])


def _qs(records: list[Record]) -> list[str]:
    return [r.fields["q"] for r in records]


def test_split_by_count(twenty):
    s = split_records(DataConfig(train=SourceConfig(path=str(twenty)), validation_size=5), seed=0)
    assert len(s["validation"]) == 5 and len(s["train"]) == 15 and s["test"] == []
    assert sorted(_qs(s["train"]) + _qs(s["validation"])) == sorted(f"q{i}" for i in range(20))


def test_split_by_fraction_and_test(twenty):
    cfg = DataConfig(train=SourceConfig(path=str(twenty)), validation_size=0.25, test_size=0.1)
    s = split_records(cfg, seed=0)
    assert len(s["test"]) == 2  # round(0.1 * 20)
    assert len(s["validation"]) == 4  # round(0.25 * 18): taken from what the test split left
    assert len(s["train"]) == 14
    everything = _qs(s["train"]) + _qs(s["validation"]) + _qs(s["test"])
    assert sorted(everything) == sorted(f"q{i}" for i in range(20))


def test_split_is_seeded(twenty):
    cfg = DataConfig(train=SourceConfig(path=str(twenty)), validation_size=5)
    a, b, c = (split_records(cfg, seed) for seed in (0, 0, 1))
    assert _qs(a["validation"]) == _qs(b["validation"]) and _qs(a["train"]) == _qs(b["train"])
    assert _qs(a["validation"]) != _qs(c["validation"])
    assert _qs(a["validation"]) != [f"q{i}" for i in range(5)]  # shuffled, not the first five


def test_split_seed_fixes_the_held_out_records(twenty):
    # data.split_seed holds out the same records whatever the run's seed; unset, the run's seed splits
    fixed = DataConfig(train=SourceConfig(path=str(twenty)), validation_size=5, test_size=3, split_seed=7)
    a, b = split_records(fixed, seed=0), split_records(fixed, seed=1)
    assert _qs(a["validation"]) == _qs(b["validation"]) and _qs(a["test"]) == _qs(b["test"])
    assert _qs(a["train"]) == _qs(b["train"])
    unset = DataConfig(train=SourceConfig(path=str(twenty)), validation_size=5, test_size=3)
    assert _qs(split_records(unset, seed=7)["validation"]) == _qs(a["validation"])
    assert _qs(split_records(unset, seed=0)["validation"]) != _qs(a["validation"])


def test_no_split_keeps_file_order_and_train_size(twenty):
    s = split_records(DataConfig(train=SourceConfig(path=str(twenty)), train_size=3), seed=0)
    assert _qs(s["train"]) == ["q0", "q1", "q2"]
    assert s["validation"] == []


def test_split_too_large(twenty):
    with pytest.raises(TunelabError, match="leaves no training records") as e:
        split_records(DataConfig(train=SourceConfig(path=str(twenty)), validation_size=20), seed=0)
    assert e.value.where == "data.validation_size"


def test_validation_source_beats_size(tmp_path, twenty):
    val = _jsonl(tmp_path / "v.jsonl", [{"q": "v1"}])
    cfg = DataConfig(train=SourceConfig(path=str(twenty)), validation=SourceConfig(path=str(val)), validation_size=5)
    s = split_records(cfg, seed=0)
    assert _qs(s["validation"]) == ["v1"] and len(s["train"]) == 20


def test_unique_by_dedupes_before_split(tmp_path):
    rows = [{"q": f"n{i % 10}", "i": i} for i in range(40)]  # each of 10 values 4 times
    p = _jsonl(tmp_path / "d.jsonl", rows)
    for seed in range(5):
        s = split_records(DataConfig(train=SourceConfig(path=str(p)), unique_by="q", validation_size=3), seed)
        train_q, val_q = _qs(s["train"]), _qs(s["validation"])
        assert len(val_q) == 3 and len(train_q) == 7
        assert not set(train_q) & set(val_q)
        assert sorted(train_q + val_q) == sorted(f"n{i}" for i in range(10))
        assert all(r.fields["i"] < 10 for r in s["train"] + s["validation"])  # first occurrence kept


def test_unique_by_missing_field(twenty):
    with pytest.raises(TunelabError, match="missing field 'name'") as e:
        split_records(DataConfig(train=SourceConfig(path=str(twenty)), unique_by="name"), 0)
    assert e.value.where == f"{twenty}:1"


def test_empty_train_source(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n")
    with pytest.raises(TunelabError, match="no records"):
        split_records(DataConfig(train=SourceConfig(path=str(p))), 0)


# ---------------------------------------------------------------- epoch_batches


def test_epoch_batches_deterministic_and_complete():
    lengths = [(i * 37) % 23 + 1 for i in range(50)]
    for group in (True, False):
        a = epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=group)
        epoch_batches(lengths, 4, seed=3, epoch=1, group_by_length=group)
        b = epoch_batches(lengths, 4, seed=3, epoch=0, group_by_length=group)
        assert a == b
        flat = [i for batch in a for i in batch]
        assert sorted(flat) == list(range(50))
        assert [len(x) for x in a].count(4) == 12 and sorted(len(x) for x in a)[0] == 2
        assert epoch_batches(lengths, 4, seed=3, epoch=1, group_by_length=group) != a
        assert epoch_batches(lengths, 4, seed=4, epoch=0, group_by_length=group) != a


def test_epoch_batches_without_grouping_is_a_permutation_in_slices():
    a = epoch_batches([1] * 10, 3, seed=0, epoch=0, group_by_length=False)
    assert [len(x) for x in a] == [3, 3, 3, 1]
    assert sorted(i for x in a for i in x) == list(range(10))


def test_epoch_batches_groups_by_length():
    # distinct lengths (a shuffled 0..29): sorting then cutting into batches of 4 gives fixed groups
    g = torch.Generator().manual_seed(0)
    lengths = torch.randperm(30, generator=g).tolist()
    batches = epoch_batches(lengths, 4, seed=7, epoch=2)
    groups = sorted(sorted(lengths[i] for i in b) for b in batches)
    expected = sorted(sorted(range(max(29 - 4 * k - 3, 0), 30 - 4 * k)) for k in range(8))
    assert groups == expected  # [[0, 1], [2, 3, 4, 5], ..., [26, 27, 28, 29]]
    # and the batches are shuffled, not in length order
    order = [max(lengths[i] for i in b) for b in batches]
    assert order != sorted(order) and order != sorted(order, reverse=True)


def test_grouping_is_per_chunk():
    # one chunk (n <= batch_size * GROUP_CHUNK): sorted pairs of distinct consecutive lengths differ by 1
    n = 2 * GROUP_CHUNK
    one = epoch_batches(list(range(n)), 2, seed=0, epoch=0)
    assert sum(max(b) - min(b) for b in one) == GROUP_CHUNK
    # more than one chunk: still every index once, and far less spread than without grouping
    n = 2 * GROUP_CHUNK + 72
    grouped = epoch_batches(list(range(n)), 2, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(n))
    pad_grouped = sum(max(b) - min(b) for b in grouped)
    pad_random = sum(max(b) - min(b) for b in epoch_batches(list(range(n)), 2, 0, 0, group_by_length=False))
    assert n // 2 < pad_grouped < pad_random / 5  # chunks hold non-consecutive lengths, but sorted


# ---------------------------------------------------------------- collate


def _ex(ids, labels, weight=1.0):
    return Example(ids, labels, "p", "c", "w", weight)


def test_collate_right_padding():
    batch = collate([_ex([5, 6, 7], [IGNORE, 6, 7]), _ex([8, 9], [IGNORE, 9], 2.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["weight"].tolist() == [1.0, 2.0]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["weight"].dtype == torch.float32


def test_collate_left_padding():
    batch = collate([_ex([5, 6, 7], [IGNORE, 6, 7]), _ex([8], [8])], pad_id=3, side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]


def test_synthetic_records_are_fitted_on_train_and_never_held_out(tmp_path):
    import random

    from tunelab.config import SyntheticConfig

    rng = random.Random(3)
    names = sorted({"".join(rng.choice("aeilmnorst") for _ in range(rng.randint(4, 7))) for _ in range(600)})
    p = _jsonl(tmp_path / "n.jsonl", [{"name": n} for n in names])
    cfg = DataConfig(train=SourceConfig(path=str(p)), validation_size=100, test_size=50,
                     synthetic=SyntheticConfig(field="name", count=300, order=3))
    s = split_records(cfg, seed=0)
    real = [r for r in s["train"] if not r.where.startswith("data.synthetic")]
    made = [r for r in s["train"] if r.where.startswith("data.synthetic")]
    assert len(real) == len(names) - 150 and 250 <= len(made) <= 300
    assert made[0].where == "data.synthetic[0]" and made[0].fields.keys() == {"name"}
    held = {r.fields["name"] for r in s["validation"] + s["test"]}
    made_names = {r.fields["name"] for r in made}
    assert not made_names & held and not made_names & set(names)  # novel: no real and no held-out value
    assert [r.fields for r in split_records(cfg, seed=0)["train"]] == [r.fields for r in s["train"]]
    fixed = dataclasses.replace(cfg, split_seed=0)  # the split fixed, the synthetic names follow the run's seed
    other = split_records(fixed, seed=1)
    assert [r.fields for r in other["validation"]] == [r.fields for r in s["validation"]]
    assert {r.fields["name"] for r in other["train"] if r.where.startswith("data.synthetic")} != made_names
    with pytest.raises(TunelabError, match="must be a string field") as e:
        split_records(DataConfig(train=SourceConfig(path=str(_jsonl(tmp_path / "x.jsonl", [{"name": 5}]))),
                                 synthetic=SyntheticConfig(field="name", count=3)), seed=0)
    assert e.value.where.endswith("x.jsonl:1")


def test_over_budget_counts_completions_longer_than_max_new_tokens():
    from tunelab.evaluate import over_budget

    def ex(prompt: int, target: list[int]) -> Example:
        ids = list(range(10, 10 + prompt)) + target
        return Example(ids, [IGNORE] * prompt + target, "p", "c", "f:1", prompt_len=prompt)

    eos = 1
    examples = [ex(3, [5, 6, eos]), ex(4, [5, 6, 7, 8, eos]), ex(2, [5, 6, 7]),  # 2, 4, 3 answer tokens
                Example([5, 6], [IGNORE, 6], "p", "c", "f:2")]  # not generated from (no prompt_len)
    assert over_budget(examples, 4, eos) == (0, 4)
    assert over_budget(examples, 3, eos) == (1, 4)
    assert over_budget(examples, 2, eos) == (2, 4)
    assert over_budget(examples, 2, None) == (3, 5)  # no EOS to discount
    assert over_budget([], 2, eos) == (0, 0)
