"""The augmented teacher, reproduced (West et al. 2022): a student that never sees a gold answer beats its teacher.

``make demo-distill`` runs this: every step is a ``tunelab`` command whose output lands in ``runs/distill/``, and a
step whose output is there already is skipped, so an interrupted run goes on where it stopped (a training step
resumes from its last checkpoint). At the end: ``runs/distill/results.json`` (one entry per row: name,
exact_match on the teacher recipe's held-out names, n, ...) and ``runs/distill/report.html`` (the table, a plot).

The setting: the student has prompts (names from the teacher recipe's training split), a teacher (the main job's
run as it was until 2026-12-05, recipes/reverse_names_bpe.yaml: 73.0%) and a way to judge a candidate answer —
a verifier (a program), or a learned critic (a classification run trained on the teacher's own samples, labelled
by the verifier, on other names). Students start from the teacher's weights (the self-improvement form of the
claim) and fine-tune (LoRA, the teacher recipe's settings but lr 1e-3, the answer learnt one letter a token:
--student) on:
  student_seq_kd              the teacher's greedy outputs (sequence-level KD)
  student_augmented_verifier  the augmented teacher's answers: its greedy answer, or else the first of up to K
                              samples, that the verifier accepts (rejection sampling from q ∝ p·A)
  student_augmented_critic    the same with the learned critic accepting at p(yes) >= 0.5
  student_sft_gold            the gold answers (an upper reference the setting does not allow)
plus student_token_kd (token-level KD on the greedy outputs, alpha 1, from the teacher recipe's base model: a
student that starts as its teacher has nothing to learn from the teacher's distributions) and rounds: the verifier
student becomes the next teacher (STaR / ReST), student_augmented_verifier_round2, ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NAME_ROWS = {  # what each student trained on, for the table
    "teacher": "the teacher recipe's run (gold answers)",
    "student_seq_kd": "the teacher's greedy outputs (sequence-level KD)",
    "student_augmented_verifier": "the teacher's greedy answer or first of K samples the verifier accepts",
    "student_augmented_critic": "the teacher's greedy answer or first of K samples the learned critic accepts",
    "student_token_kd": "the teacher's distributions on its greedy outputs (token-level KD, alpha 1)",
    "student_sft_gold": "the gold answers of the same prompts (reference; not allowed in the setting)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/distill", help="where every intermediate file goes")
    ap.add_argument("--teacher-recipe", default="recipes/reverse_names_bpe.yaml",
                    help="the teacher's recipe: its prompts, template, held-out names and training settings")
    ap.add_argument("--teacher", default="runs/reverse_names_bpe", help="the teacher's run (trained if missing)")
    ap.add_argument("--critic-recipe", default="recipes/distill_critic.yaml")
    ap.add_argument("--prompts", type=int, default=6000, help="the students' prompts: the training split's first N")
    ap.add_argument("--critic-prompts", type=int, default=400, help="the critic's training prompts (the next N)")
    ap.add_argument("--critic-heldout", type=int, default=150, help="its held-out prompts (the next N)")
    ap.add_argument("--k", type=int, default=8, help="samples tried per prompt after a rejected greedy answer")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--critic-at", type=float, default=0.5, help="the critic's p(yes) a kept candidate needs")
    ap.add_argument("--steps", type=int, default=250, help="training steps of every student")
    ap.add_argument("--rounds", type=int, default=2, help="rounds: round 2 is taught by round 1's verifier student")
    ap.add_argument("--verifier", default="tunelab.verifiers:reversed_name")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="per answer, generating and evaluating (a "
                    "student that writes one letter a token needs one per letter)")
    ap.add_argument("--student", nargs="*", default=["data.completion_tokens=chars", "train.lr=1e-3"],
                    metavar="KEY=VALUE", help="overrides of the teacher recipe for the students trained on text (not "
                    "token-level KD, which needs the teacher's tokens); default: the answer one letter a token, "
                    "lr 1e-3")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every training run (students, critic, the teacher if trained)")
    ap.add_argument("--quiet", action="store_true", help="tunelab's own output only for errors")
    return ap.parse_args(argv)


class Pipeline:
    """Steps with outputs; a step whose output exists is done. Times go to steps.json."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.times_file = self.out / "steps.json"
        self.times: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.exists() else {}

    def tunelab(self, *argv: str) -> None:
        cmd = [sys.executable, "-m", "tunelab.cli", *(["--quiet"] if self.args.quiet else []), *argv]
        print("+ tunelab " + " ".join(argv), flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            sys.exit(f"experiments/distill.py: step failed (exit {proc.returncode}): tunelab {' '.join(argv)}")

    def step(self, name: str, done: Path, *commands: list[str]) -> None:
        if done.exists():
            return
        t0 = time.monotonic()
        for argv in commands:
            self.tunelab(*argv)
        if not done.exists():
            sys.exit(f"experiments/distill.py: step {name} did not write {done}")
        self.times[name] = round(time.monotonic() - t0, 1)
        write_json(self.times_file, self.times)

    def train(self, name: str, recipe: str, overrides: list[str]) -> Path:
        """A training run (resumed where a checkpoint is) merged into a transformers directory: merged/NAME."""
        run, merged = self.out / name, self.out / "merged" / name
        self.step(f"train {name}", merged / "config.json",
                  ["train", "--resume", recipe, *overrides, *self.args.set, f"output.dir={run}"],
                  ["export", str(run), str(merged), "--format", "hf"])
        return merged

    def evaluate(self, name: str, model: Path) -> Path:
        """Exact match of ``model`` on the teacher recipe's held-out names, as that recipe evaluates."""
        path = self.out / "eval" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        self.step(f"eval {name}", path, ["eval", self.args.teacher_recipe, f"model={model}", "eval.before=false",
                                         f"eval.max_new_tokens={self.args.max_new_tokens}", "--out", str(path)])
        return path

    def generate(self, name: str, target: Path, path: Path, *options: str) -> Path:
        a = self.args
        self.step(name, path, ["generate", str(target), "--recipe", a.teacher_recipe, "--split", "train",
                               "--max-new-tokens", str(a.max_new_tokens), "--verifier", a.verifier, *options,
                               "--out", str(path)])
        return path

    def augmented(self, name: str, target: Path, path: Path, seed: int, *critic: str) -> Path:
        """The augmented teacher's answers to the students' prompts (the verifier's, or a critic's)."""
        a = self.args
        scoring = ["--verifier", a.verifier, "--min-score", "1"] if not critic else [*critic, "--min-score",
                                                                                     str(a.critic_at)]
        self.step(name, path, ["generate", str(target), "--recipe", a.teacher_recipe, "--split", "train",
                               "--max-new-tokens", str(a.max_new_tokens), "--limit", str(a.prompts), "--select",
                               "first", "--n", str(a.k), "--temperature", str(a.temperature), "--seed", str(seed),
                               *scoring, "--out", str(path)])
        return path

    def sample(self, name: str, target: Path, path: Path, skip: int, limit: int, seed: int, *extra: str) -> Path:
        a = self.args
        return self.generate(name, target, path, "--skip", str(skip), "--limit", str(limit), "--n", str(a.k),
                             "--temperature", str(a.temperature), "--seed", str(seed), *extra)


def student_data(path: Path) -> list[str]:
    """Overrides that make the teacher recipe train on a generated file (prompt + completion, no split)."""
    return [f"data.train={path}", "data.prompt={prompt}", "data.completion={completion}", "data.unique_by=null",
            "data.train_size=null", "data.validation_size=0", "data.empty_target=drop", "data.synthetic.count=0",
            "eval.before=false"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run(args: argparse.Namespace) -> dict:
    p = Pipeline(args)
    out, a = p.out, args
    teacher_run = Path(a.teacher)
    if not (teacher_run / "eval.json").exists():
        p.step("train teacher", teacher_run / "eval.json", ["train", "--resume", a.teacher_recipe, *a.set,
                                                            f"output.dir={teacher_run}"])
    teacher = out / "teacher_hf"
    p.step("merge teacher", teacher / "config.json", ["export", str(teacher_run), str(teacher), "--format", "hf"])
    evals = {"teacher": p.evaluate("teacher", teacher)}

    # the learned critic: the teacher's samples on other prompts, labelled by the verifier
    skip = a.prompts
    critic_train = p.sample("critic data", teacher, out / "critic_train.jsonl", skip, a.critic_prompts, 1,
                            "--label", "ok")
    critic_held = p.sample("critic held-out data", teacher, out / "critic_heldout.jsonl", skip + a.critic_prompts,
                           a.critic_heldout, 2, "--label", "ok")
    critic = out / "critic"
    p.step("train critic", critic / "eval.json",
           ["train", "--resume", a.critic_recipe, f"model={teacher}", f"data.train={critic_train}",
            f"data.validation={critic_held}", *a.set, f"output.dir={critic}"])

    # the teacher on the students' prompts: greedy (scored), and the augmented teachers: the greedy answer, then up
    # to K samples, until the verifier (or the critic) accepts one
    greedy = p.generate("teacher greedy", teacher, out / "greedy.jsonl", "--limit", str(a.prompts))
    verifier_pick = p.augmented("augmented teacher (verifier)", teacher, out / "augmented_verifier.jsonl", 0)
    critic_pick = p.augmented("augmented teacher (critic)", teacher, out / "augmented_critic.jsonl", 0,
                              "--critic", str(critic))

    # the students, from the teacher's weights (token-level KD: from the teacher recipe's own base model)
    start = [f"model={teacher}", f"train.max_steps={a.steps}", *a.student]
    runs = {
        "student_seq_kd": student_data(greedy),
        "student_augmented_verifier": student_data(verifier_pick),
        "student_augmented_critic": student_data(critic_pick),
        "student_sft_gold": [f"data.train_size={a.prompts}", "eval.before=false", "eval.generate=false"],
    }
    for name, overrides in runs.items():
        evals[name] = p.evaluate(name, p.train(name, a.teacher_recipe, start + overrides))
    token_kd = p.train("student_token_kd", a.teacher_recipe, [f"train.max_steps={a.steps}", *student_data(greedy),
                                                              f"kd.teacher={teacher}", "kd.alpha=1.0"])
    evals["student_token_kd"] = p.evaluate("student_token_kd", token_kd)

    # rounds: the verifier's student is the next teacher, on the same prompts
    previous = out / "merged" / "student_augmented_verifier"
    rounds = [{"round": 1, "teacher": "teacher", "picked": str(verifier_pick)}]
    for r in range(2, a.rounds + 1):
        name = f"student_augmented_verifier_round{r}"
        pick = p.augmented(f"round {r} augmented teacher", previous, out / f"augmented_verifier_round{r}.jsonl", r)
        merged = p.train(name, a.teacher_recipe,
                         [f"model={previous}", f"train.max_steps={a.steps}", *a.student, *student_data(pick)])
        evals[name] = p.evaluate(name, merged)
        rounds.append({"round": r, "teacher": previous.name, "picked": str(pick)})
        previous = merged
    return collect(p, evals, greedy, verifier_pick, critic_pick, critic, rounds)


def teacher_stats(greedy: Path, verifier_pick: Path, critic_pick: Path, verifier: str) -> dict:
    """How good each teacher is on the students' own prompts (scores as the files hold them)."""
    from tunelab.plugins import load_function

    g = rows_of(greedy)
    n = len(g)
    picked = rows_of(verifier_pick)
    check = load_function(verifier, "--verifier")
    crit = rows_of(critic_pick)
    right = sum(float(check(r, r["completion"])) >= 1 for r in crit)
    return {
        "prompts": n,
        "greedy_correct": sum(r["score"] >= 1 for r in g) / n,
        "pass_at_k": len(picked) / n,  # the greedy answer or one of K samples right: the verifier's teacher
        "answered_by_sampling": sum(r["sample"] > 0 for r in picked) / n,
        "augmented_verifier_correct": len(picked) / n,  # every answer it keeps is right
        "augmented_critic_answered": len(crit) / n,
        "augmented_critic_correct": right / n,  # prompts the critic's pick answers right
        "augmented_critic_precision": right / max(len(crit), 1),  # of its picks, the right ones
    }


def collect(p: Pipeline, evals: dict[str, Path], greedy: Path, verifier_pick: Path, critic_pick: Path,
            critic: Path, rounds: list[dict]) -> dict:
    rows = []
    for name, path in evals.items():
        res = json.loads(path.read_text())
        base = name.split("_round")[0]
        rows.append({"name": name, "exact_match": res["exact_match"], "n": res["n"],
                     "trained_on": NAME_ROWS.get(base, NAME_ROWS["student_augmented_verifier"]),
                     "round": int(name.rsplit("round", 1)[1]) if "_round" in name else 1,
                     "train_time_s": p.times.get(f"train {name}")})
    critic_eval = json.loads((critic / "eval.json").read_text())
    yes = critic_eval["per_class"]["yes"]
    n = len(rows_of(greedy))
    for r in rounds:  # how many prompts each round's augmented teacher answered (all right)
        r["answered"] = len(rows_of(Path(r["picked"]))) / n
    result = {
        "rows": rows,
        "teacher_on_student_prompts": teacher_stats(greedy, verifier_pick, critic_pick, p.args.verifier),
        "critic": {"precision": yes["precision"], "recall": yes["recall"], "accuracy": critic_eval["accuracy"],
                   "n": critic_eval["n"], "support_yes": yes["support"]},
        "rounds": rounds,
        "settings": {k: v for k, v in vars(p.args).items() if k != "quiet"},
        "step_times_s": p.times,
    }
    write_json(p.out / "results.json", result)
    write_report(p.out / "report.html", result)
    return result


def write_json(path: Path, obj: dict) -> None:
    from tunelab import atomic

    atomic.write_text(path, json.dumps(obj, indent=1) + "\n")


def bars(rows: list[dict]) -> str:
    """Exact match per row as horizontal bars (SVG), the teacher's as a dashed line."""
    from tunelab.report import esc

    h, left, width = 24, 260, 420
    teacher = next((r["exact_match"] for r in rows if r["name"] == "teacher"), None)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 70}" height="{h * len(rows) + 30}" '
             'role="img" aria-label="exact match per row">']
    for i, r in enumerate(rows):
        y = 10 + i * h
        w = r["exact_match"] * width
        colour = "#888" if r["name"] == "teacher" else "#3a7"
        parts.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="12">{esc(r["name"])}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{colour}"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 15}" font-size="12">{r["exact_match"]:.1%}</text>')
    if teacher is not None:
        x = left + teacher * width
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="5" y2="{h * len(rows) + 15}" stroke="#555" '
                     'stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(path: Path, res: dict) -> None:
    from tunelab.report import esc, page, table

    rows = res["rows"]
    teacher = next(r["exact_match"] for r in rows if r["name"] == "teacher")
    body = ["<h1>The augmented teacher: students against their teacher</h1>",
            f"<p>Exact match on the same {rows[0]['n']} held-out names. Students start from the teacher's "
            "weights and never see a gold answer (but the reference row).</p>",
            table(["row", "trained on", "exact match", "vs teacher", "training s"],
                  [[r["name"], r["trained_on"], f"{r['exact_match']:.1%}",
                    f"{(r['exact_match'] - teacher) * 100:+.1f} pts", r["train_time_s"] or ""] for r in rows]),
            bars(rows)]
    t = res["teacher_on_student_prompts"]
    c = res["critic"]
    body.append(table(["the teacher on the students' prompts", "share"], [
        ["greedy answer right", f"{t['greedy_correct']:.1%}"],
        [f"greedy or one of {res['settings']['k']} samples right (the verifier's augmented teacher)",
         f"{t['pass_at_k']:.1%}"],
        ["augmented teacher (critic): prompts answered", f"{t['augmented_critic_answered']:.1%}"],
        ["augmented teacher (critic): prompts answered right", f"{t['augmented_critic_correct']:.1%}"]]))
    body.append(f"<p>The learned critic on {c['n']} held-out judgements: precision {c['precision']:.1%}, recall "
                f"{c['recall']:.1%} (of the right candidates), accuracy {c['accuracy']:.1%}.</p>")
    body.append("<p>" + esc(", ".join(f"{k}: {v}" for k, v in res["settings"].items())) + "</p>")
    from tunelab import atomic

    atomic.write_text(path, page("The augmented teacher", "\n".join(body)))


def main(argv: list[str] | None = None) -> int:
    res = run(parse_args(argv))
    for r in res["rows"]:
        print(f"{r['name']:<40} {r['exact_match']:6.1%}  (n={r['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
