#!/usr/bin/env bash
# The renovation's check that no number moved: 20 steps of each task's recipe, every step's loss printed.
#   bash scripts/loss_parity.sh OUT_DIR > losses.txt      (run it at two commits and diff the outputs)
# Evaluation by generation is off (it does not change the losses); the final validation loss is printed too.
set -euo pipefail
out=${1:?usage: loss_parity.sh OUT_DIR}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
for r in reverse_names vowel_count chat_names instruct_names sni_names; do
  "$py" -m tunelab.cli --quiet train "recipes/$r.yaml" train.max_steps=20 train.log_every=1 \
    train.checkpoint_every=0 train.eval_every=0 eval.before=false eval.generate=false eval.control=null \
    eval.variations=null "output.dir=$out/$r" "output.report_to=[none]" output.overwrite=true >/dev/null
  "$py" - "$out/$r" "$r" <<'PY'
import json, sys
from pathlib import Path
run, name = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
print(name, "losses:", " ".join(f"{r['loss']:.4f}" for r in rows))
ev = json.loads((run / "eval.json").read_text())
print(name, "final:", {k: ev[k] for k in ("val_loss", "accuracy", "exact_match") if k in ev})
PY
done
