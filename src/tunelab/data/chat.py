"""Conversations -> token sequences with loss on assistant turns.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``. It is
rendered with a chat template (the tokenizer's own, or one shipped here: ``chatml``, ``llama3``) in a
sandboxed Jinja environment, so a template can never reach Python internals.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TunelabError, one_line

IGNORE = -100
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
        tmpl = ChatTemplate("model", own, tok.eos_token)
    elif spec in SHIPPED:
        tmpl = SHIPPED[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TunelabError(f"unknown chat template {spec!r}: use auto, model, "
                               f"{', '.join(SHIPPED)} or a path to a .jinja file", "chat.template")
        tmpl = ChatTemplate(str(path), path.read_text(encoding="utf-8"), tok.eos_token)
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


_ENV = None


def _env():
    """A sandboxed, immutable Jinja environment like the one transformers renders chat templates in."""
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str) -> None:
            raise _TemplateRaised(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        _ENV = env
    return _ENV


class _TemplateRaised(Exception):
    pass


_COMPILED: dict[str, Any] = {}


def render(tmpl: ChatTemplate, messages: list[dict], add_generation_prompt: bool, tok, where: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        compiled = _COMPILED.get(tmpl.source)
        if compiled is None:
            compiled = _COMPILED[tmpl.source] = _env().from_string(tmpl.source)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
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
