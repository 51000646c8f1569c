"""Write data/chat_names.jsonl: short multi-turn conversations about names, for recipes/chat_names.yaml.

Each conversation is about one name from data/names.txt (each name used once) and has one to three
user/assistant exchanges: the first letter, the last letter, the number of letters, whether it starts with a
vowel, whether it is longer than five letters, and who the assistant is. Follow-up questions say "it",
so the answer depends on the earlier turns. The assistant follows the recipe's system prompt: the answer
only, in lowercase. Deterministic: python scripts/make_chat_names.py [--n 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST = [("What is the first letter of {Name}?", "And what is its first letter?"),
         ("Which letter does {Name} start with?", "Which letter does it start with?")]
LAST = [("What is the last letter of {Name}?", "And its last letter?"),
        ("Which letter does {Name} end with?", "Which letter does it end with?")]
LENGTH = [("How many letters are in {Name}?", "How many letters does it have?"),
          ("How long is the name {Name}?", "How long is it?")]
VOWEL = [("Does {Name} start with a vowel?", "Does it start with a vowel?")]
LONG = [("Is {Name} longer than five letters?", "Is it longer than five letters?")]
WHO = ["Who are you?", "What is your name?"]


def answers(name: str) -> dict[str, str]:
    return {"first": name[0], "last": name[-1], "length": str(len(name)),
            "vowel": "yes" if name[0] in "aeiou" else "no", "long": "yes" if len(name) > 5 else "no"}


def conversation(name: str, rng: random.Random) -> dict:
    kinds = {"first": FIRST, "last": LAST, "length": LENGTH, "vowel": VOWEL, "long": LONG}
    n_turns = rng.choice([1, 2, 2, 3])
    asked = rng.sample(sorted(kinds), n_turns)
    ans = answers(name)
    messages = []
    if rng.random() < 0.15:
        messages += [{"role": "user", "content": rng.choice(WHO)}, {"role": "assistant", "content": "i am namey"}]
    for i, kind in enumerate(asked):
        first_form, follow_up = rng.choice(kinds[kind])
        q = first_form.format(Name=name.capitalize()) if i == 0 else follow_up
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": ans[kind]}]
    return {"messages": messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "data" / "chat_names.jsonl"))
    args = ap.parse_args()
    names = sorted(set((ROOT / "data" / "names.txt").read_text().split()))
    rng = random.Random(args.seed)
    rng.shuffle(names)
    rows = [conversation(n, rng) for n in names[: args.n]]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} conversations written to {args.out}")


if __name__ == "__main__":
    main()
