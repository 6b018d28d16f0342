#!/usr/bin/env bash
# The GPU check for a lent device machine (no network; its own python3 with torch, timm, pytest,
# safetensors, huggingface_hub, matplotlib). Runs the project from this tree (PYTHONPATH=., nothing is
# installed) and writes at most 8 files, flat, to $OUT (default benchmarks/out):
#   gpu_summary.txt   versions, GPU, each stage's exit status and seconds
#   gpu_tests.txt     python -m pytest tests/test_gpu.py
#   gpu_bench.txt/.json/.png   bench at depths 101 and 152, CUDA bf16, 224²: peak memory (batch 16), step-time
#                     ratios (batch 64), gradient errors, largest batch and throughput at depth 101
#   gpu_fused.txt     bench at depth 101 with TIMM_MOMENTUM_FUSED=1 (compiled fused element-wise steps):
#                     its ratios against gpu_bench.txt's say whether fusing pays on CUDA
#   gpu_compile.txt/.json      the same at depth 101 with the torch.compile'd rows (batch 64)
# Every stage has a time limit, so the whole check ends within about 7.5 minutes; a stage that fails or
# runs out of time is recorded and the next one still runs. Without CUDA it runs a reduced CPU form
# (tiny sizes, no compile), which the test suite runs so the script cannot rot.
# Usage: bash benchmarks/gpu_check.sh       (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_summary.txt"
: > "$SUMMARY"
STARTED=$SECONDS
FAILED=0

# stage NAME SECONDS LOG COMMAND...: run COMMAND with a time limit, its output to the screen and LOG.
stage() {
    local name=$1 limit=$2 log=$3 t0=$SECONDS rc
    shift 3
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "(stopped at its ${limit} s limit)" | tee -a "$log"
    [ "$rc" -ne 0 ] && FAILED=1
    echo "$name: exit $rc, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

{
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee -a "$SUMMARY"
# Check the interpreter has what the project imports; never install (the device machine has no network).
if ! "$PYTHON" - <<'EOF' 2>&1 | tee -a "$SUMMARY"; then
import importlib, sys
missing = []
for name in ('torch', 'timm', 'safetensors', 'huggingface_hub', 'yaml', 'matplotlib', 'pytest'):
    try:
        module = importlib.import_module(name)
        print(f'{name} {getattr(module, "__version__", "?")}')
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f'missing packages: {", ".join(missing)}; carry them as wheels (nothing is installed here)')
import torch
import timm_momentum
print(f'timm_momentum from {timm_momentum.__file__}; python {sys.version.split()[0]}; '
      f'cuda available: {torch.cuda.is_available()}')
EOF
    echo "gpu_check: the interpreter $PYTHON cannot run the project (see above)" | tee -a "$SUMMARY"
    exit 1
fi

BENCH=("$PYTHON" -m timm_momentum.tools.cli bench)
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    stage tests 120 "$OUT/gpu_tests.txt" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    # Largest batch: on an H200 resnet101 fits ~10^3 images, so cap the search at 16384 and 60 s per model.
    stage bench 180 "$OUT/gpu_bench.txt" "${BENCH[@]}" --device cuda --amp bf16 \
        --models momentum_resnet101,momentum_resnet152 --batch-size 16 --time-batch-size 64 --img-size 224 \
        --warmup 3 --steps 10 --max-batch-models momentum_resnet101 --max-batch-limit 16384 \
        --max-batch-seconds 60 --out "$OUT/gpu_bench.json" --plot "$OUT/gpu_bench.png"
    stage fused 90 "$OUT/gpu_fused.txt" env TIMM_MOMENTUM_FUSED=1 "${BENCH[@]}" --device cuda --amp bf16 \
        --models momentum_resnet101 --batch-size 16 --time-batch-size 64 --img-size 224 --warmup 3 --steps 10 \
        --no-max-batch
    # Compiling resnet101's training step takes a minute or more: give it what is left of ~7.5 minutes.
    LEFT=$((435 - (SECONDS - STARTED)))
    if [ "$LEFT" -ge 60 ]; then
        stage compile "$LEFT" "$OUT/gpu_compile.txt" "${BENCH[@]}" --device cuda --amp bf16 \
            --models momentum_resnet101 --batch-size 64 --time-batch-size 64 --img-size 224 --warmup 3 \
            --steps 10 --no-max-batch --compile checkpointing,memory-efficient --out "$OUT/gpu_compile.json"
    else
        echo "compile: skipped, only $LEFT s of the ~7.5 minutes left" | tee -a "$SUMMARY"
    fi
else
    echo "no CUDA device: running the reduced CPU form" | tee -a "$SUMMARY"
    stage tests 120 "$OUT/gpu_tests.txt" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
    stage bench 600 "$OUT/gpu_bench.txt" "${BENCH[@]}" --device cpu --models momentum_resnet18 --batch-size 2 \
        --img-size 32 --time-batch-size 2 --warmup 1 --steps 1 --out "$OUT/gpu_bench.json" \
        --plot "$OUT/gpu_bench.png"
fi
echo "gpu_check: $((SECONDS - STARTED)) s in all$([ "$FAILED" -eq 0 ] || echo ', some stage failed')" | tee -a "$SUMMARY"
exit "$FAILED"
