"""Conversations: records in the supported formats -> lists of messages, and the checks on them.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``. A record
holds one as OpenAI messages, ShareGPT conversations, an LMSYS-Chat-1M conversation or an OpenOrca
question/response (``FORMAT_FIELDS``); the recipe's system prompt is applied to it, and its roles and text are
checked before it is rendered.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import TunelabError

ROLES = ("system", "user", "assistant")

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


def conversation(fields: dict, ccfg, where: str) -> list[dict]:
    """A record's messages, with the recipe's system prompt applied (``ccfg``: the chat section)."""
    return apply_system(to_messages(fields, ccfg.format, ccfg.column, where), ccfg.system, ccfg.system_mode)


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
