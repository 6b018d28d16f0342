#!/usr/bin/env bash
# The prepared GPU check for a lent device machine (about 5 minutes on an H100):
#   the CUDA benchmark of momentum_resnet101 in bf16 at 224^2 (memory, time, gradient error, largest
#   batch and throughput) and the CUDA tests. Without CUDA it runs a reduced CPU form, so it cannot rot.
# Results go to $OUT (the device tool's output folder) or benchmarks/out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
if ! python3 -c "import timm_momentum" 2>/dev/null; then
    python3 -m pip install --quiet -e ".[test]"
fi
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
    python3 -m timm_momentum.cli bench --device cuda --amp bf16 --models momentum_resnet101 \
        --batch-size 64 --img-size 224 --time-batch-size 64 --warmup 2 --steps 5 \
        --out "$OUT/gpu_results.json" --plot "$OUT/gpu_results.png" 2>&1 | tee "$OUT/gpu_bench.txt"
else
    echo "no CUDA device: running the reduced CPU form"
    python3 -m timm_momentum.cli bench --device cpu --models momentum_resnet50 --batch-size 2 --img-size 32 \
        --time-batch-size 2 --warmup 1 --steps 1 --out "$OUT/cpu_smoke.json"
fi
