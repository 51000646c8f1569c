"""Invented name-like strings for checking that reversal was learnt as a skill: strings such as ``zynwakurgi``
or ``dehysgy`` that are in no list of names, so no model has seen their tokens reversed.

Each string is 1-4 random syllables (an optional onset of one or two consonants, a vowel or two, an optional
coda), 3 to 12 letters, drawn with a fixed seed; any string that is a name of ``data/names.txt`` (and any
repeat) is skipped. The letters and clusters are uniform, not learnt from the names, so the strings are less
name-like than ``data.synthetic``'s (a character n-gram model of the names).

    python experiments/invented_names.py                       # writes data/invented_names.txt (500 strings)
    python experiments/invented_names.py --style simple        # data/invented_names_simple.txt
    tunelab eval runs/reverse_names data.test.path=data/invented_names.txt data.test.text_field=name \
        --out runs/reverse_names/invented.json
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSONANTS = list("bcdfghjklmnpqrstvwxz")
CLUSTERS = ["bl", "br", "ch", "dr", "fl", "fr", "gl", "gr", "kh", "kl", "kr", "ph", "pl", "pr", "sh", "sk", "sl",
            "sn", "sp", "st", "sw", "th", "tr", "ts", "vr", "wr", "zh"]
VOWELS = list("aeiouy")
CODAS = list("bdgklmnprstxz") + ["ck", "ld", "lt", "mp", "nd", "ng", "nk", "rd", "rk", "rn", "rt", "sk", "st"]


def syllable(rng: random.Random) -> str:
    """An onset of one or two consonants (or none), a vowel or two, a coda of up to two consonants (or none)."""
    onset = rng.choice(CLUSTERS) if rng.random() < 0.2 else rng.choice(CONSONANTS) if rng.random() < 0.85 else ""
    nucleus = rng.choice(VOWELS) + (rng.choice(VOWELS) if rng.random() < 0.15 else "")
    coda = rng.choice(CODAS) if rng.random() < 0.35 else ""
    return onset + nucleus + coda


def simple_syllable(rng: random.Random) -> str:
    """A consonant, a vowel and sometimes one more consonant: zyn-wa-kur-gi, de-hys-gy."""
    return rng.choice(CONSONANTS) + rng.choice(VOWELS) + (rng.choice(CONSONANTS) if rng.random() < 0.4 else "")


def invented(n: int, seed: int, exclude: set[str], style: str = "clusters") -> list[str]:
    """``n`` distinct invented strings of 3-12 letters, none in ``exclude``; ``style`` clusters (consonant
    clusters, double vowels, two-letter codas) or simple (consonant-vowel syllables, sometimes closed)."""
    rng = random.Random(seed)
    make = simple_syllable if style == "simple" else syllable
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        s = "".join(make(rng) for _ in range(rng.choice([1, 2, 2, 3, 3, 3, 4])))
        if 3 <= len(s) <= 12 and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=11711)
    p.add_argument("--names", type=Path, default=ROOT / "data" / "names.txt")
    p.add_argument("--style", choices=["clusters", "simple"], default="clusters")
    p.add_argument("--out", type=Path, help="default: data/invented_names.txt (clusters), "
                   "data/invented_names_simple.txt (simple)")
    a = p.parse_args()
    out = a.out or ROOT / "data" / ("invented_names.txt" if a.style == "clusters" else "invented_names_simple.txt")
    names = {x.strip().lower() for x in a.names.read_text().splitlines() if x.strip()}
    out.write_text("\n".join(invented(a.n, a.seed, names, a.style)) + "\n")
    print(f"{a.n} invented strings ({a.style}) -> {out}")


if __name__ == "__main__":
    main()
