"""Records -> prompt/completion pairs -> tokenized Examples with loss masks.

An Example's ``labels`` are -100 on prompt tokens and equal ``input_ids`` on completion tokens (and
the appended EOS, so the model learns to stop). The prompt is tokenized on its own, exactly as it will
be at generation time, so training and use see the same tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import TunelabError, one_line
from ..plugins import load_function
from .lengths import token_bound
from .readers import read_source
from .templates import check_template, render
from .types import IGNORE, Example, Pair, Record


def mask_prompt(prompt_ids: list[int], target_ids: list[int]) -> tuple[list[int], list[int]]:
    """input_ids and labels for one example: loss only on the target tokens."""
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + list(target_ids)


def load_formatter(spec: str) -> Callable[[dict], Any]:
    return load_function(spec, "data.formatter")


ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ORCA_PROMPT = "### System:\n{system}\n\n### User:\n{question}\n\n### Assistant:\n"
ORCA_PROMPT_NO_SYSTEM = "### User:\n{question}\n\n### Assistant:\n"


def _text_field(record: Record, name: str, what: str, required: bool = True) -> str:
    if name not in record.fields:
        if not required:
            return ""
        raise TunelabError(f"missing field {name!r} ({what}; data.columns.* renames it)", record.where)
    value = record.fields[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise TunelabError(f"field {name!r} must be text, got {type(value).__name__}", record.where)
    return value


def instruction_pair(record: Record, cfg: DataConfig) -> Pair:
    """An Alpaca / Self-Instruct (instruction, input, output) or OpenOrca (system_prompt, question,
    response) record as a prompt/completion pair, in the format's own prompt layout."""
    c = cfg.columns
    if cfg.format == "alpaca":
        instruction = _text_field(record, c.instruction, "the instruction")
        if not instruction.strip():
            raise TunelabError(f"empty instruction (field {c.instruction!r})", record.where)
        inp = _text_field(record, c.input, "the input", required=False)
        output = _text_field(record, c.output, "the output")
        prompt = (ALPACA_PROMPT.format(instruction=instruction.strip(), input=inp.strip()) if inp.strip()
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction.strip()))
        return Pair(prompt, output, record.where, record.fields)
    question = _text_field(record, c.question, "the question")
    if not question.strip():
        raise TunelabError(f"empty question (field {c.question!r})", record.where)
    system = _text_field(record, c.system, "the system prompt", required=False)
    response = _text_field(record, c.response, "the response")
    prompt = (ORCA_PROMPT.format(system=system.strip(), question=question.strip()) if system.strip()
              else ORCA_PROMPT_NO_SYSTEM.format(question=question.strip()))
    return Pair(prompt, response, record.where, record.fields)


def to_pairs(records: list[Record], cfg: DataConfig) -> list[Pair]:
    if cfg.format != "template":
        return [instruction_pair(r, cfg) for r in records]
    if cfg.formatter:
        fn = load_formatter(cfg.formatter)
        out = []
        for r in records:
            try:
                res = fn(dict(r.fields))
            except Exception as e:
                raise TunelabError(f"formatter {cfg.formatter} failed: {one_line(e)}", r.where) from None
            if not (isinstance(res, dict) and isinstance(res.get("prompt"), str)
                    and isinstance(res.get("completion"), str)):
                raise TunelabError(f"formatter {cfg.formatter} must return "
                                   "{'prompt': str, 'completion': str}", r.where)
            out.append(Pair(res["prompt"], res["completion"], r.where, r.fields))
        return out
    check_template(cfg.prompt, "data.prompt")
    check_template(cfg.completion, "data.completion")
    return [Pair(render(cfg.prompt, r.fields, r.where, "data.prompt"),
                 render(cfg.completion, r.fields, r.where, "data.completion"), r.where, r.fields)
            for r in records]


@dataclass
class EncodeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_empty: int = 0
    lengths: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = max(len(self.lengths), 1)
        s = sorted(self.lengths) or [0]
        return {
            "records": self.total, "examples": self.kept, "truncated": self.truncated,
            "dropped_too_long": self.dropped_long, "dropped_empty_target": self.dropped_empty,
            "tokens": sum(self.lengths), "supervised_tokens": sum(self.supervised),
            "length_mean": round(sum(self.lengths) / n, 2), "length_median": s[len(s) // 2],
            "length_max": s[-1],
        }


def example_weight(record: dict, cfg: DataConfig, where: str) -> float:
    """The example's loss weight: 1, or the record's ``data.weight_field`` (a non-negative number)."""
    if not cfg.weight_field:
        return 1.0
    if cfg.weight_field not in record:
        raise TunelabError(f"missing field {cfg.weight_field!r} (used by data.weight_field)", where)
    value = record[cfg.weight_field]
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise TunelabError(f"field {cfg.weight_field!r} must be a number, got {value!r}", where) from None
    if not (w >= 0 and w != float("inf")):
        raise TunelabError(f"field {cfg.weight_field!r} must be a finite non-negative weight, got {value!r}", where)
    return w


def tokenize(texts: list[str], tok, special: bool, desc: str, chunk: int = 20_000) -> list[list[int]]:
    """Token ids of many texts, in chunks, with a progress bar on a terminal when there are many."""
    import sys

    from tqdm.auto import tqdm

    out: list[list[int]] = []
    show = len(texts) > chunk and sys.stderr.isatty()
    for s in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk", disable=not show, leave=False):
        out.extend(tok(texts[s:s + chunk], add_special_tokens=special)["input_ids"])
    return out


def char_tokens(texts: list[str], tok, where: str = "data.completion_tokens") -> list[list[int]]:
    """Token ids of each text one character at a time (a character's bytes where a byte-level tokenizer
    has no token for it): the same text as the usual tokenization, checked by decoding both. A tokenizer
    that changes a lone character (a sentencepiece prefix space, say) fails the check: an error, never
    a silently different text."""
    table: dict[str, list[int]] = {}
    out = []
    for text in texts:
        ids: list[int] = []
        for c in text:
            if c not in table:
                table[c] = tok(c, add_special_tokens=False)["input_ids"]
            ids.extend(table[c])
        out.append(ids)
    usual = tokenize(texts, tok, False, "tokenize targets (to check)")
    for text, a, b in zip(texts, tok.batch_decode(out), tok.batch_decode(usual)):
        if a != b:
            raise TunelabError(f"this tokenizer does not spell {text!r} one character at a time (it decodes "
                               f"to {a!r}); use data.completion_tokens=bpe", where)
    return out


def encode(pairs: list[Pair], tok, cfg: DataConfig, split: str) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats(total=len(pairs))
    eos = tok.eos_token_id
    if cfg.add_eos and eos is None:
        raise TunelabError("the tokenizer has no EOS token; set data.add_eos=false", "data.add_eos")
    # too long, known from the characters alone: dropped or refused as they would be after tokenizing,
    # without tokenizing them (truncation needs the tokens)
    bound = token_bound(tok) if cfg.truncation != "truncate" else None
    long = [bound is not None and bound.cannot_fit((p.prompt, p.completion), cfg.max_length) for p in pairs]
    prompts = tokenize(["" if lg else p.prompt for p, lg in zip(pairs, long)], tok, True, f"tokenize {split}")
    completions = ["" if lg else p.completion for p, lg in zip(pairs, long)]
    if cfg.completion_tokens == "chars":
        targets = char_tokens(completions, tok)
    else:
        targets = tokenize(completions, tok, False, f"tokenize {split} targets")
    out = []
    for pair, p_ids, t_ids, lg in zip(pairs, prompts, targets, long):
        if not (p_ids or (lg and bound and bound.makes_tokens(pair.prompt))):
            raise TunelabError("empty prompt: the model needs at least one token before the completion "
                               "(check the prompt template and the record's fields, or set model.bos_token)",
                               pair.where)
        if not pair.completion.strip() or not (bound.makes_tokens(pair.completion) if lg and bound else t_ids):
            if cfg.empty_target == "drop":
                stats.dropped_empty += 1
                continue
            raise TunelabError("empty completion: no tokens to train on (data.empty_target=drop skips "
                               "such examples)", pair.where)
        t_ids = list(t_ids) + ([eos] if cfg.add_eos else [])
        if lg or len(p_ids) + len(t_ids) > cfg.max_length:
            if cfg.truncation == "drop":
                stats.dropped_long += 1
                continue
            if cfg.truncation == "error":
                n = (f"at least {bound.min_tokens((pair.prompt, pair.completion))}" if lg and bound
                     else len(p_ids) + len(t_ids))
                raise TunelabError(f"example has {n} tokens, more than data.max_length={cfg.max_length}",
                                   pair.where)
            room = cfg.max_length - len(p_ids)
            if room < 1:
                raise TunelabError(f"data.max_length={cfg.max_length} is shorter than the prompt "
                                   f"({len(p_ids)} tokens): no room for the completion", pair.where)
            t_ids = t_ids[:room]
            stats.truncated += 1
        ids, labels = mask_prompt(list(p_ids), t_ids)
        out.append(Example(ids, labels, pair.prompt, pair.completion, pair.where, record=pair.record,
                           prompt_len=len(p_ids), weight=example_weight(pair.record, cfg, pair.where),
                           group=pair.group, held_out=pair.held_out, references=pair.references))
        stats.lengths.append(len(ids))
        stats.supervised.append(len(t_ids))
    stats.kept = len(out)
    if not out and pairs:
        why = (f"all {stats.total} examples dropped: {stats.dropped_long} longer than "
               f"data.max_length={cfg.max_length}, {stats.dropped_empty} with an empty completion")
        raise TunelabError(why, f"data.{split}")
    return out, stats


def _size(value: float, n: int) -> int:
    return int(value) if value >= 1 else int(round(value * n))


def split_records(cfg: DataConfig, seed: int) -> dict[str, list[Record]]:
    """Read the sources and make train/validation/test record lists (a split seeded by data.split_seed, else
    ``seed``, where asked; the synthetic records by ``seed``)."""
    assert cfg.train is not None
    train = read_source(cfg.train)
    where = cfg.train.path or cfg.train.dataset or "data.train"
    if not train:
        raise TunelabError("no records", where)
    if cfg.unique_by:
        seen: set = set()
        kept = []
        for r in train:
            if cfg.unique_by not in r.fields:
                raise TunelabError(f"missing field {cfg.unique_by!r} (used by data.unique_by)", r.where)
            v = r.fields[cfg.unique_by]
            if isinstance(v, (list, dict)):
                v = json.dumps(v, sort_keys=True)  # a list or object compares by its JSON text
            if v not in seen:
                seen.add(v)
                kept.append(r)
        train = kept
    splits: dict[str, list[Record]] = {"validation": [], "test": []}
    need_split = [s for s in ("test", "validation") if getattr(cfg, s) is None and getattr(cfg, f"{s}_size") > 0]
    if need_split:
        train = list(train)
        random.Random(seed if cfg.split_seed is None else cfg.split_seed).shuffle(train)
        for s in need_split:  # a fraction is of the records left: test first, then validation from the rest
            k = _size(getattr(cfg, f"{s}_size"), len(train))
            if k >= len(train):
                raise TunelabError(f"holding out {k} leaves no training records (there are {len(train)})",
                                   f"data.{s}_size")
            splits[s], train = train[:k], train[k:]
    for s in ("validation", "test"):
        src = getattr(cfg, s)
        if src is not None:
            splits[s] = read_source(src)
            if not splits[s]:
                raise TunelabError("no records", src.path or src.dataset or f"data.{s}")
    if cfg.train_size is not None:
        train = train[: cfg.train_size]
    if cfg.synthetic.count:
        train = train + synthetic_records(train, [*splits["validation"], *splits["test"]], cfg, seed)
    splits["train"] = train
    return splits


SYNTHETIC = "data.synthetic"  # where= of a synthetic record: data.synthetic[i]


def synthetic_records(train: list[Record], held: list[Record], cfg: DataConfig, seed: int) -> list[Record]:
    """data.synthetic: records of one field sampled from a character n-gram model of the training values
    (after the split, so held-out values never shape it), none equal to a training or held-out value."""
    from .synthetic import synthesize

    f = cfg.synthetic.field
    assert f is not None, "the recipe's checks require data.synthetic.field when data.synthetic.count is set"
    values = []
    for r in train:
        v = r.fields.get(f)
        if not isinstance(v, str):
            raise TunelabError(f"data.synthetic.field {f!r} must be a string field, got {v!r}", r.where)
        values.append(v)
    exclude = {str(r.fields[f]) for r in held if f in r.fields}
    made = synthesize(values, cfg.synthetic.count, cfg.synthetic.order, seed, exclude, lengths=cfg.synthetic.lengths)
    return [Record({f: v}, f"{SYNTHETIC}[{i}]") for i, v in enumerate(made)]


def marked(tok, ids: list[int], labels: list[int], color: bool = False) -> str:
    """The tokens of one example, those carrying loss inside ⟦ ⟧ (or highlighted on a terminal)."""
    parts, inside = [], False
    for i, label in zip(ids, labels):
        sup = label != IGNORE
        if sup and not inside:
            parts.append("\x1b[42;30m" if color else "⟦")
        elif not sup and inside:
            parts.append("\x1b[0m" if color else "⟧")
        inside = sup
        parts.append(tok.decode([i]))
    if inside:
        parts.append("\x1b[0m" if color else "⟧")
    return "".join(parts)
