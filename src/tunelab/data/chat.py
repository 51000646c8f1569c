"""Conversations -> token sequences with loss on assistant turns.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``. It is
rendered with a chat template (the tokenizer's own, or one shipped here: ``chatml``, ``llama3``) in a
sandboxed Jinja environment, so a template can never reach Python internals, and within bounds, so one that
loops or grows without end stops with a one-line error: RENDER_SECONDS of time and RENDER_CHARS characters
(more for a long conversation) for what one rendering builds or produces.

Loss masks are built by construction, not by searching for marker strings: the conversation is
rendered prefix by prefix. For assistant message i, ``render(messages[:i], add_generation_prompt=True)``
ends where the assistant's tokens begin and ``render(messages[:i + 1])`` ends where they stop (the
end-of-turn token included, so the model learns to stop). Each rendering must be a prefix of the next;
a template for which that fails is refused, because its masks would be wrong. The pieces between those
boundaries are tokenized as parts of the whole rendering, exactly as a prompt is tokenized at inference
time (``piece_ids``): for tokenizers that treat the start of a text specially (SentencePiece's leading
``▁``) that is not the same as tokenizing each piece on its own.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TunelabError, one_line
from .types import IGNORE

ROLES = ("system", "user", "assistant")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str  # Jinja text
    stop: str | None  # the end-of-turn token that closes an assistant turn (generation stops on it)
    needs: tuple[str, ...] = ()  # tokens the tokenizer must know as single tokens


SHIPPED = {
    "chatml": ChatTemplate("chatml", CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", LLAMA3, "<|eot_id|>",
                           ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}


def _single_token(tok, text: str) -> int | None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def resolve_template(spec: str, tok, stop: str | None = None) -> ChatTemplate:
    """``auto`` (the tokenizer's own template, else chatml), ``model``, ``chatml``, ``llama3``, or a
    path to a Jinja file. ``stop`` names the end-of-turn token when it is not the template's or EOS."""
    own = getattr(tok, "chat_template", None)
    if isinstance(own, dict):  # several named templates: take the default one
        own = own.get("default")
    if spec == "auto":
        spec = "model" if own else "chatml"
    if spec == "model":
        if not own:
            raise TunelabError("the tokenizer has no chat template: name one (chatml, llama3) or a .jinja file",
                               "chat.template")
        if not isinstance(own, str):
            shown = json.dumps(own, default=str)[:40]
            raise TunelabError(f"the tokenizer's chat_template is not Jinja text but {shown} (a damaged "
                               "tokenizer_config.json?): name one, chat.template=chatml, llama3 or a .jinja file",
                               str(Path(getattr(tok, "name_or_path", "") or ".") / "tokenizer_config.json"))
        tmpl = ChatTemplate("model", own, tok.eos_token)
    elif spec in SHIPPED:
        tmpl = SHIPPED[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TunelabError(f"unknown chat template {spec!r}: use auto, model, "
                               f"{', '.join(SHIPPED)} or a path to a .jinja file", "chat.template")
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TunelabError(f"not UTF-8 text (byte {e.start}): a chat template is a Jinja text file",
                               str(path)) from None
        except OSError as e:
            raise TunelabError(f"cannot read the chat template: {e.strerror or e}", str(path)) from None
        tmpl = ChatTemplate(str(path), source, tok.eos_token)
    if stop:
        tmpl = ChatTemplate(tmpl.name, tmpl.source, stop, tmpl.needs)
    missing = [t for t in tmpl.needs if _single_token(tok, t) is None]
    if missing:
        raise TunelabError(f"template {tmpl.name} needs the special tokens {', '.join(missing)}, which this "
                           "tokenizer does not have (use the model's own template: chat.template=model)",
                           "chat.template")
    if tmpl.stop is None or _single_token(tok, tmpl.stop) is None:
        raise TunelabError(f"template {tmpl.name}: the end-of-turn token {tmpl.stop!r} is not one token of "
                           "this tokenizer (set chat.stop)", "chat.stop" if stop else "chat.template")
    return tmpl


def stop_id(tmpl: ChatTemplate, tok) -> int:
    """The end-of-turn token's id (resolve_template has checked that it is one token)."""
    return _single_token(tok, tmpl.stop)


def conversation(fields: dict, ccfg, where: str) -> list[dict]:
    """A record's messages, with the recipe's system prompt applied (``ccfg``: the chat section)."""
    return apply_system(to_messages(fields, ccfg.format, ccfg.column, where), ccfg.system, ccfg.system_mode)


# ---- rendering, bounded: a chat template is untrusted input (a tokenizer's file, a recipe's .jinja)

RENDER_SECONDS = 10.0  # wall-clock time to render one conversation (real templates take milliseconds)
RENDER_CHARS = 4_000_000  # characters one rendering may produce or build, besides ...
RENDER_CHARS_PER_INPUT = 8  # ... this many per character of the conversation's messages
MAX_INT_BITS = 4096  # the largest integer a template may compute (10 ** 10 ** 9 would never finish)


class _RenderBound(BaseException):
    """A template ran past a bound (raised inside Jinja's code; a BaseException so nothing swallows it)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _Budget(threading.local):
    chars: int = RENDER_CHARS
    deadline: float = float("inf")
    armed: bool = False  # the SIGALRM handler raises only while a rendering on this thread is running


_BUDGET = _Budget()


def _too_big(n: int) -> _RenderBound:
    return _RenderBound(f"rendered more than {n} characters")


def _check(value: Any) -> Any:
    """A value a template built or read: text (or a list) longer than the budget stops it; so does the clock
    off the main thread, where no alarm can interrupt it."""
    if isinstance(value, (str, list, tuple)) and len(value) > _BUDGET.chars:
        raise _too_big(_BUDGET.chars)
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise _RenderBound(f"computed a number of more than {MAX_INT_BITS} bits")
    if time.monotonic() > _BUDGET.deadline:
        raise _RenderBound(f"took more than {RENDER_SECONDS:g} s")
    return value


def _check_before(name: str, obj: Any, args: tuple, kwargs: dict) -> None:
    """What one call allocates before anything can be checked: padding to a width (str.center, |indent),
    a width in a format string ('%9999999d'), a replacement in every place (str.replace, |replace)."""
    for a in (*args, *kwargs.values()):
        if name in _PADDING and type(a) is int and a > _BUDGET.chars:
            raise _too_big(_BUDGET.chars)
    if name in ("format", "format_map", "%") and isinstance(obj, str):
        widths = _PERCENT_WIDTH.findall(obj) if name == "%" else _FORMAT_WIDTH.findall(obj)
        if max((int(d) for pair in widths for d in pair if d), default=0) > _BUDGET.chars:
            raise _too_big(_BUDGET.chars)
    if name == "replace" and isinstance(obj, str) and len(args) >= 2 and isinstance(args[0], str) \
            and isinstance(args[1], str) and args[0]:
        if len(obj) + obj.count(args[0]) * (len(args[1]) - len(args[0])) > _BUDGET.chars:
            raise _too_big(_BUDGET.chars)


_PERCENT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d{0,12})(?:\.(\d{1,12}))?")  # '%9999999d', '%.9999f'
_FORMAT_WIDTH = re.compile(r"\{[^{}:]*:[^{}\d]*(\d{0,12})[,_]?(?:\.(\d{1,12}))?")  # '{:>9999999}'
_PADDING = {"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap"}


def _bounded_filter(f):
    import functools

    name = f.__name__.removeprefix("do_")

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def run(*args, **kwargs):
        if name in _PADDING or name in ("format", "replace"):  # the value filtered is the first plain argument
            plain = [a for a in args if not hasattr(a, "environment")]
            if plain:
                _check_before(name, plain[0], tuple(plain[1:]), kwargs)
        return _check(f(*args, **kwargs))

    return run


_ENV = None


def _env():
    """A sandboxed, immutable Jinja environment like the one transformers renders chat templates in, whose
    operators, calls, filters and lookups check what they build against the rendering's bounds."""
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Bounded(ImmutableSandboxedEnvironment):
            # intercepted operators are also not folded at compile time (which would run them unbounded)
            intercepted_binops = frozenset({"*", "**", "+", "%"})

            def call_binop(self, context, operator, left, right):
                if operator == "**" and type(left) is int and type(right) is int and abs(left) > 1 \
                        and right * abs(left).bit_length() > MAX_INT_BITS:
                    raise _RenderBound(f"computed a number of more than {MAX_INT_BITS} bits")
                if operator == "%":
                    _check_before("%", left, (), {})
                if operator == "*":
                    for seq, n in ((left, right), (right, left)):
                        if isinstance(seq, (str, list, tuple)) and type(n) is int and len(seq) * n > _BUDGET.chars:
                            raise _too_big(_BUDGET.chars)
                    if type(left) is int and type(right) is int \
                            and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                        raise _RenderBound(f"computed a number of more than {MAX_INT_BITS} bits")
                return _check(super().call_binop(context, operator, left, right))

            def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
                owner = getattr(__obj, "__self__", None)
                if isinstance(owner, str):  # a method of a text: 'a'.ljust(n), '{}'.format(x), s.replace(a, b)
                    _check_before(getattr(__obj, "__name__", ""), owner, args, kwargs)
                return _check(super().call(__context, __obj, *args, **kwargs))

            def getattr(self, obj, attribute):
                if attribute in ("format", "format_map"):  # the sandbox hands out its own wrapper of these
                    _check_before(attribute, obj, (), {})
                return _check(super().getattr(obj, attribute))

            def getitem(self, obj, argument):
                return _check(super().getitem(obj, argument))

        env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str) -> None:
            raise _TemplateRaised(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.filters.update({name: _bounded_filter(f) for name, f in env.filters.items()})
        _ENV = env
    return _ENV


class _TemplateRaised(Exception):
    pass


_COMPILED: dict[str, Any] = {}


def _alarm(signum, frame) -> None:
    """Stop the rendering from where it is, if that is the template's code (Jinja's, or the checks here): in
    other code running just then (a garbage-collector callback, a finalizer) the exception would be printed
    and ignored, so the alarm rings again a moment later instead."""
    if not _BUDGET.armed:
        return
    signal.setitimer(signal.ITIMER_REAL, 0.01)  # disarmed by _bounded_render once stopped
    where = frame.f_code.co_filename.replace("\\", "/") if frame is not None else ""
    if where in ("<template>", __file__.replace("\\", "/")) or "/jinja2/" in where:
        raise _RenderBound(f"took more than {RENDER_SECONDS:g} s")


def _bounded_render(source: str, chars: int, **context) -> str:
    """Compile (once) and render ``source`` within RENDER_SECONDS and ``chars`` characters. On the main thread
    an alarm (SIGALRM) interrupts a template that loops; elsewhere, or when an alarm is already set, the clock
    is read at every output chunk, operator, call and lookup. The previous handler and timer are restored."""
    use_alarm = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                 and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    start = time.monotonic()
    _BUDGET.chars, _BUDGET.deadline = chars, start + RENDER_SECONDS
    old = None
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        _BUDGET.armed = True
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS)
    try:
        compiled = _COMPILED.get(source)
        if compiled is None:
            compiled = _COMPILED[source] = _env().from_string(source)
        out, n = [], 0
        for chunk in compiled.generate(**context):  # what render() joins, piece by piece
            n += len(chunk)
            if n > chars:
                raise _too_big(chars)
            if time.monotonic() > _BUDGET.deadline:
                raise _RenderBound(f"took more than {RENDER_SECONDS:g} s")
            out.append(chunk)
        return "".join(out)
    finally:
        _BUDGET.armed = False
        _BUDGET.deadline = float("inf")
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if old is None else old)  # None: not set from Python


def render_limit(messages: list[dict]) -> int:
    """The characters a rendering of ``messages`` may hold: RENDER_CHARS besides RENDER_CHARS_PER_INPUT a
    character of their text (a long conversation renders long; a template never multiplies it)."""
    size = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    return RENDER_CHARS + RENDER_CHARS_PER_INPUT * size


def render(tmpl: ChatTemplate, messages: list[dict], add_generation_prompt: bool, tok, where: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _bounded_render(tmpl.source, render_limit(messages), messages=messages,
                               add_generation_prompt=add_generation_prompt, bos_token=tok.bos_token or "",
                               eos_token=tok.eos_token or "")
    except _RenderBound as e:
        raise TunelabError(f"chat template {tmpl.name} {e.what} for one conversation (does it loop without end? "
                           "use another template: chat.template=chatml or llama3)", where) from None
    except _TemplateRaised as e:
        raise TunelabError(f"chat template {tmpl.name} refuses this conversation: {e}", where) from None
    except SecurityError as e:
        raise TunelabError(f"chat template {tmpl.name} tried something unsafe and was stopped: {one_line(e)}",
                           where) from None
    except TemplateError as e:
        raise TunelabError(f"chat template {tmpl.name} failed: {one_line(e)}", where) from None
    except Exception as e:  # a template calling a method on a value of the wrong type, and so on
        raise TunelabError(f"chat template {tmpl.name} failed: {one_line(e)}", where) from None


# ---- records -> messages

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system"}
FORMAT_FIELDS = {"messages": "messages", "sharegpt": "conversations", "lmsys": "conversation",
                 "openorca": "question"}


def detect_format(fields: dict, where: str) -> str:
    for fmt in ("messages", "sharegpt", "lmsys", "openorca"):
        if FORMAT_FIELDS[fmt] in fields:
            return fmt
    raise TunelabError("not a conversation: expected a field messages (OpenAI), conversations (ShareGPT), "
                       "conversation (LMSYS-Chat-1M) or question/response (OpenOrca); set chat.format and "
                       "chat.column for other names", where)


def to_messages(fields: dict, fmt: str, field: str | None, where: str) -> list[dict]:
    """One record in any supported format -> a list of {role, content}."""
    if fmt == "auto":
        fmt = detect_format(fields, where)
    if fmt == "openorca":
        q, r = field or "question", "response"
        out = []
        for key in (q, r):
            if key not in fields:
                raise TunelabError(f"missing field {key!r} (OpenOrca records have system_prompt, question, "
                                   "response)", where)
        sysp = fields.get("system_prompt")
        if sysp is not None and not isinstance(sysp, str):
            raise TunelabError("field 'system_prompt' must be a string", where)
        if sysp and sysp.strip():
            out.append({"role": "system", "content": sysp})
        out.append({"role": "user", "content": _text(fields[q], where, q)})
        out.append({"role": "assistant", "content": _text(fields[r], where, r)})
        return out
    key = field or FORMAT_FIELDS[fmt]
    if key not in fields:
        raise TunelabError(f"missing field {key!r} (chat.format={fmt})", where)
    conv = fields[key]
    if isinstance(conv, str):  # CSV or Parquet columns may hold the list as JSON text
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            raise TunelabError(f"field {key!r} is text, not a list of messages", where) from None
    if not isinstance(conv, list):
        raise TunelabError(f"field {key!r} must be a list of messages, got {type(conv).__name__}", where)
    out = []
    for i, m in enumerate(conv):
        at = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise TunelabError(f"{at} must be an object, got {type(m).__name__}", where)
        if fmt == "sharegpt":
            role_raw, content = m.get("from"), m.get("value")
            if role_raw is None or "value" not in m:
                raise TunelabError(f"{at} needs 'from' and 'value' (ShareGPT)", where)
            role = _SHAREGPT_ROLES.get(str(role_raw).lower())
            if role is None:
                raise TunelabError(f"{at}.from: unknown speaker {role_raw!r} (human, gpt, system)", where)
        else:
            role, content = m.get("role"), m.get("content")
            if role is None or "content" not in m:
                raise TunelabError(f"{at} needs 'role' and 'content'", where)
            if role not in ROLES:
                raise TunelabError(f"{at}.role: unknown role {role!r} (system, user, assistant)", where)
        out.append({"role": role, "content": _text(content, where, f"{at}.content")})
    return out


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise TunelabError(f"{name} must be a string, got {type(value).__name__}", where)
    return value


def apply_system(messages: list[dict], system: str | None, mode: str) -> list[dict]:
    """``record``: the record's system prompt, else ``system``; ``default``: always ``system``;
    ``none``: no system message (a template may still add its own default)."""
    has = bool(messages) and messages[0]["role"] == "system"
    rest = messages[1:] if has else messages
    if mode == "none":
        return list(rest)
    if mode == "default" or not has:
        return ([{"role": "system", "content": system}] if system else []) + list(rest)
    return list(messages)


def check_roles(messages: list[dict], where: str) -> None:
    """A system message only first; then user and assistant alternate, starting with the user."""
    expect = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i != 0:
                raise TunelabError(f"message {i}: a system message may only come first", where)
            continue
        if m["role"] != expect:
            raise TunelabError(f"message {i}: roles out of order, expected {expect}, got {m['role']} "
                               "(user and assistant alternate, starting with the user)", where)
        expect = "assistant" if expect == "user" else "user"
    if not any(m["role"] == "assistant" for m in messages):
        raise TunelabError("no assistant turn: nothing to train on", where)


# ---- messages -> ids and labels


@dataclass
class Segments:
    """A rendered conversation cut at assistant-turn boundaries: (text, is_assistant) pieces."""

    pieces: list[tuple[str, bool]]
    prompt_text: str  # the rendering up to the last assistant turn, with the generation prompt
    answer: str  # the last assistant turn's content


def segment(tmpl: ChatTemplate, messages: list[dict], tok, where: str) -> Segments:
    full = render(tmpl, messages, False, tok, where)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    prompt_text = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tmpl, messages[:i], True, tok, where)
        through = render(tmpl, messages[: i + 1], False, tok, where)
        if not (before.startswith(full[:pos]) and through.startswith(before) and full.startswith(through)):
            raise TunelabError(
                f"chat template {tmpl.name} renders the first {i + 1} messages as something that is not a "
                "prefix of the whole conversation, so assistant tokens cannot be located and the loss mask "
                "would be wrong (use another template: chat.template=chatml or llama3)", where)
        answer = through[len(before):].rstrip()  # trailing newlines belong to the next piece
        if not answer:
            raise TunelabError(f"message {i}: the assistant turn renders as nothing", where)
        pieces.append((full[pos:len(before)], False))
        pieces.append((answer, True))
        pos = len(before) + len(answer)
        prompt_text = before
    tail = full[pos:]
    if tail.strip():
        pieces.append((tail, False))
    return Segments([(t, s) for t, s in pieces if t], prompt_text, messages[max(
        i for i, m in enumerate(messages) if m["role"] == "assistant")]["content"])


def piece_ids(texts: list[str], tok, where: str, tmpl_name: str) -> list[list[int]]:
    """The token ids of each piece of a rendered conversation, cut from the tokenization of the whole of it:
    the tokens before a piece boundary are those of the text up to it tokenized on its own (what a prompt
    ending there is at inference time). Pieces tokenized one by one give the same ids for most tokenizers
    (byte-level BPE), and are then taken as they are; a tokenizer that joins text across a boundary into one
    token cannot be cut there, and is refused."""
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    joined = "".join(texts)
    whole = tok(joined, add_special_tokens=False)["input_ids"]
    if [t for piece in enc for t in piece] == whole:
        return enc
    ends, at = [], 0
    for t in texts[:-1]:
        at += len(t)
        ends.append(at)
    counts = []
    for end, prefix in zip(ends, tok([joined[:e] for e in ends], add_special_tokens=False)["input_ids"]):
        if whole[: len(prefix)] != prefix:
            raise TunelabError(f"the tokenizer joins text across the start or the end of an assistant turn (at "
                               f"{joined[max(0, end - 12):end + 12]!r}), so that turn's tokens cannot be told from "
                               f"the prompt's exactly (chat template {tmpl_name}; try another chat.template)", where)
        counts.append(len(prefix))
    return [whole[a:b] for a, b in zip([0, *counts], [*counts, len(whole)])]


def tokenize_segments(seg: Segments, tok, train_on: str, stop_id: int | None, where: str,
                      tmpl_name: str) -> tuple[list[int], list[int], int]:
    """input_ids, labels, and the number of tokens before the last assistant turn (its prompt)."""
    texts = [t for t, _ in seg.pieces]
    enc = piece_ids(texts, tok, where, tmpl_name)
    first = [t for piece in enc[:2] for t in piece][:2]
    bos = tok.bos_token_id
    if bos is not None and first == [bos, bos]:
        raise TunelabError(f"double BOS: chat template {tmpl_name} writes the BOS token twice at the start",
                           where)
    ids: list[int] = []
    labels: list[int] = []
    n_assistant = sum(s for _, s in seg.pieces)
    k = 0
    prompt_len = 0
    for (_, sup), piece in zip(seg.pieces, enc):
        if sup:
            k += 1
            if stop_id is not None and stop_id not in piece:
                raise TunelabError(f"chat template {tmpl_name}: an assistant turn does not contain the "
                                   f"end-of-turn token {tok.convert_ids_to_tokens(stop_id)!r}, so the model would "
                                   "never learn to stop (set chat.stop to the token that closes a turn)", where)
            prompt_len = len(ids)
            trained = train_on == "all" or train_on == "all_assistant" or (train_on == "last_assistant"
                                                                           and k == n_assistant)
        else:
            trained = train_on == "all"
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE] * len(piece))
    return ids, labels, prompt_len


def special_texts(tok) -> list[str]:
    """The tokenizer's special tokens as text: a message that spells one would become a control token."""
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    return sorted({*tok.all_special_tokens, *(t.content for t in added.values() if t.special)} - {""})


def check_no_special_tokens(messages: list[dict], specials: list[str], where: str) -> None:
    for i, m in enumerate(messages):
        for t in specials:
            if t in m["content"]:
                raise TunelabError(f"message {i} ({m['role']}) contains the special token {t!r}: it would be "
                                   "read as the template's control token, not as text (remove it from the data)",
                                   where)


def drop_last_exchange(messages: list[dict]) -> list[dict]:
    """The conversation without its last assistant turn (and the user turn that asked for it); a
    conversation that ends after its last assistant turn (a user's last word) loses that tail first."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last < len(messages) - 1:
        return messages[: last + 1]
    cut = last
    while cut > 0 and messages[cut - 1]["role"] == "user":
        cut -= 1
    return messages[:cut]
