"""data.synthetic: the character n-gram model's counts and samples, and synthesize's guarantees."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tunelab.data.synthetic import BOS, EOS, CharNgram, synthesize


def test_counts_by_hand():
    m = CharNgram(["ab", "ac", "b"], order=2)  # context: the one previous character
    assert m.table[BOS] == (["a", "b"], [2, 3])  # starts: a, a, b
    assert m.table["a"] == (["b", "c"], [1, 2])
    assert m.table["b"] == ([EOS], [2])  # "b" ends "ab" and "b"
    assert m.table["c"] == ([EOS], [1])


def test_sample_frequencies_follow_the_counts():
    m = CharNgram(["ab", "ac", "b"], order=2)
    rng = random.Random(0)
    freq = Counter(m.sample(rng, 5) for _ in range(30_000))
    assert set(freq) == {"ab", "ac", "b"}  # every string this model can produce
    # p(ab) = 2/3 * 1/2, p(ac) = 1/3, p(b) = 1/3
    for s in freq:
        assert freq[s] / 30_000 == pytest.approx(1 / 3, abs=0.015)


def test_order_one_is_a_unigram_and_long_samples_are_refused():
    m = CharNgram(["aaaa"], order=1)  # p(a) = 4/5, p(end) = 1/5, whatever came before
    assert m.context == 0 and m.table[""] == ([EOS, "a"], [1, 5])
    rng = random.Random(1)
    assert all(s is None or len(s) <= 3 for s in (m.sample(rng, 3) for _ in range(200)))
    assert any(m.sample(rng, 3) is None for _ in range(200))


def test_synthesize_is_novel_distinct_deterministic_and_length_matched():
    rng = random.Random(0)
    letters = "aeioulnrsmk"
    values = sorted({"".join(rng.choice(letters) for _ in range(rng.choice([4, 5, 5, 6, 6, 6]))) for _ in range(3000)})
    held = set(synthesize(values, 50, 3, seed=99))  # strings this model produces: hold them out
    out = synthesize(values, 2000, order=3, seed=7, exclude=held)
    assert out == synthesize(values, 2000, order=3, seed=7, exclude=held)
    assert out != synthesize(values, 2000, order=3, seed=8, exclude=held)
    assert len(out) == len(set(out)) and 1900 <= len(out) <= 2000
    assert len(synthesize(values, 7, 3, seed=0)) == 7  # the length quotas add up to the count
    assert not set(out) & set(values) and not set(out) & held
    want = Counter(len(v) for v in values)
    got = Counter(len(s) for s in out)
    for n in want:
        assert got[n] / len(out) == pytest.approx(want[n] / len(values), abs=0.02)
    assert synthesize(values, 0, 3, seed=0) == [] and synthesize([], 10, 3, seed=0) == []


def test_exclusion_ignores_case_and_surrounding_spaces():
    """A template may apply lower/upper/title/strip: ' Emma' must not stand in for a held-out 'emma'."""
    values = ["ab", "ba", "aab", "abb", "bab", "aba"]
    everything = set(synthesize(values, 1000, order=2, seed=0))
    assert everything  # the strings this model can make beyond the values
    held = {f" {s.upper()} " for s in everything}
    assert synthesize(values, 1000, order=2, seed=0, exclude=held) == []
    assert synthesize(["AB", "Ba", "aab", "abb", "bab", "aba"], 50, 2, seed=0, exclude=set()) != []
    assert not {s.casefold() for s in synthesize(["AB", "Ba"] * 3, 50, 2, seed=1)} & {"ab", "ba"}


def test_sample_at_a_length_never_ends_early():
    m = CharNgram(["ab", "ac", "b", "abcab"], order=2)
    rng = random.Random(0)
    for n in (1, 3, 6):
        out = [m.sample(rng, 10, n) for _ in range(300)]
        assert all(s is None or len(s) == n for s in out) and any(s is not None for s in out)
    # "c" is always followed by the end or by "a": at a length, the end is left out and "a" is drawn
    m = CharNgram(["ac", "ca"], order=2)
    assert {m.sample(rng, 10, 3) for _ in range(50)} <= {"aca", "cac", None}


def test_uniform_lengths_give_every_length_its_share():
    rng = random.Random(0)
    letters = "aeioulnrsmk"
    sizes = [3, 4] + [5] * 8 + [6] * 8 + [9]  # long values are rare
    values = sorted({"".join(rng.choice(letters) for _ in range(rng.choice(sizes))) for _ in range(3000)})
    out = synthesize(values, 1400, order=3, seed=1, lengths="uniform")
    got = Counter(len(s) for s in out)
    assert set(got) == set(range(3, 10)) and all(got[n] == 200 for n in range(4, 10)), got
    assert not set(out) & set(values) and len(out) == len(set(out))
    assert out == synthesize(values, 1400, order=3, seed=1, lengths="uniform")
    observed = Counter(len(s) for s in synthesize(values, 1400, order=3, seed=1))
    assert observed[9] < got[9] / 2  # the field's own distribution has few long strings
