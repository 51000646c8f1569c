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
        for name in SPLITS:
            splits[name], st = encode_chat(records[name], tok, cfg.data, cfg.chat, name)
            stats[name] = st.summary()
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


def encode_chat(records: list[Record], tok, cfg: DataConfig, ccfg: ChatConfig,
                split: str) -> tuple[list[Example], EncodeStats]:
    """Conversations -> Examples with loss on assistant turns (see data/chat.py)."""
    tmpl = chat.resolve_template(ccfg.template, tok, ccfg.stop)
    stop_id = chat.stop_id(tmpl, tok)
    stats = EncodeStats(total=len(records))
    specials = chat.special_texts(tok)
    out = []
    for r in records:
        msgs = chat.conversation(r.fields, ccfg, r.where)
        chat.check_roles(msgs, r.where)
        chat.check_no_special_tokens(msgs, specials, r.where)
        empty = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            if cfg.empty_target == "drop":
                stats.dropped_empty += 1
                continue
            raise TunelabError(f"message {empty[0]}: empty assistant turn (data.empty_target=drop skips such "
                               "conversations)", r.where)
        truncated = False
        while True:
            seg = chat.segment(tmpl, msgs, tok, r.where)
            ids, labels, prompt_len = chat.tokenize_segments(seg, tok, ccfg.train_on, stop_id, r.where, tmpl.name)
            if len(ids) <= cfg.max_length:
                break
            if cfg.truncation == "error":
                raise TunelabError(f"conversation has {len(ids)} tokens, more than data.max_length="
                                   f"{cfg.max_length}", r.where)
            shorter = chat.drop_last_exchange(msgs) if cfg.truncation == "truncate" else []
            if not any(m["role"] == "assistant" for m in shorter):
                ids = []
                break
            msgs, truncated = shorter, True  # truncation drops whole turns from the end
        if not ids:
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                continue
            if cfg.empty_target == "drop":
                stats.dropped_empty += 1
                continue
            raise TunelabError(f"zero supervised tokens after truncation: the first assistant turn does not fit "
                               f"in data.max_length={cfg.max_length}", r.where)
        stats.truncated += truncated
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        last_user = msgs[last - 1]["content"] if last and msgs[last - 1]["role"] == "user" else ""
        out.append(Example(ids, labels, seg.prompt_text, seg.answer, r.where, record=r.fields,
                           prompt_len=prompt_len, shown=last_user, weight=example_weight(r.fields, cfg, r.where)))
        stats.lengths.append(len(ids))
        stats.supervised.append(sum(label != IGNORE for label in labels))
    stats.kept = len(out)
    if not out and records:
        raise TunelabError(f"all {stats.total} conversations dropped: {stats.dropped_long} longer than "
                           f"data.max_length={cfg.max_length}, {stats.dropped_empty} with an empty assistant "
                           "turn", f"data.{split}")
    return out, stats
