"""tunelab chat | generate: a model talking in the terminal, and its completions written as data."""

from __future__ import annotations

import argparse
import math
import sys

from ..errors import TunelabError
from ..ownership import output_file

MAX_CHAT_LINE = 20_000  # characters of one message typed or piped into tunelab chat


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    """Sampling options, checked before a model is loaded."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise TunelabError(f"--temperature must be 0 (greedy) or more, got {temperature}", "--temperature")
    if not 0 < top_p <= 1:
        raise TunelabError(f"--top-p must be in (0, 1], got {top_p}", "--top-p")
    if max_new_tokens < 1:
        raise TunelabError(f"--max-new-tokens must be at least 1, got {max_new_tokens}", "--max-new-tokens")


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn conversation in the terminal, rendered with the same chat template as training."""
    from ..conversation import open_conversation

    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    talk = open_conversation(args.target, args.device, args.template, args.system)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 are an error, not lone surrogates
        sys.stdin.reconfigure(encoding="utf-8", errors="strict")
    if interactive:
        print(f"chatting with {args.target} (template {talk.template.name}); /reset starts over, /exit quits",
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
            talk.reset()
            continue
        reply = talk.reply(line, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
        print(f"assistant> {reply}", flush=True)
    return 0


def check_generate(args: argparse.Namespace) -> None:
    """The options of ``tunelab generate`` (without --self-instruct) that go together, before anything loads."""
    if (args.recipe is None) == (args.input is None):
        raise TunelabError("give the prompts: --recipe RECIPE.yaml (its data and template), --input FILE, "
                           "or --self-instruct SEEDS", "generate")
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise TunelabError("--n, --max-new-tokens, --batch-size and --limit must be at least 1", "generate")
    if args.skip < 0:
        raise TunelabError(f"--skip must be 0 or more, got {args.skip}", "--skip")
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    if args.verifier and args.critic:
        raise TunelabError("give one critic: --verifier or --critic, not both", "generate")
    if args.input and (args.overrides or args.split != "train"):
        raise TunelabError("key=value overrides and --split apply to --recipe, not to --input", "generate")
    if (args.n > 1 or getattr(args, "select", "all") == "first") and args.temperature <= 0:
        raise TunelabError(f"--n > 1{' and --select first' if args.n <= 1 else ''} needs sampling: set "
                           "--temperature above 0", "generate")
    if args.min_score is not None and not (args.verifier or args.critic):
        raise TunelabError("--min-score needs a --verifier or a --critic to score with", "generate")
    if args.label and not (args.verifier or args.critic):
        raise TunelabError("--label writes yes/no from a score: give a --verifier (or a --critic)", "generate")
    if getattr(args, "select", "all") in ("best", "first") and not (args.verifier or args.critic):
        raise TunelabError(f"--select {args.select} picks by score: give a --verifier or a --critic", "generate")
    if getattr(args, "select", "all") == "first" and args.min_score is None:
        raise TunelabError("--select first keeps the first completion scored at least --min-score: give it "
                           "(1 for a verifier's right)", "generate")


def cmd_generate(args: argparse.Namespace) -> int:
    """A model's completions over a prompt set, as JSONL (sequence-level KD, an augmented teacher)."""
    from ..config import load_config
    from ..gen_data import check_critic, generation_model, load_verifier, prompts_from_file, prompts_from_recipe
    from ..generate import generate
    from ..tasks import stop_ids
    from ..train.rundir import input_paths

    if args.self_instruct:
        return cmd_self_instruct(args)
    if args.temperature is None:
        args.temperature = 0.0
    if args.max_new_tokens is None:
        args.max_new_tokens = 32
    check_generate(args)
    recipe_cfg = load_config(args.recipe, args.overrides) if args.recipe else None
    out = output_file(args.out, args.force, inputs=[args.target, args.input, args.recipe, args.verifier, args.critic,
                                                    *(input_paths(recipe_cfg) if recipe_cfg else [])])
    verifier = load_verifier(args.verifier) if args.verifier else None
    if args.critic:
        check_critic(args.critic)
    model, tok = generation_model(args.target, args.device)
    end = None if args.limit is None else args.skip + args.limit
    items = (prompts_from_recipe(recipe_cfg, tok, args.split, end) if recipe_cfg
             else prompts_from_file(args.input, args.prompt_field)[: end])[args.skip:]
    if not items:
        where = (f"the recipe's {args.split} split holds no prompts (data.{args.split}_size or data.{args.split} "
                 "gives it some)") if recipe_cfg else "the file holds no prompts"
        raise TunelabError(where + (f" after the {args.skip} --skip leaves out" if args.skip else ""),
                           args.recipe or args.input)
    stops = stop_ids(recipe_cfg, tok) if recipe_cfg is not None else []
    if args.select == "first":
        return first_accepted(args, model, tok, items, stops, verifier, out)
    outputs = generate(model, tok, [i.prompt for i in items], max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                       num_return_sequences=args.n, progress=not args.quiet and sys.stderr.isatty(),
                       seed=args.seed, stop_ids=stops)
    del model
    report_selection(args, items, outputs, verifier, out, tok)
    return 0


def first_accepted(args: argparse.Namespace, model, tok, items: list, stops: list[int], verifier, out) -> int:
    """``--select first``: each prompt's greedy answer, then up to --n samples, until one scores at least
    --min-score. Only the prompts still unanswered are generated again, so a good teacher costs little more than
    its greedy pass. With a 0/1 verifier the samples after the greedy answer are rejection sampling: draws from
    the teacher conditioned on the verifier accepting, q ∝ p(y|x)·A(x, y). A prompt with none gives none."""
    from ..gen_data import Completion, completion_rows, score_completions, write_rows
    from ..generate import generate

    picked: dict[int, Completion] = {}
    pending = list(range(len(items)))
    generated = greedy_right = 0
    for attempt in range(args.n + 1):  # attempt 0: greedy
        outs = generate(model, tok, [items[i].prompt for i in pending], max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, temperature=0.0 if attempt == 0 else args.temperature,
                        top_p=args.top_p, progress=not args.quiet and sys.stderr.isatty(), seed=args.seed + attempt,
                        stop_ids=stops)
        generated += len(pending)
        comps = score_completions([items[i] for i in pending], outs, verifier, args.verifier or "", args.critic,
                                  args.critic_label)
        for i, c in zip(pending, comps):
            c.sample = attempt
            if c.score is not None and c.score >= args.min_score:
                picked[i] = c
        if attempt == 0:
            greedy_right = len(picked)
        pending = [i for i in pending if i not in picked]
        if not pending:
            break
    rows = completion_rows([picked[i] for i in sorted(picked)], tok, None, args.label, args.label_at)
    write_rows(out, rows)
    print(f"{len(picked)} of {len(items)} prompts answered with a score >= {args.min_score} ({greedy_right} by the "
          f"greedy answer, {len(picked) - greedy_right} within {args.n} samples); {generated} completions "
          f"generated; written to {out}", file=sys.stderr)
    return 0


def report_selection(args: argparse.Namespace, items: list, outputs: list[list[str]], verifier, out, tok) -> None:
    """Score the completions, select them (all, best-of-K, threshold), write the JSONL and say what was kept."""
    from ..gen_data import best_of, completion_rows, pass_at_k, score_completions, write_rows

    comps = score_completions(items, outputs, verifier, args.verifier or "", args.critic, args.critic_label)
    chosen = best_of(comps, args.min_score) if args.select == "best" else comps
    rows = completion_rows(chosen, tok, None if args.select == "best" else args.min_score, args.label, args.label_at)
    write_rows(out, rows)
    scores = [c.score for c in comps if c.score is not None]  # (scored: all of them, or none)
    kept = f", {len(rows)} kept with score >= {args.min_score}" if args.min_score is not None else ""
    per = max(len(o) for o in outputs)
    if args.select == "best":
        kept = f"; best of {per} for {len(rows)} of {len(items)} prompts" + (
            f" (scored >= {args.min_score})" if args.min_score is not None else "")
    mean = f", mean score {sum(scores) / len(scores):.3f}" if scores else ""
    passed = f", pass@{per} {pass_at_k(comps):.1%}" if verifier is not None else ""
    print(f"{len(comps)} completions of {len(items)} prompts{mean}{passed}{kept}; written to {out}", file=sys.stderr)


def cmd_score(args: argparse.Namespace) -> int:
    """``tunelab score FILE --verifier V | --critic RUN``: the completions generate wrote, scored again and
    selected, without sampling again (one set of samples, several critics)."""
    from ..gen_data import candidates_from_file, check_critic, load_verifier

    if bool(args.verifier) == bool(args.critic):
        raise TunelabError("give one critic: --verifier or --critic", "score")
    if args.min_score is not None and not math.isfinite(args.min_score):
        raise TunelabError(f"--min-score must be a number, got {args.min_score}", "--min-score")
    out = output_file(args.out, args.force, inputs=[args.candidates, args.verifier, args.critic])
    verifier = load_verifier(args.verifier) if args.verifier else None
    if args.critic:
        check_critic(args.critic)
    items, outputs = candidates_from_file(args.candidates)
    report_selection(args, items, outputs, verifier, out, None)
    return 0


def cmd_self_instruct(args: argparse.Namespace) -> int:
    """``tunelab generate MODEL --self-instruct SEEDS --out POOL``: new tasks bootstrapped from seeds."""
    from ..gen_data import generation_model, write_rows
    from ..selfinstruct import read_seeds, self_instruct

    if (args.recipe or args.input or args.verifier or args.critic or args.n != 1 or args.overrides
            or args.limit is not None or args.min_score is not None or args.split != "train"
            or args.select != "all" or args.label
            or args.prompt_field != "prompt"):
        raise TunelabError("--self-instruct builds its own prompts: drop --recipe/--input/--verifier/--critic/--n/"
                           "--limit/--min-score/--select/--label/--split/--prompt-field and key=value overrides",
                           "generate")
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
