"""How many characters one token can stand for: an example too long for data.max_length is found
without tokenizing it (a 60 MB line would take minutes to tokenize only to be dropped).

The bound: a tokenizer splits the (normalized) text into pieces, each piece one token whose string in
the vocabulary is at least as long as the characters it covers (a byte-level token's string has one
character a byte; a byte-fallback token ``<0xE2>`` covers a single byte of a character; an added or
special token in the text covers exactly its own content). So a text of n characters needs at least
ceil(n / L) tokens, L the longest token string. A normalizer may shorten the text first: NFC/NFKC
compose at most 4 code points into one (the longest canonical decomposition), a ``Replace`` of a
string by a shorter one shortens by its ratio; the bound is then ceil(n / (k L)).

It holds only for tokenizers built that way, so :func:`token_bound` answers ``None`` (no shortcut,
every text tokenized as before) for anything else: a slow tokenizer, a normalizer that can delete
(strip, accents, control characters, regex replacements, sentencepiece's precompiled map), a
pre-tokenizer that drops whitespace (BERT's), a model whose unknown token can swallow many characters
(WordPiece, WordLevel, Unigram without byte fallback, BPE fusing unknowns), or an added token that
swallows the whitespace around it (``lstrip``/``rstrip``). A byte-level BPE without a token for some
bytes and no unknown token drops those characters (SmolLM2's: 6 control characters): they count for
nothing.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

MAX_COMPOSE = 4  # the most code points NFC/NFKC composes into one (U+1F82's canonical decomposition)

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def min_tokens(n_chars: int, chars_per_token: int) -> int:
    """The fewest tokens a text of ``n_chars`` characters can be: ceil(n_chars / chars_per_token)."""
    return -(-n_chars // chars_per_token)


def cannot_fit(n_chars: int, max_tokens: int, chars_per_token: int | None) -> bool:
    """True when ``n_chars`` characters surely need more than ``max_tokens`` tokens (False: unknown, tokenize)."""
    return chars_per_token is not None and n_chars > max_tokens * chars_per_token


def _normalizer_factor(spec: dict[str, Any] | None) -> int | None:
    """By how much a normalizer can shorten a text at most (1: never), or None: without bound."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            f = _normalizer_factor(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"):
        return 1
    if kind in ("NFC", "NFKC"):
        return MAX_COMPOSE
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        if not isinstance(pattern, dict) or "String" not in pattern or not pattern["String"] or not content:
            return None  # a regex can match runs of any length; an empty content deletes
        return max(1, min_tokens(len(pattern["String"]), len(content)))
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, Nmt, ... can delete characters


def _pre_tokenizer_keeps_all(spec: dict[str, Any] | None) -> bool:
    """The pre-tokenizer splits the text without dropping a character."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_all(p) for p in spec.get("pretokenizers", []))
    if kind in ("Split", "Punctuation"):
        return spec.get("behavior") != "Removed"
    return kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts")


def _byte_level(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_byte_level(p) for p in spec.get("pretokenizers", []))
    return spec.get("type") == "ByteLevel"


def _unknown_characters(model: dict[str, Any], vocab: dict[str, int], byte_level: bool) -> str | None:
    """The characters the model drops (a byte-level BPE without a token for some bytes, and no unknown
    token: SmolLM2's has none for 6 control characters), "" if none, or None where an unknown token can
    cover several characters (or whole characters vanish in ways not known here)."""
    bytes_known = all(f"<0x{b:02X}>" in vocab for b in range(256))
    if model.get("type") == "Unigram":
        return "" if model.get("byte_fallback") and bytes_known else None
    if model.get("type") != "BPE":
        return None  # WordPiece and WordLevel map a whole unknown word to one token
    if model.get("byte_fallback") and bytes_known:
        return ""  # an unknown character becomes the tokens of its bytes
    unk = model.get("unk_token")
    one_unk = unk is not None and unk in vocab and not model.get("fuse_unk")  # one unknown token a character
    if byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        lost = [_byte_of(c) for c in ByteLevel.alphabet() if c not in vocab]  # bytes without a token
        if not lost or one_unk:
            return ""
        if unk is not None or any(0x80 <= b < 0xC0 for b in lost):
            return None  # fused unknown tokens; or a continuation byte lost: a whole character may vanish
        # without an unknown token a byte's character is dropped: an ASCII character vanishes, a longer
        # one loses its lead byte but keeps its continuation bytes' tokens
        return "".join(chr(b) for b in lost if b < 0x80)
    return "" if one_unk else None


def _byte_of(c: str) -> int:
    """The byte a byte-level alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if ord(c) in printable:
        return ord(c)
    others = [b for b in range(256) if b not in printable]
    return others[ord(c) - 256]


@dataclass(frozen=True)
class TokenBound:
    """A tokenizer's bound: one token stands for at most ``chars_per_token`` characters of a text, and the
    characters of ``dropped`` (no token at all) count for nothing."""

    chars_per_token: int
    dropped: str = ""

    def makes_tokens(self, text: str) -> bool:
        """The text tokenizes to at least one token (special tokens aside)."""
        return bool(text.strip(self.dropped) if self.dropped else text)

    def min_tokens(self, texts: tuple[str, ...]) -> int:
        """The fewest tokens the texts, each tokenized on its own, can make."""
        n = sum(len(t) - sum(t.count(c) for c in self.dropped) for t in texts)
        return min_tokens(n, self.chars_per_token)

    def cannot_fit(self, texts: tuple[str, ...], max_tokens: int) -> bool:
        """True when the texts, each tokenized on its own, surely make more than ``max_tokens`` tokens."""
        n = sum(len(t) for t in texts)
        if not cannot_fit(n, max_tokens, self.chars_per_token):
            return False  # the usual case, decided by the length alone
        n -= sum(t.count(c) for t in texts for c in self.dropped)
        return cannot_fit(n, max_tokens, self.chars_per_token)


def _compute(tok) -> TokenBound | None:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        vocab = tok.get_vocab()
    except Exception:  # a tokenizer this does not understand: no shortcut
        return None
    if any(a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens") or []):
        return None  # such a token also covers the whitespace next to it, however long
    factor = _normalizer_factor(spec.get("normalizer"))
    if factor is None or not _pre_tokenizer_keeps_all(spec.get("pre_tokenizer")):
        return None
    dropped = _unknown_characters(spec.get("model") or {}, vocab, _byte_level(spec.get("pre_tokenizer")))
    if dropped is None or (dropped and spec.get("normalizer") is not None):
        return None
    longest = max((len(t) for t in vocab), default=0)
    return TokenBound(longest * factor, dropped) if longest else None


def token_bound(tok) -> TokenBound | None:
    """``tok``'s bound on the characters a token stands for, or None where none is known (then every
    text must be tokenized to know its length)."""
    try:
        return _CACHE[tok]
    except (KeyError, TypeError):
        pass
    value = _compute(tok)
    try:
        _CACHE[tok] = value
    except TypeError:  # not weakly referenceable: computed again next time
        pass
    return value
