"""Write data/sni_names/: small tasks in the Super-NaturalInstructions layout, over names.txt and
numbers, for the tests and the SNI demo (recipes/sni_names.yaml).

    python scripts/make_sni_names.py

Each file: "Definition" (a list of one string, as in the public data set), "Positive Examples" and
"Negative Examples" (input, output, explanation), "Instances" (id, input, a list of valid outputs).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen"]
VOWELS = set("aeiou")


def num(n: int) -> list[str]:
    return [str(n), WORDS[n]] if n < len(WORDS) else [str(n)]


def first(s: str) -> list[str]:
    return [s[0], s[0].upper()]


def last(s: str) -> list[str]:
    return [s[-1], s[-1].upper()]


def yes_no(s: str) -> list[str]:
    return ["yes", "Yes"] if s[0] in VOWELS else ["no", "No"]


def longer(pair: str) -> list[str]:
    a, b = pair.split(", ")
    return [a] if len(a) > len(b) else [b] if len(b) > len(a) else [a, b]  # a tie: either is right


TASKS = {
    "task001_reverse_name": ("Given a name, write its letters in reverse order.", lambda s: [s[::-1]],
                             "The letters of the name, read from the last to the first."),
    "task002_uppercase_name": ("Write the given name in capital letters.", lambda s: [s.upper()],
                               "Every letter of the name is written as a capital."),
    "task003_first_letter": ("Answer with the first letter of the given name.", first,
                             "The name begins with this letter."),
    "task004_last_letter": ("Answer with the last letter of the given name.", last,
                            "The name ends with this letter."),
    "task005_name_length": ("Count how many letters the given name has. Answer with a number.",
                            lambda s: num(len(s)), "Counting the letters one by one gives this number."),
    "task006_count_vowels": ("Count the vowels (a, e, i, o, u) in the given name. Answer with a number.",
                             lambda s: num(sum(c in VOWELS for c in s)), "These are the letters a, e, i, o, u."),
    "task007_starts_with_vowel": ("Does the given name start with a vowel (a, e, i, o, u)? Answer yes or no.",
                                  yes_no, "Look only at the first letter."),
    "task008_spell_name": ("Spell the given name: write its letters separated by single spaces.",
                           lambda s: [" ".join(s)], "Each letter of the name, in order, with a space between."),
    "task009_add_numbers": ("Add the two given numbers and answer with their sum.", None,
                            "The sum of the two numbers."),
    "task010_sort_letters": ("Write the letters of the given name in alphabetical order.",
                             lambda s: ["".join(sorted(s))], "The same letters, sorted from a to z."),
    "task011_capitalize_name": ("Write the given name with a capital first letter, as names are written.",
                                lambda s: [s[:1].upper() + s[1:]], "Only the first letter becomes a capital."),
    "task012_longer_name": ("You are given two names separated by a comma. Answer with the longer one "
                            "(either, if they are equally long).", longer,
                            "It has more letters than the other name."),
}


def bad_output(name: str, good: str, rng: random.Random) -> str:
    """A plausible wrong answer for a negative example."""
    wrong = name if good != name else name[::-1]
    return wrong if wrong != good else name + name[-1]


def main(n_instances: int = 600, seed: int = 0) -> None:
    names = sorted({n.strip() for n in (ROOT / "data" / "names.txt").read_text().splitlines() if n.strip()})
    out = ROOT / "data" / "sni_names"
    out.mkdir(parents=True, exist_ok=True)
    for task, (definition, fn, why) in TASKS.items():
        rng = random.Random(f"{seed}/{task}")
        if task == "task009_add_numbers":
            inputs = [f"{rng.randint(0, 50)} + {rng.randint(0, 50)}" for _ in range(n_instances + 5)]
            fn = lambda s: [str(sum(int(x) for x in s.split(" + ")))]  # noqa: E731
        elif task == "task012_longer_name":
            inputs = [f"{a}, {b}" for a, b in (rng.sample(names, 2) for _ in range(n_instances + 5))]
            inputs.sort(key=lambda x: len(longer(x)) > 1)  # the demonstrations have no ties (stable sort)
        else:
            inputs = rng.sample(names, n_instances + 5)
        demos, rest = inputs[:5], inputs[5:]
        positive = [{"input": x, "output": fn(x)[0], "explanation": why} for x in demos[:3]]
        negative = [{"input": x, "output": bad_output(x, fn(x)[0], rng),
                     "explanation": f"Wrong: the answer is {fn(x)[0]}."} for x in demos[3:5]]
        instances = [{"id": f"{task}-{i}", "input": x, "output": fn(x)} for i, x in enumerate(rest)]
        doc = {"Contributors": ["tunelab (generated by scripts/make_sni_names.py)"], "Source": ["names.txt"],
               "Definition": [definition], "Positive Examples": positive, "Negative Examples": negative,
               "Instances": instances}
        (out / f"{task}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(TASKS)} tasks to {out}")


if __name__ == "__main__":
    main()
