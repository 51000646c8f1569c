"""The one training loop, in three acts: ``setup`` builds a ``Run`` from the config (data, model, objective,
optimizer; nothing written), ``fit`` runs the steps, ``finish`` keeps the best weights, saves, evaluates
and reports. Every recipe runs through here.

A step pulls ``grad_accum`` micro-batches from a deterministic stream, divides each micro-batch's summed
loss by the number of supervised tokens of the whole step (so accumulation is exact), back-propagates,
clips, steps AdamW and the schedule, logs to ``metrics.jsonl``, and checkpoints atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .. import atomic, dist, faults, ownership, tracking
from ..config import Config
from ..console import say
from ..data.batching import collate
from ..errors import TunelabError
from ..evaluation import (
    base_model_view,
    before_key,
    check_probes,
    during_training,
    eval_split,
    evaluate_run,
    kept_before,
    print_before_after,
    warn_budget,
)
from ..models import load_model, load_tokenizer, resolve_device, resolve_model_path
from ..saved_files import write_use_files
from ..tasks import build_dataset, objective, output_name, task_of, trainable_model
from ..tasks.chat import chat_lines
from ..tracking import Trackers
from . import parallel, rundir, saving
from .forward import compile_layers, compile_unavailable, eager
from .kd import distillation_loss
from .objectives import EarlyStopping, lr_factor
from .precision import frozen_linears_to, loaded_precision, mixed_precision, precision_line, weights_config
from .run import Run
from .state import Interrupted, StopRequest, TrainState, term_as_interrupt
from .stream import Position, grouped_steps, micro_batches, total_steps
from .trainable import count_parameters, param_groups, save_trained, trainable_state

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("tunelab")
MAX_SKIPPED_IN_A_ROW = 10  # train.nonfinite=skip still stops a run that only produces non-finite steps

__all__ = ["train", "setup", "fit", "finish", "Run", "TrainState", "Interrupted", "Position", "micro_batches",
           "grouped_steps", "total_steps", "mixed_precision"]


def train(cfg: Config, resume: bool = False, quiet: bool = False, recipe: str | None = None) -> Path:
    """Run a recipe end to end; returns the run directory. Under torchrun or accelerate launch, every
    process runs this: data parallel (DDP, or FSDP2 with train.parallel=fsdp), rank 0 writing the run
    directory. ``recipe``: the recipe file the configuration came from (the run directory may not hold it).

    The writing process holds the run directory's lock for the whole run. A run that fails or is stopped
    before its first checkpoint leaves no run directory behind (nor one it was asked to replace)."""
    d = dist.setup(cfg.model.device)
    lock = None
    try:
        with term_as_interrupt():  # SIGTERM outside the step loop (loading, evaluating) stops like Ctrl-C
            run_dir = rundir.run_dir_of(cfg)
            rundir.check_output_dir(cfg, run_dir, recipe)
            lock = ownership.RunLock(run_dir) if d.main else None
            try:
                if lock is not None:  # (a signal during acquire is handled once it returns: then cleaned up)
                    lock.acquire()
                run = setup(cfg, resume, quiet or not d.main, d)
                run.lock = lock
                state = begin(run)
                fit(run, state)
                return finish(run, state)
            except BaseException:
                if lock is not None:
                    rundir.discard_unstarted(run_dir, lock)
                raise
    finally:
        if lock is not None:
            lock.release()
        dist.teardown(d)


# ---- act 1: setup (nothing is written)


def setup(cfg: Config, resume: bool, quiet: bool, d: dist.Dist) -> Run:
    """Everything that can fail on bad input, before the run directory is touched: data, model, what trains,
    the objective and the optimizer, and the base model's evaluation."""
    t_start = time.time()
    _check_setup(cfg, d)
    run_dir, resume_from = rundir.prepare(cfg, resume)
    own = resume_from is not None and rundir.owns(run_dir, resume_from)
    torch.manual_seed(cfg.train.seed)
    model_path = resolve_model_path(cfg.model.name)
    tok = load_tokenizer(cfg.model, model_path)
    splits, data_stats, labels = build_dataset(cfg, tok)
    split_name, eval_ex = eval_split(cfg, splits)
    check_probes(cfg, eval_ex, tok)
    tracker_names = tracking.check(cfg.output.report_to)
    amp_dtype = mixed_precision(cfg, resolve_device(cfg.model.device))
    weights_cfg = weights_config(cfg, amp_dtype)
    lm, tok = load_model(weights_cfg, model_path, tok)
    device = next(lm.parameters()).device
    amp_dtype, amp = loaded_precision(cfg, amp_dtype, lm)  # auto, on a CPU with native bfloat16: now decided
    if amp_dtype:
        say(precision_line(cfg, device, amp_dtype), quiet)
    say(f"data: {len(splits['train'])} train, {len(splits['validation'])} validation, {len(splits['test'])} test "
        f"examples ({data_stats['train']['supervised_tokens']} supervised of {data_stats['train']['tokens']} "
        f"training tokens)", quiet)
    warn_budget(cfg, tok, eval_ex, quiet)
    _describe_data(data_stats, quiet)
    model = _trainable(cfg, lm, labels, d, quiet)
    if amp_dtype and cfg.train.mode == "lora" and cfg.train.parallel == "ddp":  # (only the adapter is saved)
        frozen_linears_to(model, amp_dtype)  # the frozen linear layers stored as autocast casts them
    del lm
    n_trainable, n_total = count_parameters(model)
    say(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.3f}%), "
        f"mode={cfg.train.mode}", quiet)
    loss_fn, count = objective(cfg)
    if cfg.kd.teacher is not None:  # distillation: the teacher (or its cache) is loaded before anything is written
        loss_fn = distillation_loss(cfg, model, tok, splits["train"], device, quiet)
    scored_on = before_key(cfg, split_name, eval_ex)
    phases = {"load": time.time() - t_start}  # seconds of each phase: eval.json's phase_times_s
    before = kept_before(run_dir / "before.json", scored_on, quiet) if own else None
    if before is None and cfg.eval.before and d.main:
        say(f"evaluating the base model on {len(eval_ex)} {split_name} examples ...", quiet)
        with base_model_view(model):
            before = evaluate_run(model, tok, cfg, eval_ex, splits["validation"], quiet, labels, amp, split_name)
        phases["eval_before"] = time.time() - t_start - phases["load"]
    fsdp, root = parallel.wrap(cfg, model, loss_fn, d, quiet)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP replaces them
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
                            fused=device.type == "cuda")
    t = cfg.train
    steps = total_steps(t.max_steps, t.epochs, t.batch_size, t.grad_accum, len(splits["train"]))
    return Run(cfg=cfg, dir=run_dir, resume_from=resume_from, own=own, d=d, quiet=quiet, tok=tok, model=model,
               device=device, amp=amp, weights_cfg=weights_cfg, model_path=model_path, train_ex=splits["train"],
               val_ex=splits["validation"], eval_ex=eval_ex, split_name=split_name, labels=labels,
               data_stats=data_stats, loss_fn=loss_fn, count=count, opt=opt, params=params, steps=steps,
               n_trainable=n_trainable, n_total=n_total, tracker_names=tracker_names, before=before,
               before_key=scored_on, fsdp=fsdp, root=root, t_start=t_start, phases=phases)


def _check_setup(cfg: Config, d: dist.Dist) -> None:
    if d.on and cfg.train.batch_size % d.world:
        raise TunelabError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the {d.world} "
                           "processes (each takes an equal share of every micro-batch)", "train.batch_size")
    task_of(cfg).check(cfg)


def _describe_data(stats: dict, quiet: bool) -> None:
    """What the data statistics add: synthetic records, the mixture's table, the chat template's shapes, the SNI
    tasks."""
    if "synthetic" in stats:
        sy = stats["synthetic"]
        say(f"data.synthetic: {sy['records']} of the training examples are {sy['field']} values sampled from a "
            f"character {sy['order']}-gram model of the real ones (none is a real or held-out value"
            f"{'; every length equally often' if sy.get('lengths') == 'uniform' else ''})", quiet)
    if "mixture" in stats:
        from ..data.instruct import mixture_table

        say(mixture_table(stats["mixture"]), quiet)
    if "chat" in stats:
        for line in chat_lines(stats["chat"]):
            say(line, quiet)
    if "sni" in stats:
        say(f"tasks: trained on {', '.join(stats['sni']['train_tasks'])}; held out (evaluated): "
            f"{', '.join(stats['sni']['eval_tasks'])}", quiet)


def _trainable(cfg: Config, lm: PreTrainedModel, labels: list[str] | None, d: dist.Dist,
               quiet: bool) -> torch.nn.Module:
    """What trains (train.mode, LoRA, a classifier), compiled where train.compile asks."""
    model = trainable_model(lm, cfg, labels)
    if cfg.train.compile:
        if d.on:
            log.warning("train.compile under several processes (DDP/FSDP) is not tested yet")
        why = compile_unavailable(cfg.train.compile_backend, next(model.parameters()).device)
        if why:
            log.warning("train.compile: %s; training without compiling (the same steps, slower)", why)
        else:
            n = compile_layers(model, cfg.train.compile_backend)
            say(f"torch.compile ({cfg.train.compile_backend}): {n} decoder layers (the first step compiles)", quiet)
    return model


# ---- between the acts: the run directory, fresh or resumed


def begin(run: Run) -> TrainState:
    """The state to start from (a fresh one, or the checkpoint's), with the run directory made ready."""
    cfg, d = run.cfg, run.d
    state = TrainState()
    if cfg.train.early_stopping_patience is not None:
        state.stopper = EarlyStopping(cfg.train.early_stopping_patience,
                                      "min" if cfg.train.best_metric == "val_loss" else "max", cfg.train.min_delta)
    run.fingerprint = rundir.data_fingerprint(cfg, len(run.train_ex))
    run.content = rundir.content_fingerprint(run.train_ex)
    if run.resume_from is None:
        d.barrier()  # every process has decided (from the directory as it was) before rank 0 changes it
        if d.main:
            if run.lock is not None:
                run.lock.fresh = True  # from here on a failure before the first checkpoint removes the directory
            if run.dir.exists():
                ownership.clear(run.dir)  # checked as tunelab's own (or empty) by rundir.prepare
    else:
        saving.restore(run, state)
    if d.main:
        saving.write_run_files(run)
    run.trackers = Trackers(run.tracker_names, run.dir, cfg.to_dict(), cfg.name) \
        if d.main and run.tracker_names else None
    d.barrier()
    return state


# ---- act 2: fit (the step loop)


def fit(run: Run, state: TrainState) -> None:
    """Train from ``state`` to the last step: each step, then maybe evaluate, log, checkpoint, stop."""
    cfg, d = run.cfg, run.d
    run.model.train()
    t = cfg.train
    lengths = [len(e.input_ids) for e in run.train_ex]
    stream = grouped_steps(micro_batches(lengths, t.batch_size, t.seed, cfg.data.group_by_length,
                                         state.position), t.grad_accum)
    bar = tqdm(total=run.steps, initial=state.step, desc="train", unit="step",
               disable=run.quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    forward, sync, gathered = parallel.wrapped(run)
    metrics_path = run.dir / "metrics.jsonl"
    with atomic.refused_as_one_line(metrics_path):
        metrics_file = open(metrics_path, "a") if d.main else contextlib.nullcontext(None)
    t_loop = time.time()
    with StopRequest() as stop, metrics_file as metrics:
        while state.step < run.steps and state.stopped_early is None:
            t0 = time.time()
            rec, loss, gnorm = _step(run, state, next(stream), forward, sync)
            dt = time.time() - t0
            rec.update(tokens_per_s=round(rec["tokens"] / dt, 1), time=round(time.time() - t_loop, 2))
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                rec.update(loss=None, grad_norm=None, skipped=True)
            stop_now = _evaluate_during(run, state, rec, gathered)
            _log(run, state, rec, (loss, gnorm, dt), metrics, metrics_path, bar)
            stopping = d.any(stop.signal is not None)  # read once, agreed by every process
            if state.step == run.steps or stopping or (t.checkpoint_every and state.step % t.checkpoint_every == 0):
                saving.checkpoint(run, state)
            if stop_now and state.step < run.steps:
                state.stopped_early = state.step
                if d.main:
                    st = state.stopper
                    assert st is not None, "only early stopping stops early"
                    say(f"early stopping at step {state.step}: no {t.best_metric} improvement in {st.patience} "
                        f"evaluations (best at step {st.best_step}: {st.best:.4f})", run.quiet)
                break
            if stopping:  # (at the last step too: the checkpoint holds it, --resume saves and evaluates)
                bar.close()
                if run.trackers is not None:
                    run.trackers.close()
                raise Interrupted(f"stopped by {stop.signal or 'a signal to another process'} after step "
                                  f"{state.step} of {run.steps}; a checkpoint was written: continue with --resume",
                                  str(run.dir))
    bar.close()
    run.train_time = run.phases["train"] = time.time() - t_loop


def _micro_batches(run: Run, batches: list[tuple[Position, list[int]]]) -> tuple[list[dict], float, int]:
    """A step's micro-batches as tensors (this process's rows), the step's normaliser over every process's
    rows, and its tokens."""
    d, pad = run.d, run.tok.pad_token_id
    micro: list[dict] = []
    n_sup: float = 0
    n_tok = 0
    for _, idx in batches:
        whole = collate([run.train_ex[i] for i in idx], pad)  # the global micro-batch
        n_sup += run.count(whole)  # the step's loss is normalised over every process's rows
        n_tok += int(whole["attention_mask"].sum())
        mine = d.shard(idx) if d.on else idx
        empty = not mine  # the short last batch of an epoch may leave a process without rows
        mine = mine or idx[:1]
        b = whole if not d.on else collate([run.train_ex[i] for i in mine], pad)
        if empty:  # it still takes part in the gradient all-reduce, contributing nothing
            b["weight"] = torch.zeros(len(mine))
        b["index"] = torch.tensor(mine)  # dataset indices (a distillation cache needs them)
        micro.append(b)
    return micro, n_sup, n_tok


def _step(run: Run, state: TrainState, batches: list[tuple[Position, list[int]]], forward,
          sync) -> tuple[dict[str, Any], float, float]:
    """One optimizer step over ``batches``; returns its metrics record (its time fields to fill), the loss
    and the gradient norm."""
    d, t = run.d, run.cfg.train
    lr = t.lr * lr_factor(state.step, run.steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    for g in run.opt.param_groups:
        g["lr"] = lr
    state.position = batches[-1][0]  # where the stream stands after this step
    micro, n_sup, n_tok = _micro_batches(run, batches)
    nothing = n_sup == 0  # every example of the step has weight 0: nothing to learn from it
    denom = n_sup or 1
    loss_total = 0.0
    for k, b in enumerate(micro):
        b = {key: v.to(run.device) for key, v in b.items()}
        with sync() if k < len(micro) - 1 else contextlib.nullcontext():
            with run.amp():
                loss_sum, _ = forward(b, t.loss_chunk)
            if faults.active("nan-loss", state.step + 1):
                loss_sum = loss_sum * float("nan")
            # DDP and FSDP average gradients over the processes: scale by their number to get the sum
            (loss_sum * d.world / denom).backward()
        loss_total += float(loss_sum.detach())
    faults.point("kill-step", state.step + 1)
    faults.point("term-step", state.step + 1)
    loss = d.sum(loss_total) / denom
    max_norm = t.max_grad_norm if t.max_grad_norm is not None else math.inf
    gnorm = float(dist.full(torch.nn.utils.clip_grad_norm_(run.params, max_norm)))  # inf: measure, don't clip
    _update(run, state, loss, gnorm, nothing)
    state.step += 1
    state.tokens_seen += n_tok
    n_batches = math.ceil(len(run.train_ex) / t.batch_size)  # micro-batches of an epoch
    rec: dict[str, Any] = {"step": state.step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(gnorm, 6),
                           "tokens": n_tok, "supervised_tokens": n_sup, "tokens_per_s": None,
                           "epoch": round(state.position.epoch + state.position.batch / n_batches, 4),  # epochs done
                           "time": None}
    return rec, loss, gnorm


def _update(run: Run, state: TrainState, loss: float, gnorm: float, nothing: bool) -> None:
    """The optimizer step, unless the loss or gradient is not finite (stop, or skip it: train.nonfinite)."""
    t = run.cfg.train
    finite = math.isfinite(loss) and math.isfinite(gnorm)
    if not finite and (t.nonfinite == "stop" or state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW):
        more = f" ({state.skipped_in_a_row} steps in a row skipped before it)" if state.skipped_in_a_row else ""
        raise TunelabError(f"non-finite loss ({loss}) or gradient norm ({gnorm}) at step {state.step + 1}{more}; "
                           "no checkpoint was written for it (try a lower train.lr)", "train")
    if finite and not nothing:
        run.opt.step()
        state.skipped_in_a_row = 0
    elif not finite:  # train.nonfinite=skip: no update from this batch, counted
        state.skipped += 1
        state.skipped_in_a_row += 1
        log.warning("step %d: non-finite loss or gradient norm; step skipped (%d so far)", state.step + 1,
                    state.skipped)
    else:
        log.info("step %d: every example has weight 0: no update", state.step + 1)
    run.opt.zero_grad(set_to_none=True)


def _evaluate_during(run: Run, state: TrainState, rec: dict[str, Any], gathered) -> bool:
    """The periodic evaluation (train.eval_every) into ``rec``, keeping the best weights; returns whether
    early stopping says stop."""
    cfg, d, stopper = run.cfg, run.d, state.stopper
    every = cfg.train.eval_every
    if not (every and state.step % every == 0 and (state.step < run.steps or stopper is not None)):
        return False
    stop_now = False
    if d.main or run.fsdp:  # FSDP: every process takes part, rank 0 records
        with gathered(), eager(), run.amp():
            rec.update(during_training(run.model, run.tok, cfg, run.eval_ex, run.val_ex, run.labels))
            if stopper is not None and rec.get(cfg.train.best_metric) is not None:
                value = rec[cfg.train.best_metric]
                if stopper.improved(value):  # the best weights so far, kept apart from the rolling checkpoints
                    best = dist.gather_full(trainable_state(run.model), d.main)
                    if d.main:
                        rundir.write_best(run.dir, best, state.step, cfg.train.best_metric, value)
                stop_now = stopper.update(state.step, value)
                rec["best_step"] = stopper.best_step
    if stopper is not None:
        stop_now = d.any(stop_now)  # every process stops at the same step
    return stop_now


def _log(run: Run, state: TrainState, rec: dict[str, Any], raw: tuple[float, float, float], metrics,
         metrics_path: Path, bar) -> None:
    """The step's record to metrics.jsonl and the trackers, the progress bar or a log line (``raw``: the
    step's loss, gradient norm and seconds)."""
    if metrics is not None:
        with atomic.refused_as_one_line(metrics_path):
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
    if run.trackers is not None:
        run.trackers.log(rec)
    loss, gnorm, dt = raw
    lr = rec["lr"]
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens'] / dt:.0f}", skipped=state.skipped)
    every = run.cfg.train.log_every
    if bar.disable and every and (state.step % every == 0 or state.step == run.steps):
        extra = "".join(f" {k} {rec[k]:.4f}" for k in ("val_loss", "exact_match", "accuracy") if k in rec)
        say(f"step {state.step}/{run.steps} loss {loss:.4f} lr {lr:.2e} grad_norm {gnorm:.3f} "
            f"{rec['tokens'] / dt:.0f} tok/s{extra}", run.quiet)


# ---- act 3: finish (best weights, save, evaluate, report)


def finish(run: Run, state: TrainState) -> Path:
    """Rank 0 saves the trained (or best) weights, evaluates them, writes eval.json and the report."""
    cfg, d = run.cfg, run.d
    if run.fsdp:
        parallel.unshard(run)
    if not d.main:  # rank 0 saves and evaluates; the others wait for it, then all leave the group together
        d.barrier()  # (a process leaving gloo while another still holds its connections can abort at exit)
        return run.dir
    t0 = time.time()
    saving.restore_best(run, state)
    if cfg.output.save_model:
        def write(p: Path) -> None:  # the weights and tokenizer, then what other tools need to use them as trained
            save_trained(run.model, cfg.train.mode, p, run.tok)
            write_use_files(p, cfg, run.model, run.tok)

        atomic.write_dir(run.dir / output_name(cfg), write)
    run.phases["save"], t0 = time.time() - t0, time.time()
    say(f"evaluating the fine-tuned model on {len(run.eval_ex)} {run.split_name} examples ...", run.quiet)
    after = evaluate_run(run.model, run.tok, cfg, run.eval_ex, run.val_ex, run.quiet, run.labels, run.amp,
                         run.split_name)
    run.phases["eval_after"] = time.time() - t0
    result = saving.result(run, state, after)
    if "samples" in after:
        atomic.write_text(run.dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in after["samples"]))
    print_before_after(run.before, after, cfg.eval.show)
    atomic.write_json(run.dir / "eval.json", result)
    if run.trackers is not None:
        run.trackers.summary(result, state.step)
        run.trackers.close()
    from ..report import write_report

    say(f"time: {saving.phase_line(result)}", run.quiet)
    say(f"report: {write_report(run.dir)}", run.quiet)
    say(f"run directory: {run.dir}", run.quiet)
    d.barrier()
    return run.dir


