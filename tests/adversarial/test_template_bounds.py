"""Chat templates are untrusted input (a tokenizer's tokenizer_config.json, a recipe's .jinja file): every
rendering is bounded in time and in the characters it builds or produces, by class — loops that never end,
output that grows, a value built too large in one operation (repetition, padding, a format width, a
replacement, doubling), a number too large to compute — and ends in one line naming the template and the
bound. The alarm it uses is put back as it was; off the main thread the clock is read instead. A valid
template renders exactly what it rendered before, however long the conversation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from guard import changes, one_line, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data import chat, chat_render
from tunelab.errors import TunelabError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
SECONDS = 0.5  # the time bound in these tests (the real one is chat_render.RENDER_SECONDS)
CHARS = 20_000  # the character bound besides the conversation's own allowance

ENDLESS = {  # templates that would run for hours: the time bound stops them
    "nested loops that build nothing":
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "three nested loops":
        "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}"
        "{% endfor %}{% endfor %}x",
    "a macro called in a loop":
        "{% macro spin() %}{% for j in range(100000) %}{% endfor %}{% endmacro %}"
        "{% for i in range(100000) %}{{ spin() }}{% endfor %}",
    "sorting in a loop": "{% for i in range(100000) %}{{ range(20000)|list|sort|first }}{% endfor %}",
}
HUGE = {  # templates that would build gigabytes: the size bound stops them, mostly before they allocate
    "output that grows": "{% for i in range(100000) %}{% for j in range(100000) %}ab{% endfor %}{% endfor %}",
    "repetition": "{{ 'x' * 1000000000 }}",
    "repetition of a list": "{{ ([0] * 1000000000)|length }}",
    "padding by a method": "{{ 'a'.ljust(1000000000) }}",
    "padding by a filter": "{{ 'a'|center(1000000000) }}",
    "a width in a % format": "{{ '%1000000000d' % 1 }}",
    "a width in str.format": "{{ '{:>1000000000}'.format(1) }}",
    "replacement": "{% set s = 'a' * 1000 %}{{ s|replace('a', s)|replace('a', s) }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "a join": "{{ range(99999)|join('x' * 1000) }}",
}
HUGE_NUMBERS = {  # integers whose computation alone would not finish (and cannot be interrupted)
    "a power": "{{ 7 ** 1000000 }}",
    "repeated squaring": "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                         "{% endfor %}{{ ns.n > 0 }}",
}

# SmolLM2-135M-Instruct's own template, and one in the style of Qwen2.5's (namespace, tojson, formats)
SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
RICH = (
    "{%- set ns = namespace(turns=0, sys='You are a helpful assistant.') %}"
    "{%- if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif %}"
    "{{- '<|im_start|>system\n' + ns.sys|trim + '<|im_end|>\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}{% set ns.turns = ns.turns + 1 %}"
    "{{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{{- '' if ns.turns % 2 else '' }}{{- '%s' % '' }}{{- '{}'.format('') }}{{- ('' * 3) }}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
VALID = {"chatml": chat.CHATML, "llama3": chat.LLAMA3, "smollm2": SMOL, "rich": RICH}


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture
def tight(monkeypatch):
    """Low bounds, so that a test of them takes a second (the real ones: 10 s, 4 M characters); patched in
    chat_render, where rendering reads them (chat re-exports them)."""
    monkeypatch.setattr(chat_render, "RENDER_SECONDS", SECONDS)
    monkeypatch.setattr(chat_render, "RENDER_CHARS", CHARS)


def refused(tok, name: str, source: str) -> str:
    """The one-line error of rendering CONV with ``source``, checked to come promptly and to leave no timer."""
    start = time.monotonic()
    with pytest.raises(TunelabError) as caught:
        chat.render(chat.ChatTemplate(name, source, "<|im_end|>"), CONV, False, tok, "chat.jsonl:1")
    assert time.monotonic() - start < SECONDS + 4, f"{name}: took {time.monotonic() - start:.1f} s"
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0, "the alarm was left running"
    line = str(caught.value)
    assert "\n" not in line and line.startswith("chat.jsonl:1: chat template " + name), line
    return line


@pytest.mark.parametrize("name", ENDLESS)
def test_a_template_that_never_ends_is_stopped_by_the_time_bound(tok, tight, name):
    line = refused(tok, name, ENDLESS[name])
    assert f"took more than {SECONDS:g} s" in line, line


@pytest.mark.parametrize("name", HUGE)
def test_a_template_that_builds_too_much_is_stopped_by_the_size_bound(tok, tight, name):
    line = refused(tok, name, HUGE[name])
    assert f"rendered more than {chat.render_limit(CONV)} characters" in line, line


@pytest.mark.parametrize("name", HUGE_NUMBERS)
def test_a_number_too_large_to_compute_is_refused(tok, tight, name):
    line = refused(tok, name, HUGE_NUMBERS[name])
    assert f"computed a number of more than {chat.MAX_INT_BITS} bits" in line, line


def test_on_the_main_thread_the_alarm_alone_stops_it(tok, tight, monkeypatch):
    """With the clock never advancing for the checks between operations, only SIGALRM can stop the loop."""
    import types

    monkeypatch.setattr(chat_render, "time", types.SimpleNamespace(monotonic=lambda: 0.0))
    for source in (ENDLESS["nested loops that build nothing"], ENDLESS["a macro called in a loop"]):
        assert f"took more than {SECONDS:g} s" in refused(tok, "loop", source)


def test_the_previous_alarm_handler_and_timer_are_put_back(tok, tight):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    try:
        handler = signal.getsignal(signal.SIGALRM)
        chat.render(chat.SHIPPED["chatml"], CONV, False, tok, "x")
        assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        refused(tok, "loop", ENDLESS["nested loops that build nothing"])
        assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        # a timer already running is left alone (the clock is read instead), and fires as it would have
        signal.setitimer(signal.ITIMER_REAL, 30)
        line = refused_with_timer(tok)
        assert f"took more than {SECONDS:g} s" in line
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20 < remaining <= 30 and signal.getsignal(signal.SIGALRM) is handler and not fired
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        time.sleep(0.3)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def refused_with_timer(tok) -> str:
    start = time.monotonic()
    with pytest.raises(TunelabError) as caught:
        chat.render(chat.ChatTemplate("loop", ENDLESS["nested loops that build nothing"], "x"), CONV, False, tok,
                    "x")
    assert time.monotonic() - start < SECONDS + 4
    return str(caught.value)


@pytest.mark.parametrize("source", [ENDLESS["nested loops that build nothing"], ENDLESS["three nested loops"],
                                    HUGE["output that grows"]])
def test_off_the_main_thread_the_clock_stops_it(tok, tight, source):
    box: dict = {}

    def run() -> None:
        try:
            chat.render(chat.ChatTemplate("loop", source, "x"), CONV, False, tok, "x")
        except TunelabError as e:
            box["line"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(SECONDS + 10)
    assert not t.is_alive(), "the rendering off the main thread did not stop"
    assert "took more than" in box["line"] or "rendered more than" in box["line"], box


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.sampled_from(sorted(VALID)), system=st.none() | TEXT,
       turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), long=st.booleans(), prompt=st.booleans())
def test_bounds_never_change_a_valid_rendering(tok, tight, template, system, turns, long, prompt):
    """What the bounded environment renders is what a plain sandbox renders, even for a conversation longer
    than the character bound (it grows with the conversation)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if long:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + "word " * (CHARS // 2)}
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    expected = plain.from_string(VALID[template]).render(messages=messages, add_generation_prompt=prompt,
                                                         bos_token=tok.bos_token, eos_token=tok.eos_token)
    got = chat.render(chat.ChatTemplate(template, VALID[template], "<|im_end|>"), messages, prompt, tok, "x")
    assert got == expected


# ---- as a user meets it: one line, exit 2, no run directory, nothing else changed


def _chat_recipe(tmp: Path, model: Path, template: str) -> Path:
    data = tmp / "chat.jsonl"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(8)))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "chat", "model": str(model), "data": {"train": str(data), "max_length": 200, "validation_size": 2},
        "chat": {"template": template, "stop": "<|im_end|>"}, "train": {"max_steps": 2, "batch_size": 2},
        "output": {"dir": str(tmp / "run")}}))
    return recipe


def test_a_recipe_template_that_loops_is_one_line(tmp_path, tiny_chat_model, tight, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jinja = tmp_path / "loop.jinja"
    jinja.write_text(ENDLESS["nested loops that build nothing"])
    recipe = _chat_recipe(tmp_path, tiny_chat_model, str(jinja))
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(recipe)], capfd)
    line = one_line(code, err, f"chat template {jinja} took more than {SECONDS:g} s")
    assert "chat.jsonl:" in line, line
    assert not changes(before, snapshot(tmp_path))


def test_a_tokenizer_whose_own_template_grows_without_end_is_one_line(tmp_path, tiny_chat_model, tight, capfd,
                                                                      monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["chat_template"] = HUGE["output that grows"]
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    recipe = _chat_recipe(tmp_path, model, "model")
    before = snapshot(tmp_path)
    code, err = run_cli(["train", str(recipe)], capfd)
    one_line(code, err, "chat template model rendered more than")
    assert not changes(before, snapshot(tmp_path))


def test_the_real_bounds_stop_a_template_in_a_process_of_its_own(tmp_path, tiny_chat_model):
    """With the shipped bounds (no monkeypatch): output that grows stops at RENDER_CHARS within seconds."""
    jinja = tmp_path / "grow.jinja"
    jinja.write_text(HUGE["output that grows"])
    recipe = _chat_recipe(tmp_path, tiny_chat_model, str(jinja))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "--quiet", "train", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=120)  # a hang fails here instead of waiting
    one_line(proc.returncode, proc.stderr, f"chat template {jinja} rendered more than")
    assert not (tmp_path / "run").exists()
