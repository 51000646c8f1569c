"""Write examples/*.ipynb: one notebook per lecture demo, calling the library (tests execute each on a
tiny model, so none can rot).

    python scripts/make_notebooks.py

Every notebook reads three environment variables: TUNELAB_MODEL (default the built-in model),
TUNELAB_RUNS (where runs go, default runs/) and TUNELAB_OVERRIDES (extra key=value overrides, e.g. fewer
steps), so the same notebook runs the real demo or a quick check.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

SETUP = '''import os
import shlex
from pathlib import Path

import tunelab

ROOT = Path.cwd().parent if Path.cwd().name == "examples" else Path.cwd()
MODEL = os.environ.get("TUNELAB_MODEL", "smollm2-135m-instruct")
RUNS = Path(os.environ.get("TUNELAB_RUNS", ROOT / "runs"))
EXTRA = shlex.split(os.environ.get("TUNELAB_OVERRIDES", ""))

def recipe(name, *overrides, run=None):
    """A shipped recipe with this notebook's model, run directory and extra overrides."""
    return tunelab.load_config(ROOT / "recipes" / f"{name}.yaml",
                               [f"model={MODEL}", f"output.dir={RUNS / (run or 'nb_' + name)}",
                                "output.overwrite=true", *overrides, *EXTRA])'''

TABLE = '''def table(res, n=10):
    """The lecture's before/after table."""
    before = {p["prompt"]: p for p in res["before"].get("samples", [])}
    for p in res["predictions"][:n]:
        b = before.get(p["prompt"], {}).get("output", "").strip()
        mark = "✓" if p["correct"] else "✗"
        print(f"{p['input']} → {p['output'].strip()} (expected: {p['expected'].strip()}) {mark}   before: {b!r}")
    print(f"exact match: {res['before']['exact_match']:.1%} before, {res['exact_match']:.1%} after")'''

NOTEBOOKS = {
    "01_sft_reverse_names": [
        "# Supervised fine-tuning: reversing names\n\nThe lecture's first demo: the pre-trained model cannot "
        "reverse a name; about a quarter of an hour of LoRA fine-tuning on 2 CPU cores, with the loss on the answer "
        "tokens only, teaches it.",
        SETUP,
        "## The examples: the loss is on the target tokens only (inside ⟦ ⟧)",
        'cfg = recipe("reverse_names")\nfor line in tunelab.examples(cfg, n=3):\n    print(line)',
        "## Train (LoRA on every linear layer), then the before/after table",
        "run = tunelab.train(cfg, quiet=True)\nres = tunelab.results(run)\n" + TABLE + "\ntable(res)",
        "## The report: curves, samples, data statistics, configuration",
        "print(tunelab.report(run))",
    ],
    "02_classification_head": [
        "# A classification head on a causal LM\n\np(y|x) = softmax(W h + b), h the hidden state of the last "
        "non-padding token. What trains: the head only, or LoRA + head.",
        SETUP,
        'results = {}\nfor mode in ["head", "lora"]:\n'
        '    run = tunelab.train(recipe("vowel_count", f"train.mode={mode}", run=f"nb_vowels_{mode}"), quiet=True)\n'
        '    results[mode] = tunelab.results(run)\n'
        '    r = results[mode]\n'
        '    print(f"{mode:>5}: accuracy {r[\'accuracy\']:.1%}, macro-F1 {r[\'macro_f1\']:.3f}, "\n'
        '          f"{r[\'trainable_parameters\']:,} trainable parameters, {r[\'train_time_s\']} s")',
        "from tunelab.evaluate import format_confusion\n\nprint(format_confusion(results['lora']))",
    ],
    "03_instruction_tuning": [
        "# Instruction tuning: many tasks, many templates, held-out templates and tasks\n\nFLAN-style: each "
        "task is asked in several ways; some templates and one task are never trained on and show whether the "
        "model generalises. The lecture's failure case: a model trained on one template fails on \"What is "
        "sophia backwards?\".",
        SETUP,
        'cfg = recipe("instruct_names")\nfor line in tunelab.examples(cfg, n=4):\n    print(line)',
        "import json\n\nrun = tunelab.train(cfg, quiet=True)\nres = tunelab.results(run)\n"
        'print(json.dumps(json.loads((run / "mixture.json").read_text())["tasks"]["reverse"], indent=1))',
        "## Exact match per task: trained templates, held-out templates, the held-out task",
        'for task, r in res["by_task"].items():\n'
        '    held = r.get("held_out_mean")\n'
        '    print(f"{task:<18} mean {r[\'mean\']:.1%} worst {r[\'worst\']:.1%}"\n'
        '          + (f" held-out templates {held:.1%}" if held is not None else ""))',
        "## Robustness to prompt variations, before and after",
        'for t, c in res["variations"]["templates"].items():\n'
        '    b = res["before"]["variations"]["templates"][t]["exact_match"]\n'
        '    seen = "held out" if c["held_out"] else "trained "\n'
        '    print(f"{t:<12} {seen} {b:6.1%} -> {c[\'exact_match\']:6.1%}")',
    ],
    "04_chat_tuning": [
        "# Chat tuning: a chat template, a system prompt, loss on the assistant turns\n\nThe conversation is "
        "rendered by the model's chat template; only the assistant's tokens (and their end-of-turn token) "
        "carry loss.",
        SETUP,
        'cfg = recipe("chat_names")\nprint(tunelab.examples(cfg, n=1)[0])',
        "run = tunelab.train(cfg, quiet=True)\nres = tunelab.results(run)\n"
        'print(f"exact match on the last assistant turn: {res[\'before\'][\'exact_match\']:.1%} -> '
        '{res[\'exact_match\']:.1%}")\nfor p in res["predictions"][:5]:\n'
        '    print(repr(p["input"]), "->", repr(p["output"]))',
    ],
    "05_distillation": [
        "# Knowledge distillation\n\nA teacher fine-tuned on the task (`reverse_names_bpe`: its answers in the "
        "tokenizer's usual tokens, as the student's); a student with fewer layers learns from "
        "the teacher's token distributions (token-level KD) as well as the gold answers.",
        SETUP,
        'teacher = tunelab.train(recipe("reverse_names_bpe", run="nb_teacher"), quiet=True)\n'
        'print("teacher:", f"{tunelab.results(teacher)[\'exact_match\']:.1%}")',
        'student_dir = tunelab.student(teacher, RUNS / "nb_student", keep_every=3)\n'
        'kd = tunelab.train(recipe("distill_names", f"model={student_dir}", f"kd.teacher={teacher}",\n'
        '                          "kd.cache=null", run="nb_kd"), quiet=True)\n'
        'gold = tunelab.train(recipe("distill_names", f"model={student_dir}", "kd.teacher=null",\n'
        '                            "kd.cache=null", run="nb_gold"), quiet=True)\n'
        'for name, run in [("gold SFT", gold), ("token-level KD", kd)]:\n'
        '    print(f"student, {name}: {tunelab.results(run)[\'exact_match\']:.1%}")',
    ],
}


def main() -> None:
    out = ROOT / "examples"
    out.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook()
        nb.cells = [new_markdown_cell(c) if c.startswith("#") else new_code_cell(c) for c in cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, out / f"{name}.ipynb")
    print(f"wrote {len(NOTEBOOKS)} notebooks to {out}")


if __name__ == "__main__":
    main()
