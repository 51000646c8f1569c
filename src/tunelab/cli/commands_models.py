"""tunelab merge | export | predict | student: what a run's model becomes, and what it says."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import atomic
from ..errors import TunelabError
from ..ownership import output_file


def cmd_merge(args: argparse.Namespace) -> int:
    from ..export import merge_adapter

    out = merge_adapter(Path(args.run_dir), args.out_dir, force=args.force)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_run

    out = export_run(Path(args.run_dir), args.out, args.format, args.quant, force=args.force)
    what = {None: "model", "hf": "merged transformers model", "gguf": f"GGUF ({args.quant})",
            "ollama": "Ollama model (ollama create NAME -f Modelfile, in that directory)"}[args.format]
    print(f"{what} written to {out}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..classify import classifier_texts, predict
    from ..config import SourceConfig
    from ..data.readers import read_source
    from ..data.templates import fields_of
    from ..models import load_trained_classifier
    from ..tasks import task_of
    from ..train.rundir import input_paths, run_config

    run = Path(args.run_dir)
    cfg = run_config(run)
    if task_of(cfg).by_generation:
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
    out_path = (output_file(args.output, force=args.force, inputs=[str(run), args.input, *input_paths(cfg)])
                if args.output else None)  # checked before the model loads
    texts = classifier_texts(cfg.classify.text, records)
    model, tok = load_trained_classifier(run, cfg.model)
    rows = predict(model, tok, texts, cfg.data.max_length, cfg.eval.batch_size)
    if out_path is not None:
        atomic.write_text(out_path, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    from ..teacher import cut_student

    student = cut_student(args.teacher, args.out_dir, keep_every=args.keep_every, layers=args.layers,
                          force=args.force)
    print(student.summary(), file=sys.stderr)
    return 0
