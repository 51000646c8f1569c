"""Chat tuning: conversations rendered with a chat template, the loss on the assistant turns (or as
chat.train_on says), generation stopped at the template's end-of-turn token, scored by exact match of the
last assistant turn."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ChatConfig, Config, DataConfig
from ..data import chat
from ..data.formats import EncodeStats, example_weight, split_records
from ..data.types import IGNORE, Example, Record
from ..errors import TunelabError
from .base import SPLITS, Splits, Task, check_display


class ChatTask(Task):
    name = "chat"
    prompt_variations = False
    checks_answer_budget = False

    def examples(self, cfg: Config, tok) -> tuple[Splits, dict[str, Any], None]:
        records = split_records(cfg.data, cfg.train.seed)
        splits: Splits = {}
        stats: dict[str, Any] = {}
        shapes: dict[str, Any] = {}
        for name in SPLITS:
            splits[name], st = encode_chat(records[name], tok, cfg.data, cfg.chat, name, shapes)
            stats[name] = st.summary()
        stats["chat"] = shapes
        check_display(cfg, splits)
        return splits, stats, None

    def token_settings(self, cfg: Config) -> dict[str, Any]:
        return {"chat": dataclasses.asdict(cfg.chat)}  # the template, system prompt and train_on decide masks

    def stop_ids(self, cfg: Config, tok) -> list[int]:
        """The chat template's end-of-turn token."""
        return [chat.stop_id(chat.resolve_template(cfg.chat.template, tok, cfg.chat.stop), tok)]

    def chat_defaults(self, cfg: Config) -> tuple[str | None, str | None]:
        return cfg.chat.stop, cfg.chat.system if cfg.chat.system_mode != "none" else None

    def check(self, cfg: Config) -> None:
        if cfg.model.bos_token is not None:  # (a saved run that has both still loads)
            raise TunelabError("with task: chat the chat template decides how a conversation starts: put the "
                               "start token in the template (chat.template=FILE.jinja) and leave "
                               "model.bos_token unset", "model.bos_token")

    def input_files(self, cfg: Config) -> list[str]:
        return [cfg.chat.template] if cfg.chat.template.endswith(".jinja") else []


def chat_lines(shapes: dict[str, Any]) -> list[str]:
    """What the log and ``data show`` say of data_stats.json's "chat": the template, its end-of-turn token,
    conversations trained turn by turn, system prompts the template refuses."""
    lines = [f"chat template {shapes['template']}: an assistant turn ends with {shapes['end_of_turn']!r}"]
    if shapes.get("per_turn"):
        lines.append(f"{shapes['per_turn']} conversations trained turn by turn: the template renders earlier turns "
                     "differently once the conversation goes on, so each assistant turn is its own example, "
                     "rendered as the model sees it then")
    changed = [(shapes.get(k, 0), what) for k, what in (
        ("system_folded", "system prompts folded into the first user turn"),
        ("system_dropped", "system prompts dropped"), ("dropped_system", "conversations dropped"))]
    if any(n for n, _ in changed):
        lines.append("the template refuses a system message: " + ", ".join(f"{n} {what}" for n, what in changed if n)
                     + " (chat.system_fallback)")
    return lines


_SYSTEM_COUNTS = {"folded": "system_folded", "dropped": "system_dropped", "dropped_record": "dropped_system"}


def encode_chat(records: list[Record], tok, cfg: DataConfig, ccfg: ChatConfig, split: str,
                shapes: dict[str, Any] | None = None) -> tuple[list[Example], EncodeStats]:
    """Conversations -> Examples with loss on assistant turns (see data/chat.py). ``shapes`` (data_stats.json's
    "chat") gathers the template, its end-of-turn token, and how many conversations were trained turn by
    turn or had their system prompt folded, dropped or the conversation dropped (chat.system_fallback)."""
    tmpl = chat.resolve_template(ccfg.template, tok, ccfg.stop)
    stop_id = chat.stop_id(tmpl, tok)
    stats = EncodeStats(total=len(records))
    shapes = {} if shapes is None else shapes
    shapes.update(template=tmpl.name, end_of_turn=tmpl.stop)
    for key in ("per_turn", "system_folded", "system_dropped", "dropped_system"):
        shapes.setdefault(key, 0)
    specials = chat.special_texts(tok) + ([chat.OPEN_MARK, chat.CLOSE_MARK] if chat.uses_generation_tag(tmpl.source)
                                          else [])
    out = []
    for r in records:
        msgs = chat.conversation(r.fields, ccfg, r.where)
        chat.check_roles(msgs, r.where)
        chat.check_no_special_tokens(msgs, specials, r.where)
        fitted, done = chat.fit_system(msgs, tmpl, tok, ccfg.system_fallback)
        if done:
            shapes[_SYSTEM_COUNTS[done]] += 1
        if fitted is None:
            continue
        msgs = fitted
        empty = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            if cfg.empty_target == "drop":
                stats.dropped_empty += 1
                continue
            raise TunelabError(f"message {empty[0]}: empty assistant turn (data.empty_target=drop skips such "
                               "conversations)", r.where)
        truncated = False
        while True:
            segs = chat.segment(tmpl, msgs, tok, r.where, ccfg.train_on)
            encoded = [chat.tokenize_segments(seg, tok, ccfg.train_on, stop_id, r.where, tmpl.name) for seg in segs]
            longest = max(len(ids) for ids, _, _ in encoded)
            if longest <= cfg.max_length:
                break
            if cfg.truncation == "error":
                raise TunelabError(f"conversation has {longest} tokens, more than data.max_length="
                                   f"{cfg.max_length}", r.where)
            shorter = chat.drop_last_exchange(msgs) if cfg.truncation == "truncate" else []
            if not any(m["role"] == "assistant" for m in shorter):
                encoded = []
                break
            msgs, truncated = shorter, True  # truncation drops whole turns from the end
        if not encoded:
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                continue
            if cfg.empty_target == "drop":
                stats.dropped_empty += 1
                continue
            raise TunelabError(f"zero supervised tokens after truncation: the first assistant turn does not fit "
                               f"in data.max_length={cfg.max_length}", r.where)
        stats.truncated += truncated
        shapes["per_turn"] += any(seg.turn is not None for seg in segs)
        for seg, (ids, labels, prompt_len) in zip(segs, encoded):
            last = seg.turn if seg.turn is not None else max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            last_user = msgs[last - 1]["content"] if last and msgs[last - 1]["role"] == "user" else ""
            where = r.where if seg.turn is None else f"{r.where} (message {seg.turn})"
            out.append(Example(ids, labels, seg.prompt_text, seg.answer, where, record=r.fields,
                               prompt_len=prompt_len, shown=last_user, weight=example_weight(r.fields, cfg, r.where)))
            stats.lengths.append(len(ids))
            stats.supervised.append(sum(label != IGNORE for label in labels))
    stats.kept = len(out)
    if not out and records:
        why = [f"{n} {what}" for n, what in (
            (stats.dropped_long, f"longer than data.max_length={cfg.max_length}"),
            (stats.dropped_empty, "with an empty assistant turn"),
            (shapes["dropped_system"], "with a system prompt the template refuses (chat.system_fallback=drop_record)"))
            if n]
        raise TunelabError(f"all {stats.total} conversations dropped: {', '.join(why)}", f"data.{split}")
    return out, stats
