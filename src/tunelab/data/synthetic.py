"""Synthetic training records: fresh strings sampled from a character n-gram model of a field's training
values (makemore's bigram model, with a longer context), none equal to a real or held-out value.

Data augmentation for tasks over short strings such as names. Trained for epochs on the same 29k names,
a model memorises them (on the reversal task: training loss 0.04 against 0.36 on held-out names); new
name-like strings at every step make it learn the rule instead. The targets still come from the recipe's
templates (``{name|reverse}``), so they are exact. The model is fitted on the training split only, after
the held-out split is taken, and held-out values are never produced.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, defaultdict
from collections.abc import Set as AbstractSet

from .mixture import proportional_counts

BOS, EOS = "\x02", "\x03"  # start padding and end of string: characters no value contains


class CharNgram:
    """p(next character | previous ``order - 1`` characters), by counting; sampling draws from the counts."""

    def __init__(self, values: list[str], order: int) -> None:
        if order < 1:
            raise ValueError("order must be at least 1")
        self.context = order - 1
        counts: dict[str, Counter] = defaultdict(Counter)
        for v in values:
            s = BOS * self.context + v + EOS
            for i in range(self.context, len(s)):
                counts[s[i - self.context:i]][s[i]] += 1
        self.table: dict[str, tuple[list[str], list[int]]] = {}
        for ctx, c in counts.items():
            chars = sorted(c)
            cum, total = [], 0
            for ch in chars:
                total += c[ch]
                cum.append(total)
            self.table[ctx] = (chars, cum)

    def sample(self, rng: random.Random, max_len: int, length: int | None = None) -> str | None:
        """One string, or None when it runs past max_len characters. ``length``: a string of exactly that
        many characters, drawn from the model conditioned on not ending before (each draw before the last
        leaves the end out; the string ends after its last character), or None when a context has no other
        continuation."""
        ctx = BOS * self.context
        out: list[str] = []
        while True:
            chars, cum = self.table[ctx]
            if length is not None and chars[0] == EOS:  # (EOS sorts first: leave it out)
                if len(chars) == 1:
                    return None
                chars, cum = chars[1:], [c - cum[0] for c in cum[1:]]
            ch = chars[bisect.bisect_right(cum, rng.random() * cum[-1])]
            if ch == EOS:
                return "".join(out)
            out.append(ch)
            if length is not None and len(out) == length:
                return "".join(out)
            if len(out) > max_len:
                return None
            if self.context:
                ctx = (ctx + ch)[-self.context:]


def same_value(s: str) -> str:
    """What two values must differ in to count as different: templates can change case and strip spaces."""
    return s.strip().casefold()


def synthesize(values: list[str], count: int, order: int, seed: int, exclude: AbstractSet[str] = frozenset(),
               tries_per_value: int = 20, lengths: str = "observed") -> list[str]:
    """Up to ``count`` distinct strings from a CharNgram of ``values``, none in ``values`` or ``exclude``
    (compared up to case and surrounding spaces, ``same_value``), with the length distribution of
    ``values`` (each length gets its share of ``count``; a length whose novel strings run out, such as
    the shortest names, gets fewer), or with ``lengths="uniform"`` an equal share for every length from the
    shortest value's to the longest's (each string drawn at its length: long ones as often as short ones).
    Deterministic for a seed; the order is shuffled."""
    values = [v for v in values if v]
    if not values or count <= 0:
        return []
    model = CharNgram(values, order)
    seen = Counter(len(v) for v in values)
    if lengths == "uniform":
        seen = Counter({n: 1 for n in range(min(seen), max(seen) + 1)})
    quota = proportional_counts(count, dict(sorted(seen.items())))  # ties: the shorter length
    taken = {same_value(v) for v in [*values, *exclude]}
    rng = random.Random(seed)
    by_len: dict[int, list[str]] = defaultdict(list)
    missing = sum(quota.values())
    max_len = max(seen)
    open_lengths = [n for n in sorted(quota) if quota[n]]
    for _ in range(tries_per_value * count):
        if missing == 0:
            break
        target = None
        if lengths == "uniform":  # draw at a length that still needs strings
            open_lengths = [n for n in open_lengths if len(by_len[n]) < quota[n]]
            target = rng.choice(open_lengths)
        s = model.sample(rng, max_len, target)
        if s is None or same_value(s) in taken or len(by_len[len(s)]) >= quota.get(len(s), 0):
            continue
        taken.add(same_value(s))
        by_len[len(s)].append(s)
        missing -= 1
    out = [s for n in sorted(by_len) for s in by_len[n]]
    rng.shuffle(out)
    return out
