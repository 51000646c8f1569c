"""Text metrics as pure functions: exact match, containment, ROUGE-L.

ROUGE-L (Lin 2004) is the F-measure of the longest common subsequence of the two token sequences:
P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R). Tokens are lower-cased runs of
letters and digits, as in the reference implementation's default tokenizer (rouge_score, without
stemming; SNI's official scorer also stems words, so its ROUGE-L on inflected words is higher).
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after collapsing whitespace (the completion's leading space is not part of the answer)."""
    return normalize(prediction) == normalize(reference)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (SNI's normalisation for exact match)."""
    import string

    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def answer_match(prediction: str, reference: str) -> bool:
    """Exact match after normalize_answer: "Paris." matches "paris"."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> bool:
    """The reference appears in the prediction, ignoring case and runs of whitespace."""
    return normalize(reference).lower() in normalize(prediction).lower()


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of prediction against reference, in [0, 1]."""
    p, r = tokens(prediction), tokens(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def best_of(metric, prediction: str, references: list[str]) -> float:
    """The best score of a prediction against any of several valid references."""
    return max((float(metric(prediction, ref)) for ref in references), default=0.0)


MATCHERS = {"exact": exact_match, "contains": contains, "rouge": rouge_l}
