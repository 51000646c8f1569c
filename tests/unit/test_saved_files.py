"""What a saved model carries besides its weights (saved_files.write_use_files): the chat template a run
trained with and generation_config.json listing every token it stops on; a classifier export pads as
training did."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tunelab.config import ChatConfig, Config
from tunelab.data.chat import CHATML, LLAMA3
from tunelab.errors import TunelabError
from tunelab.saved_files import write_use_files


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    """(path, model, tokenizer) of the tiny chat model: a base tokenizer without a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return tiny_chat_model, AutoModelForCausalLM.from_pretrained(tiny_chat_model), \
        AutoTokenizer.from_pretrained(tiny_chat_model)


def saved(tmp_path, cfg, model, tok, **kw):
    """A model directory as a run saves it: weights and tokenizer, then write_use_files."""
    out = tmp_path / "out"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_use_files(out, cfg, model, tok, **kw)
    return out


def eos_list(d):
    return json.loads((d / "generation_config.json").read_text())["eos_token_id"]


def chat_cfg(template: str, **kw) -> Config:
    return Config(task="chat", chat=ChatConfig(template=template, **kw))


def test_chatml_on_a_base_tokenizer(tmp_path, tiny):
    _, model, tok = tiny
    assert tok.chat_template is None
    out = saved(tmp_path, chat_cfg("chatml"), model, tok)
    assert (out / "chat_template.jinja").read_text() == CHATML
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_list(out) == [tok.eos_token_id, end]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["pad_token_id"] == tok.pad_token_id  # the model's own fields are kept
    assert tok.chat_template is None  # the run's tokenizer is left as it was (it decides chat.template=auto)
    assert model.generation_config.eos_token_id == tok.eos_token_id  # and so is the model's
    from transformers import AutoTokenizer, GenerationConfig

    again = AutoTokenizer.from_pretrained(out)
    assert again.chat_template == CHATML
    prompt = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tok.eos_token_id, end]


def test_auto_on_a_base_tokenizer_is_chatml_and_a_chat_stop_is_added(tmp_path, tiny):
    _, model, tok = tiny
    out = saved(tmp_path, chat_cfg("auto"), model, tok)
    assert (out / "chat_template.jinja").read_text() == CHATML
    out = saved(tmp_path / "llama3", chat_cfg("llama3"), model, tok)
    assert (out / "chat_template.jinja").read_text() == LLAMA3
    assert eos_list(out) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]


def test_a_jinja_file_and_chat_stop(tmp_path, tiny):
    _, model, tok = tiny
    source = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\n' + m['content'] + '<eos>' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\n' }}{% endif %}")
    path = tmp_path / "mine.jinja"
    path.write_text(source)
    out = saved(tmp_path, chat_cfg(str(path)), model, tok)
    assert (out / "chat_template.jinja").read_text() == source
    assert eos_list(out) == [tok.eos_token_id]  # its turns end with EOS: nothing to add
    out = saved(tmp_path / "stop", chat_cfg("chatml", stop="<|eot_id|>"), model, tok)
    assert eos_list(out) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]


def test_a_models_own_eos_list_is_extended_not_replaced(tmp_path, tiny):
    _, model, tok = tiny
    model.generation_config.eos_token_id = [7, tok.eos_token_id]
    try:
        out = saved(tmp_path, chat_cfg("chatml"), model, tok)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert eos_list(out) == [7, tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_generation_and_classification_runs(tmp_path, tiny):
    _, model, tok = tiny
    out = saved(tmp_path, Config(), model, tok)
    assert not (out / "chat_template.jinja").exists()
    assert eos_list(out) == [tok.eos_token_id]  # what a generation run stops on
    before = (out / "generation_config.json").read_text()
    write_use_files(out, Config(task="classification"), model, tok)  # a classifier: nothing of these
    assert (out / "generation_config.json").read_text() == before


def test_a_merge_takes_the_jinja_file_saved_with_the_run(tmp_path, tiny, caplog):
    _, model, tok = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "chat_template.jinja").write_text(CHATML)
    gone = str(tmp_path / "gone.jinja")  # the run's template file, since deleted
    out = saved(tmp_path / "a", chat_cfg(gone, stop="<|im_end|>"), model, tok, saved=adapter)
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert eos_list(out) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    # a run saved before tunelab kept its template, whose file is gone: merged without it, with a warning
    (adapter / "chat_template.jinja").unlink()
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        out = saved(tmp_path / "b", chat_cfg(gone), model, tok, saved=adapter)
    assert "carries no chat template" in caplog.text and "gone.jinja" in caplog.text
    assert not (out / "chat_template.jinja").exists() and eos_list(out) == [tok.eos_token_id]
    # while training (no saved run directory), an unreadable template stays an error
    with pytest.raises(TunelabError, match="unknown chat template"):
        saved(tmp_path / "c", chat_cfg(gone), model, tok)


def test_classifier_export_pads_as_training_did(tmp_path):
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.classify import SequenceClassifier, export_sequence_classification

    path = build_tiny_model(tmp_path / "tiny")
    lm = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")  # a tokenizer that pads on the left
    torch.manual_seed(0)
    export_sequence_classification(SequenceClassifier(lm, ["neg", "pos"]), tmp_path / "out", tok)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["padding_side"] == "right"
    assert AutoTokenizer.from_pretrained(tmp_path / "out").padding_side == "right"
    assert tok.padding_side == "left"  # the run's own tokenizer is unchanged


def test_a_published_config_that_transformers_only_warns_about_is_extended(tmp_path, tiny):
    _, model, tok = tiny
    from transformers import GenerationConfig

    own = model.generation_config
    published = tmp_path / "published"
    published.mkdir()
    (published / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id,
                                                                  "temperature": 0.6, "top_p": 0.9}))
    model.generation_config = GenerationConfig.from_pretrained(published)  # (as a model loads it)
    try:
        out = saved(tmp_path, chat_cfg("chatml"), model, tok)
    finally:
        model.generation_config = own
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_load_trained_takes_the_adapters_stop_tokens_and_loads_a_run_saved_before(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.config import ModelConfig
    from tunelab.models import load_trained

    path, _, tok = tiny
    adapter = tmp_path / "run" / "adapter"
    lm = AutoModelForCausalLM.from_pretrained(path)
    get_peft_model(lm, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    cfg = ModelConfig(name=str(path), device="cpu")
    model, _ = load_trained(tmp_path / "run", cfg)  # saved before tunelab wrote generation_config.json there
    assert model.generation_config.eos_token_id == tok.eos_token_id
    write_use_files(adapter, chat_cfg("chatml"), lm, tok)
    model, _ = load_trained(tmp_path / "run", cfg)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    (adapter / "generation_config.json").write_text('{"eos_token_id": [1, ')
    with pytest.raises(TunelabError, match="generation_config.json"):
        load_trained(tmp_path / "run", cfg)
