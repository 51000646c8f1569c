"""Conversations -> token sequences with loss on assistant turns.

A conversation (``conversations``: records -> messages, and their checks) is rendered with a chat template
(the tokenizer's own, or one shipped here: ``chatml``, ``llama3``) in the sandbox of ``chat_render``, which
bounds what a template may do.

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

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunelabError
from .chat_render import (  # re-exported (chat.render ...); the bounds are read, and patched, in chat_render
    CLOSE_MARK,
    MAX_INT_BITS,
    OPEN_MARK,
    RENDER_CHARS,
    RENDER_CHARS_PER_INPUT,
    RENDER_SECONDS,
    TemplateRefused,
    render,
    render_limit,
    render_spans,
    uses_generation_tag,
)
from .conversations import (  # re-exported as above
    FORMAT_FIELDS,
    ROLES,
    apply_system,
    check_no_special_tokens,
    check_roles,
    conversation,
    detect_format,
    drop_last_exchange,
    to_messages,
)
from .types import IGNORE

__all__ = ["CHATML", "CLOSE_MARK", "ChatTemplate", "FORMAT_FIELDS", "LLAMA3", "MAX_INT_BITS", "OPEN_MARK",
           "RENDER_CHARS", "RENDER_CHARS_PER_INPUT", "RENDER_SECONDS", "ROLES", "SHIPPED", "Segments",
           "TemplateRefused", "Turn", "apply_system", "check_generation_spans", "check_no_special_tokens",
           "check_roles", "conversation", "cut_at_stop", "detect_format", "drop_last_exchange", "end_of_turn",
           "fit_system", "piece_ids", "render", "render_limit", "render_spans", "resolve_template", "segment",
           "special_texts", "stop_id", "supports_system", "to_messages", "tokenize_segments", "turns",
           "uses_generation_tag"]

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
        tmpl = ChatTemplate("model", own, end_of_turn(own, tok))
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
        tmpl = ChatTemplate(str(path), source, end_of_turn(source, tok))
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


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def end_of_turn(source: str, tok) -> str | None:
    """The token that closes an assistant turn in this template, read from a rendering: the first special token
    after the assistant's text (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, </s>). The tokenizer's EOS
    where the rendering shows none (or the template cannot render a plain exchange)."""
    tmpl = ChatTemplate("probe", source, None)
    try:
        before = render(tmpl, _PROBE[:1], True, tok, "chat.template")
        through = render(tmpl, _PROBE, False, tok, "chat.template")
    except TunelabError:
        return tok.eos_token
    rest = through[len(before):] if through.startswith(before) else through
    at = rest.find(_PROBE[1]["content"])
    after = rest[at + len(_PROBE[1]["content"]):] if at >= 0 else ""
    specials = set(special_texts(tok))
    for t in tok.convert_ids_to_tokens(tok(after, add_special_tokens=False)["input_ids"]):
        if t in specials:
            return t
    return tok.eos_token


_SYSTEM_SUPPORT: dict[tuple[str, int], bool] = {}


def supports_system(tmpl: ChatTemplate, tok) -> bool:
    """Whether the template takes a system message (Gemma 2's refuses one: 'System role not supported')."""
    key = (tmpl.source, id(tok))
    if key not in _SYSTEM_SUPPORT:
        try:
            render(tmpl, [{"role": "system", "content": "Be brief."}, *_PROBE], False, tok, "chat.template")
            _SYSTEM_SUPPORT[key] = True
        except TemplateRefused:
            try:  # refused for the system message, or for anything?
                render(tmpl, _PROBE, False, tok, "chat.template")
                _SYSTEM_SUPPORT[key] = False
            except TunelabError:
                _SYSTEM_SUPPORT[key] = True  # (the conversation's own rendering will say what is wrong)
        except TunelabError:
            _SYSTEM_SUPPORT[key] = True
    return _SYSTEM_SUPPORT[key]


def fit_system(messages: list[dict], tmpl: ChatTemplate, tok, fallback: str) -> tuple[list[dict] | None, str | None]:
    """The conversation as the template takes it: where it refuses a system message, ``fallback`` says what
    to do with one (chat.system_fallback): ``fold`` it into the first user turn (system, a blank line, the
    user's text: what Gemma 3's template does), ``drop`` it, or ``drop_record`` (None). Also says what was
    done ("folded", "dropped", "dropped_record"), or None when nothing was."""
    if not messages or messages[0]["role"] != "system" or supports_system(tmpl, tok):
        return messages, None
    system, rest = messages[0]["content"], messages[1:]
    if fallback == "drop_record":
        return None, "dropped_record"
    if fallback == "drop" or not rest or rest[0]["role"] != "user":
        return list(rest), "dropped"
    first = {**rest[0], "content": f"{system}\n\n{rest[0]['content']}" if system.strip() else rest[0]["content"]}
    return [first, *rest[1:]], "folded"


def stop_id(tmpl: ChatTemplate, tok) -> int:
    """The end-of-turn token's id (resolve_template has checked that it is one token)."""
    assert tmpl.stop is not None, "a template from resolve_template has its end-of-turn token"
    tid = _single_token(tok, tmpl.stop)
    assert tid is not None, "resolve_template checked that the end-of-turn token is one token"
    return tid


# ---- messages -> ids and labels


@dataclass
class Segments:
    """A rendered conversation cut at assistant-turn boundaries: (text, is_assistant) pieces."""

    pieces: list[tuple[str, bool]]
    prompt_text: str  # the rendering up to the last assistant turn, with the generation prompt
    answer: str  # the last assistant turn's content
    turn: int | None = None  # one turn of a conversation on its own (per-turn examples): its message index


@dataclass(frozen=True)
class Turn:
    """An assistant turn as the model sees it at inference time."""

    index: int  # its message index
    prompt: str  # render(messages[:index], add_generation_prompt=True)
    answer: str  # what the turn adds after that: its text through the end-of-turn token
    at: int  # where the answer starts in render(messages[:index + 1])
    through: str = ""  # render(messages[:index + 1])
    spans: tuple[tuple[int, int], ...] = ()  # its {% generation %} spans (templates that mark them)


def turns(tmpl: ChatTemplate, messages: list[dict], tok, where: str) -> list[Turn]:
    """Each assistant turn: the prompt the template gives it at inference time and the text it adds, cut after
    the end-of-turn token (what a template writes after that, a newline or an EOS after the last turn, is not
    the assistant's). Where the rendering of the turn does not continue the prompt (Mistral's template puts the
    system prompt into the last user turn only), the turn's text is what follows the longest end of the prompt
    that the rendering repeats before the turn's content (its "[/INST]")."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tmpl, messages[:i], True, tok, where)
        if uses_generation_tag(tmpl.source):
            through, spans = render_spans(tmpl, messages[: i + 1], False, tok, where)
        else:
            through, spans = render(tmpl, messages[: i + 1], False, tok, where), []
        at = len(before) if through.startswith(before) else after_prompt(before, through, m["content"])
        if at is None:
            raise TunelabError(
                f"chat template {tmpl.name}: message {i}, an assistant turn, is not found in the rendering of the "
                f"first {i + 1} messages after the prompt, so the assistant's tokens cannot be told from what the "
                "model sees at inference time (use another template: chat.template=chatml or llama3)", where)
        answer = cut_at_stop(through[at:], m["content"], tmpl.stop)
        if not answer.strip():
            raise TunelabError(f"message {i}: the assistant turn renders as nothing", where)
        out.append(Turn(i, before, answer, at, through, tuple(spans)))
    return out


def after_prompt(before: str, through: str, content: str) -> int | None:
    """Where the assistant's turn starts in ``through`` when it does not continue ``before``: after the longest
    end of ``before`` that ``through`` holds before the turn's content (None: the content is not there)."""
    c = through.rfind(content.strip()) if content.strip() else -1
    if c < 0:
        return None
    head = through[:c]
    lo, hi = 0, min(len(before), len(head))  # an end of length L found means every shorter end is found too
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[len(before) - mid:] in head:
            lo = mid
        else:
            hi = mid - 1
    return head.rfind(before[len(before) - lo:]) + lo if lo else c


def cut_at_stop(rest: str, content: str, stop: str | None) -> str:
    """``rest`` (what rendering an assistant turn adds) through the first end-of-turn token after the turn's
    content; without one, ``rest`` less its trailing whitespace."""
    if stop:
        start = rest.find(content.strip()) if content.strip() else -1
        at = rest.find(stop, start + len(content.strip()) if start >= 0 else 0)
        if at >= 0:
            return rest[: at + len(stop)]
    return rest.rstrip()


def segment(tmpl: ChatTemplate, messages: list[dict], tok, where: str, train_on: str = "all_assistant"
            ) -> list[Segments]:
    """The conversation as training examples. Where every turn's prompt and text is a prefix of the whole
    rendering (most templates), one example holds them all. Where the template renders earlier turns
    differently once the conversation goes on (Qwen3 drops their reasoning; Mistral moves the system prompt
    into the last user turn), each assistant turn is its own example, rendered as the model sees it then
    (``train_on: all`` keeps the whole rendering as one example instead, every token trained)."""
    ts = turns(tmpl, messages, tok, where)
    full = render(tmpl, messages, False, tok, where)
    if uses_generation_tag(tmpl.source):
        check_generation_spans(tmpl, messages, ts, tok, where)
    last = ts[-1]
    content = messages[last.index]["content"]
    stable = all(full.startswith(t.prompt + t.answer) for t in ts) and all(
        len(b.prompt) >= len(a.prompt) + len(a.answer) for a, b in zip(ts, ts[1:]))
    if stable:
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for t in ts:
            pieces.append((full[pos:len(t.prompt)], False))
            pieces.append((t.answer, True))
            pos = len(t.prompt) + len(t.answer)
        if full[pos:].strip():
            pieces.append((full[pos:], False))
        return [Segments([(t, s) for t, s in pieces if t], last.prompt, content)]
    if train_on == "all":
        cut = len(last.prompt) if full.startswith(last.prompt) else 0
        return [Segments([(t, sup) for t, sup in ((full[:cut], False), (full[cut:], True)) if t], last.prompt,
                         content)]
    return [Segments([(t.prompt, False), (t.answer, True)], t.prompt, messages[t.index]["content"], t.index)
            for t in ts if train_on != "last_assistant" or t is last]


def check_generation_spans(tmpl: ChatTemplate, messages: list[dict], ts: list[Turn], tok, where: str) -> None:
    """A template that marks the assistant's text with {% generation %} (transformers' assistant masks) must
    agree with the masks built here: the span it marks for a turn holds the turn's text, and besides it only
    what the generation prompt adds (the assistant's header) and whitespace after the end-of-turn token."""
    for t in ts:
        text, spans = t.through, t.spans  # (rendered with its spans by turns())
        start, end = t.at, t.at + len(t.answer)
        prior = len(render(tmpl, messages[: t.index], False, tok, where))
        if not spans or not (prior <= spans[-1][0] <= start and end <= spans[-1][1]
                             and not text[end:spans[-1][1]].strip()):
            marked = text[spans[-1][0]:spans[-1][1]] if spans else ""
            raise TunelabError(f"chat template {tmpl.name}: its {{% generation %}} span for message {t.index} "
                               f"({marked[:60]!r}) does not agree with the assistant's text rendered after the "
                               f"generation prompt ({t.answer[:60]!r})", where)


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
