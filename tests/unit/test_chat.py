"""Chat rendering and loss masks: by construction, against hand-written expected masks."""

from __future__ import annotations

import json

import pytest

from tunelab.config import ChatConfig, DataConfig, load_config
from tunelab.data import chat
from tunelab.data.readers import Record
from tunelab.data.types import IGNORE
from tunelab.errors import TunelabError
from tunelab.tasks.chat import encode_chat

# SmolLM2-135M-Instruct's own template (it adds a default system prompt when there is none)
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def expected(tok, pieces):
    """ids and labels from hand-written (text, supervised) pieces."""
    ids, labels = [], []
    for text, sup in pieces:
        p = tok(text, add_special_tokens=False)["input_ids"]
        ids += p
        labels += p if sup else [IGNORE] * len(p)
    return ids, labels


def encode(tok, records, **chat_kw):
    data = DataConfig(max_length=chat_kw.pop("max_length", 512), truncation=chat_kw.pop("truncation", "drop"),
                      empty_target=chat_kw.pop("empty_target", "error"))
    recs = [Record(r, f"chat.jsonl:{i + 1}") for i, r in enumerate(records)]
    return encode_chat(recs, tok, data, ChatConfig(**chat_kw), "train")


def test_chatml_mask_matches_hand_written(tok):
    (ex,), _ = encode(tok, [{"messages": CONV}], template="chatml")
    ids, labels = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>", True),
        ("\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>", True),
    ])
    assert ex.input_ids == ids
    assert ex.labels == labels
    # the end-of-turn token closing each assistant turn is trained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    sup = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert sup.count(im_end) == 2
    assert tok.decode(ex.input_ids[ex.prompt_len:]).startswith("ciao")
    assert ex.completion == "ciao" and ex.shown == "bye"


def test_llama3_mask_matches_hand_written(tok):
    (ex,), _ = encode(tok, [{"messages": CONV}], template="llama3")
    ids, labels = expected(tok, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         False),
        ("hello<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         False),
        ("ciao<|eot_id|>", True),
    ])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_model_template_end_of_turn_comes_from_its_rendering_not_the_eos(tok):
    tok.chat_template = SMOL  # ends a turn with <|im_end|>, and this tokenizer's EOS is <eos>
    try:
        tmpl = chat.resolve_template("model", tok)
        assert (tmpl.stop, tok.eos_token) == ("<|im_end|>", "<eos>")
        (ex,), _ = encode(tok, [{"messages": CONV}], template="model")
        trained = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != -100])
        assert trained == "hello<|im_end|>ciao<|im_end|>"
    finally:
        tok.chat_template = None


def test_template_without_an_end_of_turn_token_is_refused(tok, tmp_path):
    plain = tmp_path / "plain.jinja"  # turns end with a newline: nothing tells the model to stop
    plain.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(TunelabError, match="does not contain the end-of-turn token '<eos>'"):
        encode(tok, [{"messages": CONV}], template=str(plain))


@pytest.fixture
def smol_tok(tiny_chat_model):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_chat_model, eos_token="<|im_end|>")
    t.chat_template = SMOL
    return t


def test_model_template_masks(smol_tok):
    (ex,), _ = encode(smol_tok, [{"messages": CONV[1:]}], template="auto")
    ids, labels = expected(smol_tok, [
        ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>", True),
        ("\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>", True),
    ])
    assert (ex.input_ids, ex.labels) == (ids, labels)


def _sentencepiece_like_tokenizer(corpus: str = "user\nassistant\nhello bye yes no What is it? Be brief."):
    """A Metaspace tokenizer (prepend_scheme="first", as Llama-2 and Mistral fast tokenizers are): it writes
    a leading ▁ at the start of a text, so a piece tokenized on its own differs from the same text inside
    the whole conversation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.train_from_iterator([corpus] * 50, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def test_masks_cut_the_whole_conversation_for_a_sentencepiece_like_tokenizer():
    """The training tokens are the whole rendering's (what chat and evaluation feed the model), each
    assistant turn supervised exactly, the last turn's prompt tokenized as it is on its own."""
    sp = _sentencepiece_like_tokenizer()
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"},
            {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "yes"}]
    (ex,), _ = encode(sp, [{"messages": conv}], template="chatml")
    whole = chat.render(chat.resolve_template("chatml", sp), conv, False, sp, "x")
    assert ex.input_ids == sp(whole.rstrip("\n"), add_special_tokens=False)["input_ids"]
    sup = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE]
    assert sp.decode(sup) == "bye<|im_end|>yes<|im_end|>"
    assert not sp.convert_ids_to_tokens(sup)[0].startswith("\u2581")  # no spurious leading space to learn
    prompt = chat.render(chat.resolve_template("chatml", sp), conv[:3], True, sp, "x")
    assert ex.input_ids[:ex.prompt_len] == sp(prompt, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_joins_prompt_and_answer_into_one_token_is_refused():
    sp = _sentencepiece_like_tokenizer("assistant\nbye user\nhello")  # learns the token "t\nb"
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}]
    with pytest.raises(TunelabError, match="joins text across the start or the end of an assistant turn"):
        encode(sp, [{"messages": conv}], template="chatml")


def test_train_on_last_and_all(tok):
    (last,), _ = encode(tok, [{"messages": CONV}], template="chatml", train_on="last_assistant")
    (every,), _ = encode(tok, [{"messages": CONV}], template="chatml", train_on="all")
    ids, labels = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>", False),
        ("\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>", True),
    ])
    assert (last.input_ids, last.labels) == (ids, labels)
    assert every.labels == every.input_ids


def test_example_weights_from_a_field(tok):
    (ex,), _ = encode(tok, [{"messages": CONV, "score": 0.25}], template="chatml")
    assert ex.weight == 1.0
    recs = [Record({"messages": CONV, "score": 0.25}, "chat.jsonl:1")]
    (w,), _ = encode_chat(recs, tok, DataConfig(weight_field="score"), ChatConfig(template="chatml"), "train")
    assert w.weight == 0.25


def test_system_modes(tok):
    rec = {"messages": CONV}
    (kept,), _ = encode(tok, [rec], template="chatml", system="Default.")
    (replaced,), _ = encode(tok, [rec], template="chatml", system="Default.", system_mode="default")
    (none,), _ = encode(tok, [rec], template="chatml", system="Default.", system_mode="none")
    (added,), _ = encode(tok, [{"messages": CONV[1:]}], template="chatml", system="Default.")
    assert "Be brief." in tok.decode(kept.input_ids)
    assert "Default." in tok.decode(replaced.input_ids) and "Be brief." not in tok.decode(replaced.input_ids)
    assert "system" not in tok.decode(none.input_ids)
    assert tok.decode(added.input_ids).startswith("<|im_start|>system\nDefault.")


def test_formats_map_to_the_same_messages():
    msgs = chat.to_messages({"messages": CONV}, "auto", None, "x")
    share = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                "value": m["content"]} for m in CONV]}
    assert chat.to_messages(share, "auto", None, "x") == msgs
    assert chat.to_messages({"conversation": CONV, "model": "vicuna"}, "auto", None, "x") == msgs
    orca = {"system_prompt": "Be brief.", "question": "hi", "response": "hello"}
    assert chat.to_messages(orca, "auto", None, "x") == msgs[:3]
    assert chat.to_messages({"dialog": json.dumps(CONV)}, "messages", "dialog", "x") == msgs


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "roles out of order, expected user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles out of order"),
    ({"messages": [CONV[1], CONV[2], CONV[0]]}, "system message may only come first"),
    ({"messages": [{"role": "robot", "content": "a"}]}, r"messages\[0\].role: unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string"),
    ({"messages": "hello"}, "is text, not a list of messages"),
    ({"text": "hello"}, "not a conversation"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
    ({"messages": [CONV[1], {"role": "assistant", "content": " "}]}, "empty assistant turn"),
])
def test_bad_conversations(tok, record, match):
    with pytest.raises(TunelabError, match=match) as e:
        encode(tok, [record], template="chatml")
    assert e.value.where == "chat.jsonl:1"


def test_truncation_drops_whole_turns_or_errors(tok):
    (full,), _ = encode(tok, [{"messages": CONV}], template="chatml")
    n_first = len(encode(tok, [{"messages": CONV[:3]}], template="chatml")[0][0].input_ids)
    (cut,), st = encode(tok, [{"messages": CONV}], template="chatml", max_length=len(full.input_ids) - 1,
                        truncation="truncate")
    assert st.truncated == 1
    assert tok.decode(cut.input_ids).endswith("hello<|im_end|>") and len(cut.input_ids) == n_first
    with pytest.raises(TunelabError, match="more than data.max_length"):
        encode(tok, [{"messages": CONV}], template="chatml", max_length=len(full.input_ids) - 1, truncation="error")
    with pytest.raises(TunelabError, match="zero supervised tokens after truncation"):
        encode(tok, [{"messages": CONV}], template="chatml", max_length=n_first - 1, truncation="truncate")
    kept, st = encode(tok, [{"messages": CONV}, {"messages": CONV[:3]}], template="chatml",
                      max_length=len(full.input_ids) - 1, truncation="drop")
    assert len(kept) == 1 and st.dropped_long == 1


def test_truncation_drops_a_trailing_user_turn_first(tok):
    """A conversation that ends with the user's word: that tail carries no supervision and goes first."""
    tail = [*CONV[:3], {"role": "user", "content": "and then?"}]
    (whole,), _ = encode(tok, [{"messages": tail}], template="chatml")
    (three,), _ = encode(tok, [{"messages": CONV[:3]}], template="chatml")
    (cut,), st = encode(tok, [{"messages": tail}], template="chatml", max_length=len(whole.input_ids) - 1,
                        truncation="truncate")
    assert st.truncated == 1 and cut.input_ids == three.input_ids and cut.labels == three.labels


def test_a_message_that_spells_a_special_token_is_refused(tok):
    for content, role in (("yes<|im_end|>", "assistant"), ("hi<|im_start|>assistant\nyes", "user")):
        msgs = [CONV[1], CONV[2]]
        msgs[0 if role == "user" else 1] = {"role": role, "content": content}
        with pytest.raises(TunelabError, match=f"message {0 if role == 'user' else 1} \\({role}\\) contains the "
                                               "special token") as e:
            encode(tok, [{"messages": msgs}], template="chatml")
        assert e.value.where == "chat.jsonl:1"


def write_template(tmp_path, text):
    p = tmp_path / "t.jinja"
    p.write_text(text)
    return str(p)


def test_template_that_is_not_prefix_stable_trains_each_turn_as_its_own_example(tok, tmp_path):
    # renders the final message differently from how it renders it inside a longer conversation
    t = write_template(tmp_path, "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                       "{% if loop.last %}!{% endif %}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    first, second = encode(tok, [{"messages": CONV}], template=t)[0]
    for ex, said, answer in ((first, "hi", "hello"), (second, "bye", "ciao")):
        text = tok.decode(ex.input_ids)
        assert text.endswith(f"<|im_start|>user\n{said}!<|im_end|>\n<|im_start|>assistant\n{answer}!<|im_end|>")
        trained = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
        assert trained == f"{answer}!<|im_end|>"
    assert "(message 2)" in first.where and "(message 4)" in second.where


def test_template_that_does_not_render_the_assistant_turn_is_refused(tok, tmp_path):
    t = write_template(tmp_path, "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n"
                       "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TunelabError, match=r"t.jinja: message 2, an assistant turn, is not found in the rendering"):
        encode(tok, [{"messages": CONV}], template=t)


def test_double_bos_is_refused(tok, tmp_path):
    t = write_template(tmp_path, "{{ bos_token }}{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                       "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                       "{% endif %}")
    with pytest.raises(TunelabError, match="double BOS"):
        encode(tok, [{"messages": CONV}], template=t, stop="<|im_end|>")
    one = write_template(tmp_path, open(t).read().replace("{{ bos_token }}", "", 1))
    (ok,), _ = encode(tok, [{"messages": CONV}], template=one, stop="<|im_end|>")
    assert ok.input_ids[0] == tok.bos_token_id and ok.input_ids[1] != tok.bos_token_id


def test_template_raise_exception_becomes_an_error(tok, tmp_path):
    t = write_template(tmp_path, "{% for m in messages %}{% if 'ciao' in m.content %}{{ raise_exception('no ciao') }}"
                       "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    with pytest.raises(TunelabError, match="refuses this conversation: no ciao"):
        encode(tok, [{"messages": CONV}], template=t)


def test_sandbox_stops_a_template_reaching_python_internals(tok, tmp_path):
    t = write_template(tmp_path, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TunelabError, match="unsafe"):
        encode(tok, [{"messages": CONV}], template=t)
    t = write_template(tmp_path, "{{ messages.append(1) }}")
    with pytest.raises(TunelabError, match="unsafe"):
        encode(tok, [{"messages": CONV}], template=t)


def test_template_needs_its_special_tokens(tiny_model):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(TunelabError, match="needs the special tokens <|im_start|>, <|im_end|>"):
        chat.resolve_template("chatml", plain)
    with pytest.raises(TunelabError, match="unknown chat template 'nope'"):
        chat.resolve_template("nope", plain)


def test_chat_recipe_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: chat\ndata: {train: x.jsonl}\nchat: {template: chatml, train_on: last_assistant}\n")
    cfg = load_config(p)
    assert cfg.chat.template == "chatml" and cfg.chat.train_on == "last_assistant"
    with pytest.raises(TunelabError, match="chat.train_on: must be one of"):
        load_config(p, ["chat.train_on=assistant"])


def test_a_template_file_is_found_next_to_the_recipe_from_any_directory(tmp_path, monkeypatch):
    from tunelab.train.rundir import data_fingerprint, data_fingerprints

    (tmp_path / "recipe").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "recipe" / "t.jinja").write_text(chat.CHATML)
    p = tmp_path / "recipe" / "r.yaml"
    p.write_text("task: chat\ndata: {train: c.jsonl}\nchat: {template: t.jinja, stop: '<|im_end|>'}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(p)
    assert cfg.chat.template == str((tmp_path / "recipe" / "t.jinja").resolve())  # saved so with the run
    (tmp_path / "elsewhere" / "o.jinja").write_text(chat.CHATML)
    assert load_config(p, ["chat.template=o.jinja"]).chat.template == str(tmp_path / "elsewhere" / "o.jinja")
    assert load_config(p, ["chat.template=llama3"]).chat.template == "llama3"
    # a path that is no file there stays as written (a run's config.yaml saved before paths were resolved)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(p.read_text().replace("t.jinja", "old.jinja"))
    assert load_config(tmp_path / "run").chat.template == "old.jinja"
    # a checkpoint written when the run kept the path as written (relative to where it ran) still resumes
    monkeypatch.chdir(tmp_path / "recipe")
    import dataclasses

    as_written = dataclasses.replace(cfg, chat=dataclasses.replace(cfg.chat, template="t.jinja"))
    assert data_fingerprint(as_written, 10) in data_fingerprints(cfg, 10)
    assert data_fingerprint(cfg, 10) in data_fingerprints(cfg, 10)
