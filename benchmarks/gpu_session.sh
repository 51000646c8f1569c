#!/usr/bin/env bash
# The GPU benchmarks of the performance issue in one short device call, prepared on the CPU machine.
#
#   bash benchmarks/gpu_session.sh prep     # here: wheels the GPU image lacks + the model's config/tokenizer
#   bash benchmarks/gpu_session.sh run      # there, e.g. through the device tool with carry [".gpu"]
#
# prep writes .gpu/ (git-ignored: add "/.gpu/" to .git/info/exclude): .gpu/whl/ holds TRL and datasets
# (the GPU image has torch, transformers, PEFT and accelerate but not these) and .gpu/smollm2-135m/ holds
# SmolLM2-135M's config.json and tokenizer without weights (the built-in model's GGUF file is over the
# 64 MiB a device call carries): benchmarks/sft_gpu.py --random-init draws the same seeded weights in
# every framework, and throughput does not depend on the weights. run writes its logs and the JSON lines
# under $OUT (default /tmp/gpu_out) and stops each benchmark at a time limit, so that the whole call ends
# inside one device command (10 minutes).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prep)
    set -e
    mkdir -p .gpu/whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
    .venv/bin/python benchmarks/sft_gpu.py --save-skeleton .gpu/smollm2-135m
    du -sh .gpu
    ;;
run)
    OUT=${OUT:-/tmp/gpu_out}
    mkdir -p "$OUT"
    SKIP=()  # without TRL's wheels (another Python, say) the rest still runs
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/whl/*.whl || { echo "TRL's wheels did not install: TRL is skipped"; SKIP=(--skip trl); }
    export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
    M=.gpu/smollm2-135m
    bench() {  # NAME SECONDS ARGS...: one benchmark, its log and its JSON line under $OUT
        local name=$1 limit=$2
        shift 2
        timeout "$limit" python3 benchmarks/sft_gpu.py --model $M --random-init "$@" 2>&1 | tee "$OUT/$name.log"
        # the JSON line (a framework that failed is reported on stderr after it, in the same log)
        local line
        line=$(grep '^{' "$OUT/$name.log" | tail -n 1)
        echo "${line:-$name: no result}" >> "$OUT/results.jsonl"
    }
    bench b16 200 --batch 16 --steps 30 --lora "${SKIP[@]}"                # the issue's comparison
    bench b16_compile 150 --batch 16 --steps 40 --compile --skip plain,trl  # + torch.compile
    bench b16_flex 150 --batch 16 --steps 40 --compile --attention flex_attention --skip plain,trl
    cat "$OUT/results.jsonl"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prep|run" >&2
    exit 2
    ;;
esac
