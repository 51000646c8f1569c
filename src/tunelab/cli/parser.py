"""The argument parser: one ``add_<command>`` function per command, each naming the function that runs it.

Commands, options, defaults and help texts are an interface other tools rely on: change them with care."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..errors import one_line
from . import commands_data, commands_generate, commands_models, commands_train

EPILOG = "Overrides are dotted keys: train.lr=1e-4 train.max_steps=50 model=PATH output.dir=runs/x"
SPLITS = ["train", "validation", "test"]
DEVICES = ["auto", "cpu", "cuda"]


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("tunelab").strip()
        self.exit(2, f"tunelab: {where + ': ' if where else ''}{one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="tunelab", description="Fine-tune pre-trained language models.", epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output (for CI and logs)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="how much tunelab logs (default info; warning with --quiet)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_train, add_eval, add_merge, add_predict, add_export, add_chat, add_generate, add_score,
                add_student, add_sweep, add_report, add_recipes, add_data):  # the order of `tunelab --help`
        add(sub)
    return p


def add_train(sub) -> None:
    t = sub.add_parser("train", help="fine-tune a model from a recipe", epilog=EPILOG)
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    t.set_defaults(func=commands_train.cmd_train)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a run directory or a recipe's model", epilog=EPILOG)
    e.add_argument("target", help="run directory, or recipe YAML (evaluates its model; model=... to choose)")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--out", help="also write the metrics as JSON to this file")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--base", action="store_true",
                   help="also evaluate the run's base model, side by side (e.g. with eval.variations=reverse)")
    e.set_defaults(func=commands_train.cmd_eval)


def add_merge(sub) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF directory)")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    m.set_defaults(func=commands_models.cmd_merge)


def add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="classify texts with a classification run (class probabilities)")
    pr.add_argument("run_dir")
    pr.add_argument("texts", nargs="*", help="texts (a bare text fills the input template's one field)")
    pr.add_argument("--input", help="records to classify (JSONL, CSV, ...), formatted by the run's template")
    pr.add_argument("--output", help="write JSONL here instead of printing it")
    pr.add_argument("--force", action="store_true", help="replace --output if it exists")
    pr.set_defaults(func=commands_models.cmd_predict)


def add_export(sub) -> None:
    x = sub.add_parser("export", help="a run's model for other runtimes: a merged transformers directory (hf), a "
                                      "GGUF file (llama.cpp, LM Studio), an Ollama model; a classification run as "
                                      "a transformers *ForSequenceClassification")
    x.add_argument("run_dir")
    x.add_argument("out", help="the output directory (hf, ollama, classification) or .gguf file (gguf)")
    x.add_argument("--format", choices=("hf", "gguf", "ollama"), default=None,
                   help="hf (default for generation and chat runs) | gguf | ollama (GGUF + Modelfile)")
    x.add_argument("--quant", choices=("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "f32"), default="f16",
                   help="the GGUF weights' type (gguf, ollama); norms stay f32, the output head f16")
    x.add_argument("--force", action="store_true", help="replace the output if it exists")
    x.set_defaults(func=commands_models.cmd_export)


def add_chat(sub) -> None:
    c = sub.add_parser("chat", help="talk to a run's model (or any model) through its chat template")
    c.add_argument("target", help="run directory, or a model: alias, local directory or hub id")
    c.add_argument("--template", help="chat template: auto, model, chatml, llama3 or a .jinja file "
                                      "(default: the run's, else auto)")
    c.add_argument("--system", help="system prompt (default: the run's chat.system)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto", choices=DEVICES)
    c.set_defaults(func=commands_generate.cmd_chat)


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="write a model's completions over a prompt set as JSONL "
                                        "(sequence-level distillation, an augmented teacher, Self-Instruct)")
    g.add_argument("target", help="run directory, or a model: alias, local directory or hub id")
    g.add_argument("overrides", nargs="*", help="key=value overrides of --recipe")
    g.add_argument("--recipe", help="take the prompts from this recipe's data, rendered by its template")
    g.add_argument("--split", default="train", choices=SPLITS)
    g.add_argument("--input", help="or a file of prompts (JSONL, CSV, ...)")
    g.add_argument("--prompt-field", default="prompt", help="the prompt field of --input (default prompt)")
    g.add_argument("--limit", type=int, help="only the first N prompts")
    g.add_argument("--skip", type=int, default=0,
                   help="leave out the first N prompts (then --limit counts from there): disjoint prompt sets")
    g.add_argument("--out", required=True, help="JSONL to write: the record's fields + prompt, completion, "
                                                "sample[, score]")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.add_argument("--n", type=int, default=1, help="completions per prompt (needs --temperature > 0)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default; 0.7 with --self-instruct)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (128 with --self-instruct)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument("--verifier", help="module:function(record, output) -> bool | float scoring each completion")
    add_scoring(g)
    g.add_argument("--self-instruct", metavar="SEEDS",
                   help="bootstrap new tasks from these seed tasks (JSONL: instruction, input, output)")
    g.add_argument("--rounds", type=int, default=3, help="Self-Instruct rounds (default 3)")
    g.add_argument("--per-round", type=int, default=16, help="Self-Instruct tasks asked for per round")
    g.add_argument("--similarity", type=float, default=0.7,
                   help="Self-Instruct: reject an instruction this ROUGE-L-similar to one in the pool")
    g.set_defaults(func=commands_generate.cmd_generate)


def add_scoring(g, generate: bool = True) -> None:
    """The critic options that generate and score share."""
    g.add_argument("--critic", help="a tunelab classification run scoring each completion (its text template "
                                    "sees the record's fields and {output})")
    g.add_argument("--critic-label", default="yes", help="the critic's label whose probability is the score")
    g.add_argument("--min-score", type=float, help="keep only completions scored at least this")
    g.add_argument("--label", metavar="FIELD",
                   help="also write FIELD: yes when the completion's score is at least --label-at, else no (a "
                        "critic's training data, labelled by the --verifier)")
    g.add_argument("--label-at", type=float, default=1.0, help="the score from which --label says yes (default 1)")
    g.add_argument("--select", choices=("all", "best", "first") if generate else ("all", "best"), default="all",
                   help="all completions; best: each prompt's highest-scored one (best-of-K, the augmented "
                        "teacher; with --min-score, prompts whose best scores less give none)" + (
                        "; first: the greedy answer, then up to --n samples, until one scores >= --min-score "
                        "(rejection sampling; only unanswered prompts are generated again)" if generate else ""))


def add_score(sub) -> None:
    sc = sub.add_parser("score", help="score the completions that generate wrote with a verifier or a critic, "
                                      "and select (best-of-K, threshold) without sampling again")
    sc.add_argument("candidates", help="JSONL as tunelab generate writes it: fields, prompt, completion, sample; "
                                       "a prompt's completions together")
    sc.add_argument("--out", required=True, help="JSONL to write, as generate writes it (score replaced)")
    sc.add_argument("--force", action="store_true", help="replace --out if it exists")
    sc.add_argument("--verifier", help="module:function(record, output) -> bool | float scoring each completion")
    add_scoring(sc, generate=False)
    sc.set_defaults(func=commands_generate.cmd_score, n=None)


def add_student(sub) -> None:
    st = sub.add_parser("student", help="cut a smaller student from a teacher (a subset of its layers)")
    st.add_argument("teacher", help="run directory, or a model: alias, local directory or hub id")
    st.add_argument("out_dir")
    st.add_argument("--keep-every", type=int, help="keep layers 0, K, 2K, ... and the last")
    st.add_argument("--layers", help="or exactly these layers, comma-separated (0-based)")
    st.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    st.set_defaults(func=commands_models.cmd_student)


def add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="run a recipe over a grid of values, resumable, into one table",
                        epilog=EPILOG)
    sw.add_argument("recipe")
    sw.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    sw.add_argument("--over", action="append", default=[], metavar="KEY=V1,V2",
                    help="an axis of the grid (repeat for more axes)")
    sw.add_argument("--variant", action="append", default=[], metavar="NAME: KEY=V ...",
                    help="a named set of overrides; the variants form one axis (e.g. what trains: "
                         "'lora-r4: train.mode=lora lora.r=4')")
    sw.add_argument("--out", help="directory of the sweep (default runs/sweep-<recipe>)")
    sw.set_defaults(func=commands_train.cmd_sweep)


def add_report(sub) -> None:
    rp = sub.add_parser("report", help="write a run's report.html, or compare several runs in one page",
                        epilog=EPILOG)
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="the comparison page (default runs/compare.html; with one run: RUN/report.html)")
    rp.add_argument("--force", action="store_true", help="replace --out if it exists and is not a tunelab report")
    rp.set_defaults(func=commands_train.cmd_report)


def add_recipes(sub) -> None:
    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=commands_data.cmd_recipes)


def add_data(sub) -> None:
    d = sub.add_parser("data", help="inspect data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    ds = dsub.add_parser("show", help="print tokenized examples with the loss-carrying tokens marked",
                         epilog=EPILOG)
    ds.add_argument("recipe")
    ds.add_argument("overrides", nargs="*", help="key=value overrides")
    ds.add_argument("-n", type=int, default=5, help="examples to print (default 5)")
    ds.add_argument("--split", default="train", choices=SPLITS)
    ds.add_argument("--ids", action="store_true", help="also print input_ids and labels")
    ds.set_defaults(func=commands_data.cmd_data_show)
