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
    MAX_INT_BITS,
    RENDER_CHARS,
    RENDER_CHARS_PER_INPUT,
    RENDER_SECONDS,
    render,
    render_limit,
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

__all__ = ["CHATML", "FORMAT_FIELDS", "LLAMA3", "MAX_INT_BITS", "RENDER_CHARS", "RENDER_CHARS_PER_INPUT",
           "RENDER_SECONDS", "ROLES", "SHIPPED", "ChatTemplate", "Segments", "apply_system", "check_no_special_tokens",
           "check_roles", "conversation", "detect_format", "drop_last_exchange", "piece_ids", "render",
           "render_limit", "resolve_template", "segment", "special_texts", "stop_id", "to_messages",
           "tokenize_segments"]

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
