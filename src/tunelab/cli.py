"""The command line: tunelab train | eval | merge | predict | export | chat | generate | student | data show.

User errors print one line (``tunelab: <where>: <what>``) and exit 2; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import atomic, ownership
from .data.types import IGNORE
from .errors import TunelabError, one_line

EPILOG = "Overrides are dotted keys: train.lr=1e-4 train.max_steps=50 model=PATH output.dir=runs/x"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.loop import train

    cfg = load_config(args.recipe, args.overrides)
    train(cfg, resume=args.resume, quiet=args.quiet, recipe=args.recipe)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .console import say
    from .evaluate import before_after_table, format_confusion
    from .evaluation import (
        base_model_view,
        check_probes,
        eval_split,
        evaluate_run,
        probe_tables,
        warn_budget,
    )
    from .evaluation import without_samples as _without_samples
    from .models import load_model, load_tokenizer, load_trained, load_trained_classifier
    from .tasks import build_dataset

    target = Path(args.target)
    is_run = target.is_dir() and (target / "config.yaml").exists()
    if target.is_dir() and not is_run:
        raise TunelabError("not a run directory (no config.yaml) nor a recipe file", str(target))
    cfg = load_config(target, args.overrides)
    if args.out:  # a bad --out is found before evaluating, not after
        output_file(args.out, force=args.force, inputs=[str(target), *run_inputs(cfg)])
    tok = load_tokenizer(cfg.model)
    splits, _, labels = build_dataset(cfg, tok)
    split_name, examples = eval_split(cfg, splits)
    if cfg.task == "classification":
        if not is_run:
            raise TunelabError("a classifier's head is trained: evaluate a run directory", str(target))
        model, tok = load_trained_classifier(target, cfg.model)
        if model.labels != labels:
            raise TunelabError(f"the run's head has {len(model.labels)} classes, the data {len(labels)} "
                               f"({', '.join(labels[:8])})", str(target))
    else:
        model, tok = load_trained(target, cfg.model) if is_run else load_model(cfg.model)
    check_probes(cfg, examples, tok)
    warn_budget(cfg, tok, examples, args.quiet)
    base = None
    if args.base:
        if not is_run:
            raise TunelabError("--base compares a run with its base model: give a run directory", str(target))
        say(f"evaluating the base model ({cfg.model.name}) ...", args.quiet)
        if cfg.task == "classification":
            raise TunelabError("a classifier's trained head has no base to compare with", "--base")
        if hasattr(model, "disable_adapter"):
            with base_model_view(model):
                base = evaluate_run(model, tok, cfg, examples, splits["validation"], args.quiet, labels)
        else:
            base_model, _ = load_model(cfg.model)
            base = evaluate_run(base_model, tok, cfg, examples, splits["validation"], args.quiet, labels)
            del base_model
    res = evaluate_run(model, tok, cfg, examples, splits["validation"], args.quiet, labels)
    if "samples" in res:
        print(before_after_table(base if base and "samples" in base else None, res, cfg.eval.show)
              .replace("before fine-tuning:", "base model:").replace("after fine-tuning:", f"{target}:"))
        tables = probe_tables(base, res, ("base", "tuned") if base is not None else ("before", "model"))
        if tables:
            print(tables)
    if "confusion" in res:
        print(f"accuracy {res['accuracy']:.1%}, macro-F1 {res['macro_f1']:.3f} over {res['n']} examples")
        print(format_confusion(res))
    out = {"target": str(target), "split": split_name, **_without_samples(res)}
    if base is not None:
        out["base"] = _without_samples(base)
    print(json.dumps(out))
    if args.out:
        atomic.write_json(Path(args.out), out)
    return 0


def run_config(run: Path):
    """The saved configuration of a run directory."""
    from .config import load_config

    if not (run / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", str(run))
    return load_config(run)


def run_inputs(cfg) -> list[str]:
    """What a run's configuration reads: its data, base model, templates (an output may not be among them)."""
    from .train.rundir import input_paths

    return input_paths(cfg)


def free_out_dir(path: str, force: bool, inputs: list[str | None]) -> Path:
    """An output directory to write when the work is done, checked before it starts: never one of the
    ``inputs`` (nor inside or around one); replaced (--force) only when tunelab made it."""
    out = Path(path)
    if out.is_symlink():
        raise TunelabError("is a symbolic link: give a real directory (it would be replaced)", str(out))
    if out.exists() and not out.is_dir():
        raise TunelabError("exists and is not a directory", str(out))
    _check_parent(out)
    ownership.check_not_input(out, inputs, "out_dir")
    if out.exists() and any(out.iterdir()):
        if force:
            ownership.check_replaceable(out, "--force")
            ownership.check_not_locked(out)
        elif ownership.foreign_entries(out):
            raise TunelabError("output directory exists and holds files tunelab did not make: choose another "
                               "directory", str(out))
        else:
            raise TunelabError("output directory exists and is not empty (--force replaces it)", str(out))
    return out


def cmd_merge(args: argparse.Namespace) -> int:
    from .models import load_trained

    run = Path(args.run_dir)
    cfg = run_config(run)
    if cfg.task == "classification":
        raise TunelabError("merging would drop the classification head: use tunelab export", str(run))
    if not (run / "adapter").is_dir():
        raise TunelabError("no adapter/ to merge (only LoRA runs have one; full runs already have model/)",
                           str(run))
    out = free_out_dir(args.out_dir, args.force, [str(run), *run_inputs(cfg)])
    model, tok = load_trained(run, cfg.model)
    merged = model.merge_and_unload()  # W = W0 + (alpha/r)·B·A folded into each target layer

    def write(d: Path) -> None:
        merged.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    ownership.check_not_locked(out)  # (again: the model took a while to load)
    atomic.write_dir(out, write, marker="merged model")
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .config import SourceConfig
    from .data.formats import Example
    from .data.readers import read_source
    from .data.templates import fields_of, render
    from .evaluate import class_probabilities
    from .models import load_trained_classifier

    run = Path(args.run_dir)
    cfg = run_config(run)
    if cfg.task != "classification":
        raise TunelabError("predict is for classification runs (use tunelab eval or generate)", str(run))
    if not args.texts and not args.input:
        raise TunelabError("give texts to classify, or --input FILE", "predict")
    fields = fields_of(cfg.classify.text)
    records: list[tuple[dict | None, str]] = []  # (fields, where); None: a bare text, classified as it is
    for t in args.texts:  # a bare text fills the template's one field, or is the input as it is
        if not t.strip():
            raise TunelabError("empty text: nothing to classify", "predict")
        records.append(({fields[0]: t}, t) if len(set(fields)) == 1 else (None, t))
    if args.input:
        for r in read_source(SourceConfig(path=args.input)):
            records.append((r.fields, r.where))
    out_path = (output_file(args.output, force=args.force, inputs=[str(run), args.input, *run_inputs(cfg)])
                if args.output else None)  # checked before the model loads
    texts = []
    for rec, where in records:
        text = where if rec is None else render(cfg.classify.text, rec, where, "classify.text")
        if not text.strip():
            raise TunelabError("empty text: nothing to classify", "predict" if rec is None else where)
        texts.append((text, where))
    model, tok = load_trained_classifier(run, cfg.model)
    examples = []
    for text, where in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"][: cfg.data.max_length]
        examples.append(Example(ids, [IGNORE] * len(ids), text, "", where))
    probs = class_probabilities(model, examples, tok.pad_token_id, cfg.eval.batch_size)
    rows = []
    for e, p in zip(examples, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        rows.append({"text": e.prompt, "label": model.labels[best],
                     "probs": {name: round(v, 6) for name, v in zip(model.labels, p)}})
    if out_path is not None:
        atomic.write_text(out_path, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .classify import export_sequence_classification
    from .models import load_trained_classifier

    run = Path(args.run_dir)
    cfg = run_config(run)
    if cfg.task != "classification":
        raise TunelabError("export writes a sequence-classification model; for a LoRA generation run use "
                           "tunelab merge", str(run))
    out = free_out_dir(args.out_dir, args.force, [str(run), *run_inputs(cfg)])
    model, tok = load_trained_classifier(run, cfg.model)
    ownership.check_not_locked(out)
    atomic.write_dir(out, lambda d: export_sequence_classification(model, d, tok), marker="classifier export")
    print(f"sequence-classification model written to {out}", file=sys.stderr)
    return 0


def _marked(tok, ids: list[int], labels: list[int], color: bool) -> str:
    """The tokens of one example, those carrying loss inside ⟦ ⟧ (or highlighted on a terminal)."""
    parts, inside = [], False
    for i, label in zip(ids, labels):
        sup = label != IGNORE
        if sup and not inside:
            parts.append("\x1b[42;30m" if color else "⟦")
        elif not sup and inside:
            parts.append("\x1b[0m" if color else "⟧")
        inside = sup
        parts.append(tok.decode([i]))
    if inside:
        parts.append("\x1b[0m" if color else "⟧")
    return "".join(parts)


def cmd_data_show(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models import load_tokenizer
    from .tasks import build_dataset

    cfg = load_config(args.recipe, args.overrides)
    tok = load_tokenizer(cfg.model)
    splits, stats, labels = build_dataset(cfg, tok)
    examples = splits[args.split]
    color = sys.stdout.isatty()
    if labels is not None:
        print(f"{args.split}: {len(examples)} examples, {len(labels)} classes: {', '.join(labels)}")
    else:
        print(f"{args.split}: {len(examples)} examples; supervised tokens are "
              + ("highlighted" if color else "inside ⟦ ⟧"))
    for e in examples[: args.n]:
        if labels is not None:
            print(f"--- {e.where} ({len(e.input_ids)} tokens) label {e.completion!r} (class {e.label})")
            print(tok.decode(e.input_ids))
        else:
            group = f" [{e.group}{', held out' if e.held_out else ''}]" if e.group else ""
            print(f"--- {e.where}{group} ({len(e.input_ids)} tokens, {e.n_supervised} supervised)")
            print(_marked(tok, e.input_ids, e.labels, color))
        if args.ids:
            print("input_ids:", e.input_ids)
            if labels is None:
                print("labels:   ", e.labels)
    print("--- statistics")
    for split, st in stats.items():
        if split == "mixture":
            from .data.instruct import mixture_table

            print(mixture_table(st))
            continue
        if split == "sni":
            print(f"tasks: trained on {st['train_tasks']}; held out {st['eval_tasks']}; encoding {st['encoding']}")
            continue
        print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in st.items()))
    return 0


MAX_CHAT_LINE = 20_000  # characters of one message typed or piped into tunelab chat


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn conversation in the terminal, rendered with the same chat template as training."""
    from .config import ModelConfig, load_config
    from .data import chat
    from .generate import generate
    from .models import load_model, load_trained

    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    target = Path(args.target)
    system = args.system
    stop_token = None
    if target.is_dir() and (target / "config.yaml").exists():
        cfg = load_config(target)
        cfg.model.device = args.device
        stop_token = cfg.chat.stop if cfg.task == "chat" else None
        if cfg.task == "classification":
            raise TunelabError("a classification run does not generate: use tunelab predict", str(target))
        model, tok = load_trained(target, cfg.model)
        template = args.template or cfg.chat.template
        if system is None and cfg.task == "chat" and cfg.chat.system_mode != "none":
            system = cfg.chat.system
    else:
        if target.suffix in (".yaml", ".yml"):
            raise TunelabError("give a run directory or a model (name, alias or directory), not a recipe", str(target))
        model, tok = load_model(ModelConfig(name=args.target, device=args.device))
        template = args.template or "auto"
    tmpl = chat.resolve_template(template, tok, stop_token)
    stop = chat.stop_id(tmpl, tok)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 are an error, not lone surrogates
        sys.stdin.reconfigure(encoding="utf-8", errors="strict")
    if interactive:
        print(f"chatting with {args.target} (template {tmpl.name}); /reset starts over, /exit quits",
              file=sys.stderr)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline(MAX_CHAT_LINE + 1)
        except EOFError:
            break
        except UnicodeDecodeError as e:
            raise TunelabError(f"the input is not UTF-8 text ({e.reason} at byte {e.start})", "chat") from None
        if not interactive and not line:
            break
        if len(line.rstrip("\r\n")) > MAX_CHAT_LINE:
            if not interactive:
                raise TunelabError(f"an input line is longer than {MAX_CHAT_LINE} characters", "chat")
            print(f"tunelab: chat: a line is longer than {MAX_CHAT_LINE} characters: ignored", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": line})
        text = chat.render(tmpl, history, True, tok, "chat")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        (reply,), = generate(model, tok, [ids], max_new_tokens=args.max_new_tokens, batch_size=1,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             stop_ids=[stop])
        reply = reply.strip()
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """A model's completions over a prompt set, as JSONL (sequence-level KD, an augmented teacher)."""
    from .config import load_config
    from .gen_data import critic_scores, load_verifier, prompts_from_file, prompts_from_recipe, verify, write_rows
    from .generate import generate
    from .tasks import stop_ids

    if args.self_instruct:
        return self_instruct_command(args)
    if args.temperature is None:
        args.temperature = 0.0
    if args.max_new_tokens is None:
        args.max_new_tokens = 32
    if (args.recipe is None) == (args.input is None):
        raise TunelabError("give the prompts: --recipe RECIPE.yaml (its data and template), --input FILE, "
                           "or --self-instruct SEEDS", "generate")
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise TunelabError("--n, --max-new-tokens, --batch-size and --limit must be at least 1", "generate")
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    if args.verifier and args.critic:
        raise TunelabError("give one critic: --verifier or --critic, not both", "generate")
    if args.input and (args.overrides or args.split != "train"):
        raise TunelabError("key=value overrides and --split apply to --recipe, not to --input", "generate")
    if args.n > 1 and args.temperature <= 0:
        raise TunelabError("--n > 1 needs sampling: set --temperature above 0", "generate")
    if args.min_score is not None and not (args.verifier or args.critic):
        raise TunelabError("--min-score needs a --verifier or a --critic to score with", "generate")
    recipe_cfg = load_config(args.recipe, args.overrides) if args.recipe else None
    out = output_file(args.out, args.force, inputs=[args.target, args.input, args.recipe, args.verifier, args.critic,
                                                    *(run_inputs(recipe_cfg) if recipe_cfg else [])])
    verifier = load_verifier(args.verifier) if args.verifier else None
    if args.critic and not (Path(args.critic) / "config.yaml").exists():
        raise TunelabError("not a run directory (no config.yaml)", args.critic)
    if args.critic and load_config(args.critic).task != "classification":  # found before generating, not after
        raise TunelabError("the critic must be a classification run", args.critic)
    model, tok = generation_model(args.target, args.device)
    items = (prompts_from_recipe(recipe_cfg, tok, args.split, args.limit) if recipe_cfg
             else prompts_from_file(args.input, args.prompt_field)[: args.limit])
    if not items:
        raise TunelabError(f"the recipe's {args.split} split holds no prompts (data.{args.split}_size or "
                           f"data.{args.split} gives it some)", args.recipe)
    stops = stop_ids(recipe_cfg, tok) if recipe_cfg is not None else []
    outputs = generate(model, tok, [i.prompt for i in items], max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                       num_return_sequences=args.n, progress=not args.quiet and sys.stderr.isatty(),
                       seed=args.seed, stop_ids=stops)
    del model
    flat = [(item, j, o) for item, outs in zip(items, outputs) for j, o in enumerate(outs)]
    scores: list[float | None] = [None] * len(flat)
    if verifier is not None:
        scores = [verify(verifier, args.verifier, item, o) for item, _, o in flat]
    elif args.critic:
        scores = critic_scores(Path(args.critic), args.critic_label, [f[0] for f in flat], [f[2] for f in flat])
    rows = []
    for (item, j, o), score in zip(flat, scores):
        if args.min_score is not None and score is not None and score < args.min_score:
            continue
        prompt = item.prompt if isinstance(item.prompt, str) else tok.decode(item.prompt)
        row = {**item.record, "prompt": prompt, "completion": o, "sample": j}
        if score is not None:
            row["score"] = score
        rows.append(row)
    write_rows(out, rows)
    kept = f", {len(rows)} kept with score >= {args.min_score}" if args.min_score is not None else ""
    mean = (f", mean score {sum(scores) / len(scores):.3f}" if scores and scores[0] is not None else "")
    print(f"{len(flat)} completions of {len(items)} prompts{mean}{kept}; written to {out}", file=sys.stderr)
    return 0


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Sampling options, checked before a model is loaded."""
    import math

    if not (math.isfinite(temperature) and temperature >= 0):
        raise TunelabError(f"--temperature must be 0 (greedy) or more, got {temperature}", "--temperature")
    if not 0 < top_p <= 1:
        raise TunelabError(f"--top-p must be in (0, 1], got {top_p}", "--top-p")
    if max_new_tokens < 1:
        raise TunelabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", "--max-new-tokens")


def _check_parent(out: Path) -> None:
    """The nearest folder above ``out`` that exists must be a directory this process can write in."""
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TunelabError(f"cannot be written: {parent} is a file, not a directory", str(out))
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise TunelabError(f"cannot be written: no permission to write in {parent}", str(out))


def output_file(spec: str, force: bool, inputs: list[str | None] = ()) -> Path:
    """A file to write when the work is done, checked before it starts (generating can take hours): a
    regular file or nothing, never one of the ``inputs`` nor inside one of them (a run directory's files)."""
    out = Path(spec)
    ownership.check_output_path(out)
    _check_parent(out)
    ownership.check_not_input(out, inputs, "the output file")
    if out.exists() and not force:
        raise TunelabError("output file exists (--force replaces it)", str(out))
    return out


def generation_model(target_spec: str, device: str):
    """The model and tokenizer of a run directory (adapters merged), or a model by alias, directory or id."""
    from .config import ModelConfig, load_config
    from .models import load_model, load_trained

    target = Path(target_spec)
    if target.is_dir() and (target / "config.yaml").exists():
        run_cfg = load_config(target)
        run_cfg.model.device = device
        if run_cfg.task == "classification":
            raise TunelabError("a classification run does not generate", str(target))
        model, tok = load_trained(target, run_cfg.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # the same outputs, faster
        return model, tok
    return load_model(ModelConfig(name=target_spec, device=device))


def self_instruct_command(args: argparse.Namespace) -> int:
    """``tunelab generate MODEL --self-instruct SEEDS --out POOL``: new tasks bootstrapped from seeds."""
    from .gen_data import write_rows
    from .selfinstruct import read_seeds, self_instruct

    if (args.recipe or args.input or args.verifier or args.critic or args.n != 1 or args.overrides
            or args.limit is not None or args.min_score is not None or args.split != "train"
            or args.prompt_field != "prompt"):
        raise TunelabError("--self-instruct builds its own prompts: drop --recipe/--input/--verifier/--critic/--n/"
                           "--limit/--min-score/--split/--prompt-field and key=value overrides", "generate")
    if args.rounds < 1 or args.per_round < 1 or not 0 < args.similarity <= 1:
        raise TunelabError("--rounds and --per-round must be at least 1, --similarity in (0, 1]", "generate")
    temperature = 0.7 if args.temperature is None else args.temperature
    max_new_tokens = 128 if args.max_new_tokens is None else args.max_new_tokens
    check_sampling(temperature, args.top_p, max_new_tokens)
    out = output_file(args.out, args.force, inputs=[args.target, args.self_instruct])
    seeds = read_seeds(args.self_instruct)
    model, tok = generation_model(args.target, args.device)
    rows, stats = self_instruct(model, tok, seeds, args.rounds, args.per_round, threshold=args.similarity,
                                temperature=temperature, top_p=args.top_p, max_new_tokens=max_new_tokens,
                                batch_size=args.batch_size, seed=args.seed,
                                progress=not args.quiet and sys.stderr.isatty())
    write_rows(out, rows)
    why = ", ".join(f"{v} {k}" for k, v in sorted(stats.rejected.items())) or "none"
    print(f"self-instruct: {stats.generated} generated, {stats.kept} kept (rejected: {why}); "
          f"written to {out}", file=sys.stderr)
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    """A smaller student cut from a teacher: some of its decoder layers, with their weights."""
    import contextlib

    from .config import ModelConfig, load_config
    from .models import load_model, load_trained, resolve_model_path
    from .teacher import slice_layers

    target = Path(args.teacher)
    is_run = target.is_dir() and (target / "config.yaml").exists()
    reads = [args.teacher, *(run_inputs(load_config(target)) if is_run else [])]
    with contextlib.suppress(TunelabError):
        reads.append(resolve_model_path(args.teacher) if not is_run else None)
    out = free_out_dir(args.out_dir, args.force, reads)  # checked before the teacher is loaded
    if is_run:
        model, tok = load_trained(target, load_config(target).model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        model, tok = load_model(ModelConfig(name=args.teacher, device="cpu"))
    n = model.config.num_hidden_layers
    if (args.layers is None) == (args.keep_every is None):
        raise TunelabError("give --keep-every K or --layers I,J,...", "student")
    if args.layers is not None:
        try:
            keep = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise TunelabError(f"--layers takes comma-separated integers, got {args.layers!r}", "--layers") from None
    else:
        if args.keep_every < 1:
            raise TunelabError("--keep-every must be at least 1", "--keep-every")
        keep = list(range(0, n, args.keep_every))
        if keep[-1] != n - 1:
            keep.append(n - 1)  # keep the last layer: it feeds the output head
    student = slice_layers(model, keep)

    def write(d: Path) -> None:
        student.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)

    ownership.check_not_locked(out)
    atomic.write_dir(out, write, marker="student model")
    n_t = sum(p.numel() for p in model.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    print(f"student with layers {keep} of {n}: {n_s:,} parameters ({n_s / n_t:.0%} of {n_t:,}); written to {out}",
          file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_axes, parse_variants, run_sweep

    variants = parse_variants(args.variant)
    axes = parse_axes(args.over, allow_empty=bool(variants))
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.recipe).stem}"
    run_sweep(args.recipe, args.overrides, axes, out, quiet=args.quiet, variants=variants)
    print(f"sweep table: {out / 'sweep.md'}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_compare, write_report

    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "config.yaml").exists():
            raise TunelabError("not a run directory (no config.yaml)", str(r))
    if len(runs) == 1 and not args.out:
        print(write_report(runs[0]))
        return 0
    spec = args.out or "runs/compare.html"
    out = output_file(spec, force=args.force or is_report(Path(spec)), inputs=[str(r) for r in runs])
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_compare(runs, out))
    return 0


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page tunelab's report wrote (replaced without --force)."""
    from .report import FOOTER

    try:
        if not path.is_file():  # (a FIFO is never opened: it would block)
            return False
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 400))
            return FOOTER.encode() in f.read()
    except OSError:
        return False


def recipes_dir() -> Path:
    return Path(os.environ.get("TUNELAB_RECIPES") or Path(__file__).resolve().parents[2] / "recipes")


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    folder = recipes_dir()
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise TunelabError("no recipes found (set TUNELAB_RECIPES to the recipes folder)", str(folder))
    rows = []
    for f in files:
        try:
            meta = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            meta = None
        desc = meta.get("description", "") if isinstance(meta, dict) else ""
        rows.append((str(f.relative_to(Path.cwd())) if f.is_relative_to(Path.cwd()) else str(f), desc))
    width = max(len(name) for name, _ in rows)
    for name, desc in rows:
        print(f"{name.ljust(width)}  {desc}")
    return 0


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

    t = sub.add_parser("train", help="fine-tune a model from a recipe", epilog=EPILOG)
    t.add_argument("recipe", help="recipe YAML (see recipes/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run directory or a recipe's model", epilog=EPILOG)
    e.add_argument("target", help="run directory, or recipe YAML (evaluates its model; model=... to choose)")
    e.add_argument("overrides", nargs="*", help="key=value overrides")
    e.add_argument("--out", help="also write the metrics as JSON to this file")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--base", action="store_true",
                   help="also evaluate the run's base model, side by side (e.g. with eval.variations=reverse)")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF directory)")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    m.set_defaults(func=cmd_merge)

    pr = sub.add_parser("predict", help="classify texts with a classification run (class probabilities)")
    pr.add_argument("run_dir")
    pr.add_argument("texts", nargs="*", help="texts (a bare text fills the input template's one field)")
    pr.add_argument("--input", help="records to classify (JSONL, CSV, ...), formatted by the run's template")
    pr.add_argument("--output", help="write JSONL here instead of printing it")
    pr.add_argument("--force", action="store_true", help="replace --output if it exists")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="write a classification run as a transformers *ForSequenceClassification")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("chat", help="talk to a run's model (or any model) through its chat template")
    c.add_argument("target", help="run directory, or a model: alias, local directory or hub id")
    c.add_argument("--template", help="chat template: auto, model, chatml, llama3 or a .jinja file "
                                      "(default: the run's, else auto)")
    c.add_argument("--system", help="system prompt (default: the run's chat.system)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="write a model's completions over a prompt set as JSONL "
                                        "(sequence-level distillation, an augmented teacher, Self-Instruct)")
    g.add_argument("target", help="run directory, or a model: alias, local directory or hub id")
    g.add_argument("overrides", nargs="*", help="key=value overrides of --recipe")
    g.add_argument("--recipe", help="take the prompts from this recipe's data, rendered by its template")
    g.add_argument("--split", default="train", choices=["train", "validation", "test"])
    g.add_argument("--input", help="or a file of prompts (JSONL, CSV, ...)")
    g.add_argument("--prompt-field", default="prompt", help="the prompt field of --input (default prompt)")
    g.add_argument("--limit", type=int, help="only the first N prompts")
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
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--verifier", help="module:function(record, output) -> bool | float scoring each completion")
    g.add_argument("--critic", help="a tunelab classification run scoring each completion (its text template "
                                    "sees the record's fields and {output})")
    g.add_argument("--critic-label", default="yes", help="the critic's label whose probability is the score")
    g.add_argument("--min-score", type=float, help="keep only completions scored at least this")
    g.add_argument("--self-instruct", metavar="SEEDS",
                   help="bootstrap new tasks from these seed tasks (JSONL: instruction, input, output)")
    g.add_argument("--rounds", type=int, default=3, help="Self-Instruct rounds (default 3)")
    g.add_argument("--per-round", type=int, default=16, help="Self-Instruct tasks asked for per round")
    g.add_argument("--similarity", type=float, default=0.7,
                   help="Self-Instruct: reject an instruction this ROUGE-L-similar to one in the pool")
    g.set_defaults(func=cmd_generate)

    st = sub.add_parser("student", help="cut a smaller student from a teacher (a subset of its layers)")
    st.add_argument("teacher", help="run directory, or a model: alias, local directory or hub id")
    st.add_argument("out_dir")
    st.add_argument("--keep-every", type=int, help="keep layers 0, K, 2K, ... and the last")
    st.add_argument("--layers", help="or exactly these layers, comma-separated (0-based)")
    st.add_argument("--force", action="store_true", help="replace out_dir if it exists")
    st.set_defaults(func=cmd_student)

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
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="write a run's report.html, or compare several runs in one page",
                        epilog=EPILOG)
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", help="the comparison page (default runs/compare.html; with one run: RUN/report.html)")
    rp.add_argument("--force", action="store_true", help="replace --out if it exists and is not a tunelab report")
    rp.set_defaults(func=cmd_report)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(func=cmd_recipes)

    d = sub.add_parser("data", help="inspect data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    ds = dsub.add_parser("show", help="print tokenized examples with the loss-carrying tokens marked",
                         epilog=EPILOG)
    ds.add_argument("recipe")
    ds.add_argument("overrides", nargs="*", help="key=value overrides")
    ds.add_argument("-n", type=int, default=5, help="examples to print (default 5)")
    ds.add_argument("--split", default="train", choices=["train", "validation", "test"])
    ds.add_argument("--ids", action="store_true", help="also print input_ids and labels")
    ds.set_defaults(func=cmd_data_show)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`data show R -n 3 k=v`): still overrides
        if getattr(args, "overrides", None) is None or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    level = args.log_level.upper() if args.log_level else ("WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=getattr(logging, level), format="%(message)s", stream=sys.stderr)
    try:
        _quiet_libraries()
        return args.func(args)
    except TunelabError as e:
        if args.debug:
            raise
        print(f"tunelab: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # what the system refused (a full disk, a read-only file system, permissions)
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"tunelab: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
