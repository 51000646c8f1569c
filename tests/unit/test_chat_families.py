"""The published chat templates of the model families people fine-tune (tests/fixtures/chat_templates, sources
in SOURCES.md there), each with a tokenizer that carries the family's special tokens: single- and multi-turn
conversations, with and without a system prompt. The supervised text is written by hand: each assistant
turn's content and its end-of-turn marker, nothing else; the whole rendering is compared with transformers'
``apply_chat_template``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from tunelab.config import ChatConfig, DataConfig
from tunelab.data import chat
from tunelab.data.readers import Record
from tunelab.data.types import IGNORE
from tunelab.errors import TunelabError
from tunelab.tasks.chat import encode_chat

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# family -> template file, tokenizer (bos, eos, special tokens, SentencePiece-like?), the end-of-turn token,
# and the supervised text of an assistant turn whose content is {c}, as the model's own rendering has it
FAMILIES = {
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"], False,
                 "<|eot_id|>", "{c}<|eot_id|>"),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"], False,
                 "<|eot_id|>", "{c}<|eot_id|>"),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], False,
                "<|im_end|>", "{c}<|im_end|>"),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], False,
              "<|im_end|>", "<think>\n\n</think>\n\n{c}<|im_end|>"),
    "gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True,
               "<end_of_turn>", "{c}<end_of_turn>"),
    "gemma3": ("google-gemma-3-it.jinja", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True,
               "<end_of_turn>", "{c}<end_of_turn>"),
    "mistral-v0.3": ("mistralai-Mistral-7B-Instruct-v0.3.jinja", "<s>", "</s>",
                     ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"], True,
                     "</s>", " {c}</s>"),
    "phi-3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>",
                ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], True, "<|end|>", "{c}<|end|>"),
    "phi-4-mini": ("microsoft-Phi-4-mini-instruct.jinja", "<|endoftext|>", "<|endoftext|>",
                   ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"], False,
                   "<|end|>", "{c}<|end|>"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], False,
                "<|im_end|>", "{c}<|im_end|>"),
}

SYSTEM = {"role": "system", "content": "Answer in one word."}
SHAPES = {
    "single": [{"role": "user", "content": "Reverse the name Anna."}, {"role": "assistant", "content": "annA"}],
    "multi": [{"role": "user", "content": "Reverse the name Anna."}, {"role": "assistant", "content": "annA"},
              {"role": "user", "content": "And Emma?"}, {"role": "assistant", "content": "ammE"},
              {"role": "user", "content": "And Olivia?"}, {"role": "assistant", "content": "aivilO"}],
}

# templates that render earlier turns differently once the conversation goes on: one example per turn
# (Qwen3 drops the reasoning block of earlier turns; Mistral puts the system prompt in the last user turn)
PER_TURN = {("qwen3", "multi", False), ("qwen3", "multi", True), ("mistral-v0.3", "single", True),
            ("mistral-v0.3", "multi", True)}


@cache
def family_tokenizer(family: str):
    """A small BPE tokenizer that knows the family's special tokens (SentencePiece-like where the family's is)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    file, bos, eos, specials, spm, _, _ = FAMILIES[family]
    tokens = list(dict.fromkeys([t for t in (bos, eos) if t] + specials))
    words = ("Reverse the name Anna annA And Emma ammE Olivia aivilO Answer in one word system user assistant "
             "model Cutting Knowledge Date December Today think You are Qwen created by Alibaba Cloud helpful "
             "SmolLM Hugging Face Metadata Reasoning Mode Custom Instructions").split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    tk = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    if spm:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted({ch for line in corpus for ch in line} | set("▁?.\n!,:-0123456789#/"))
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    if family == "qwen3":  # Qwen3's reasoning markers are added tokens, not special ones
        from tokenizers import AddedToken

        tk.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                  additional_special_tokens=[t for t in specials if t not in (bos, eos)])
    tok.chat_template = (FIXTURES / file).read_text(encoding="utf-8")
    return tok


def encode(tok, messages, **chat_kw):
    ccfg = ChatConfig(**{"template": "model", **chat_kw})
    shapes: dict = {}
    examples, _ = encode_chat([Record({"messages": messages}, "chat.jsonl:1")], tok,
                              DataConfig(max_length=4096), ccfg, "train", shapes)
    return examples, shapes


def supervised_runs(tok, ids, labels) -> list[str]:
    """The text of each run of supervised tokens, read off the decoded sequence (so a SentencePiece word's
    leading space is kept)."""
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None

    def text(n: int) -> str:
        return tok.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [text(b)[len(text(a)):] for a, b in runs]


def conversation(shape: str, system: bool) -> list[dict]:
    return ([SYSTEM] if system else []) + SHAPES[shape]


CASES = [(f, s, sy) for f in FAMILIES for s in SHAPES for sy in (False, True)]


@pytest.mark.parametrize(("family", "shape", "system"), CASES, ids=[f"{f}-{s}{'-system' if sy else ''}"
                                                                     for f, s, sy in CASES])
def test_family_masks_are_each_turns_text_and_end_of_turn(family, shape, system):
    tok = family_tokenizer(family)
    messages = conversation(shape, system)
    answer_format, eot = FAMILIES[family][6], FAMILIES[family][5]
    examples, shapes = encode(tok, messages)
    assert chat.resolve_template("model", tok).stop == eot == shapes["end_of_turn"]
    fitted = messages
    if system and family == "gemma2":  # Gemma 2's template refuses a system message: folded by default
        fitted = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{messages[1]['content']}"}, *messages[2:]]
        assert shapes["system_folded"] == 1
    turns = [i for i, m in enumerate(fitted) if m["role"] == "assistant"]
    expected = [answer_format.format(c=fitted[i]["content"]) for i in turns]
    decoded = [tok.decode(e.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for e in examples]
    if (family, shape, system) in PER_TURN:
        assert shapes["per_turn"] == 1
        assert len(examples) == len(turns)
        for e, i, text, want in zip(examples, turns, decoded, expected):
            assert supervised_runs(tok, e.input_ids, e.labels) == [want]
            # each example is the prompt the model gets at inference time, then its answer
            assert text == tok.apply_chat_template(fitted[:i], tokenize=False, add_generation_prompt=True) + want
            assert e.completion == fitted[i]["content"]
    else:
        assert shapes["per_turn"] == 0
        (e,) = examples
        assert supervised_runs(tok, e.input_ids, e.labels) == expected
        full = tok.apply_chat_template(fitted, tokenize=False)
        assert decoded[0] == full[:len(decoded[0])] and not full[len(decoded[0]):].strip(" \n" + tok.eos_token)
        assert e.prompt == tok.apply_chat_template(fitted[:turns[-1]], tokenize=False, add_generation_prompt=True)


def test_phi_trains_no_eos_after_the_end_of_turn():
    """Phi-3.5 writes <|endoftext|> after the last turn: it is not the assistant's (the model stops at <|end|>)."""
    tok = family_tokenizer("phi-3.5")
    (e,), _ = encode(tok, conversation("single", False))
    assert tok.decode(e.input_ids).endswith("<|end|>\n<|endoftext|>")
    assert supervised_runs(tok, e.input_ids, e.labels) == ["annA<|end|>"]


def test_smollm3_generation_spans_agree_with_the_masks_built_here():
    """transformers' assistant mask (from the {% generation %} tags) holds every token trained here; what it
    holds besides is the assistant header the generation prompt writes and the newline after the turn."""
    tok = family_tokenizer("smollm3")
    messages = conversation("multi", True)
    (e,), _ = encode(tok, messages)
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"][:len(e.input_ids)] == e.input_ids
    mask = out["assistant_masks"]
    trained = [i for i, label in enumerate(e.labels) if label != IGNORE]
    assert trained and all(mask[i] for i in trained)
    extra = tok.decode([t for i, t in enumerate(out["input_ids"]) if mask[i] and i not in set(trained)])
    assert extra.replace("<|im_start|>assistant\n", "").strip() == ""


def test_a_generation_span_that_disagrees_is_refused(tmp_path):
    tok = family_tokenizer("smollm3")
    bad = tmp_path / "bad.jinja"  # marks the user's turn as the assistant's
    bad.write_text("{% for m in messages %}{% if m.role == 'user' %}{% generation %}<|im_start|>user\n"
                   "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                   "<|im_end|>\n{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TunelabError, match=r"generation %\} span for message 1 .* does not agree"):
        encode(tok, conversation("single", False), template=str(bad))


@pytest.mark.parametrize(("fallback", "kept", "count"), [("drop", 1, "system_dropped"),
                                                         ("drop_record", 0, "dropped_system")])
def test_system_fallback_drop_and_drop_record(fallback, kept, count):
    tok = family_tokenizer("gemma2")
    ccfg = ChatConfig(template="model", system_fallback=fallback)
    records = [Record({"messages": conversation("single", True)}, "chat.jsonl:1"),
               Record({"messages": conversation("multi", False)}, "chat.jsonl:2")]
    shapes: dict = {}
    examples, _ = encode_chat(records, tok, DataConfig(max_length=4096), ccfg, "train", shapes)
    assert len(examples) == 1 + kept and shapes[count] == 1
    if fallback == "drop":
        assert "Answer in one word" not in tok.decode(examples[0].input_ids)


def test_every_record_dropped_for_its_system_prompt_says_why():
    tok = family_tokenizer("gemma2")
    with pytest.raises(TunelabError, match=r"1 with a system prompt the template refuses"):
        encode(tok, conversation("single", True), system_fallback="drop_record")


def test_per_turn_with_train_on_last_assistant_and_all():
    tok = family_tokenizer("qwen3")
    messages = conversation("multi", False)
    (last,), _ = encode(tok, messages, train_on="last_assistant")
    assert supervised_runs(tok, last.input_ids, last.labels) == ["<think>\n\n</think>\n\naivilO<|im_end|>"]
    (whole,), shapes = encode(tok, messages, train_on="all")  # the whole rendering, every token trained
    assert all(label != IGNORE for label in whole.labels)
    assert tok.decode(whole.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_end_of_turn_read_from_the_rendering_for_a_template_file(tmp_path):
    tok = family_tokenizer("gemma3")
    f = tmp_path / "gemma3.jinja"
    f.write_text(tok.chat_template)
    assert chat.resolve_template(str(f), tok).stop == "<end_of_turn>"
    assert chat.resolve_template(str(f), tok, stop="<eos>").stop == "<eos>"  # chat.stop still overrides
