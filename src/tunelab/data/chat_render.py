"""The chat-template sandbox: rendering a chat template's Jinja text, within bounds.

A chat template is untrusted input (a tokenizer's tokenizer_config.json, a recipe's .jinja file). It is
rendered in a sandboxed Jinja environment, so it can never reach Python internals, and within bounds, so one
that loops or grows without end stops with a one-line error: RENDER_SECONDS of time and RENDER_CHARS
characters (more for a long conversation) for what one rendering builds or produces.

Templates may mark the text the assistant generates with ``{% generation %} ... {% endgeneration %}``
(transformers' assistant-mask tags, as in SmolLM3's template): the tag renders its body, and ``render_spans``
also says where each marked span lies in the rendering.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import threading
import time
from typing import Any

from ..errors import TunelabError, one_line

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

# what {% generation %} puts around its body while spans are asked for (characters of Unicode's private-use
# area; a conversation that holds them is refused by check_no_markers, so they never come from the data)
OPEN_MARK, CLOSE_MARK = "\ue000", "\ue001"
_MARKING = threading.local()


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

        env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag()])

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


class TemplateRefused(TunelabError):
    """The template itself refused the conversation (its raise_exception: 'System role not supported')."""


def _generation_tag():
    """The ``{% generation %} ... {% endgeneration %}`` tag: its body as it is, between OPEN_MARK and CLOSE_MARK
    while render_spans asks where the assistant's text lies."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            return f"{OPEN_MARK}{text}{CLOSE_MARK}" if getattr(_MARKING, "on", False) else text

    return Generation


def uses_generation_tag(source: str) -> bool:
    """Whether a template marks the assistant's text with {% generation %}."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


_COMPILED: dict[str, Any] = {}


def _alarm(signum, frame) -> None:
    """Stop the rendering from where it is, if that is the template's code (Jinja's, or the checks here): in
    other code running just then (a garbage-collector callback, a finalizer) the exception would be printed
    and ignored, so the alarm rings again a moment later instead."""
    if not _BUDGET.armed:
        return
    signal.setitimer(signal.ITIMER_REAL, 0.01)  # disarmed by _bounded_render once stopped
    where = frame.f_code.co_filename.replace("\\", "/") if frame is not None else ""
    # this file: the checks the environment runs between operations (they must stay in this module)
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


def render_spans(tmpl, messages: list[dict], add_generation_prompt: bool, tok,
                 where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendering, and the (start, end) of each span the template marks with {% generation %} in it."""
    _MARKING.on = True
    try:
        marked = render(tmpl, messages, add_generation_prompt, tok, where)
    finally:
        _MARKING.on = False
    text, spans, start = [], [], None
    at = 0
    for part in re.split(f"([{OPEN_MARK}{CLOSE_MARK}])", marked):
        if part == OPEN_MARK:
            start = at
        elif part == CLOSE_MARK:
            if start is not None:
                spans.append((start, at))
            start = None
        else:
            text.append(part)
            at += len(part)
    return "".join(text), spans


def render(tmpl, messages: list[dict], add_generation_prompt: bool, tok, where: str) -> str:
    """``messages`` rendered with ``tmpl`` (a chat.ChatTemplate: its name and Jinja source; the type is not
    imported here, as chat imports this module), bounded; a template that fails or runs past a bound is a
    one-line error at ``where``."""
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
        raise TemplateRefused(f"chat template {tmpl.name} refuses this conversation: {e}", where) from None
    except SecurityError as e:
        raise TunelabError(f"chat template {tmpl.name} tried something unsafe and was stopped: {one_line(e)}",
                           where) from None
    except TemplateError as e:
        raise TunelabError(f"chat template {tmpl.name} failed: {one_line(e)}", where) from None
    except Exception as e:  # a template calling a method on a value of the wrong type, and so on
        raise TunelabError(f"chat template {tmpl.name} failed: {one_line(e)}", where) from None
