#!/usr/bin/env bash
# Run timm's real train.py and validate.py on momentum models, through `python -m timm_momentum.tools.run`, on a tiny
# generated ImageFolder (3 classes, 40x40 PNGs), on CPU: a few steps memory-efficient at gamma 0.5, validate.py
# on the checkpoint (at its recorded gamma, then with gamma=0.9 given, which warns), a conversion of the
# checkpoint and validate.py on the converted folder. timm's PyPI sdist ships no train.py, so pass a timm source
# tree (a git clone of huggingface/pytorch-image-models).
# Usage: [MODEL=momentum_resnet50d] benchmarks/timm_scripts.sh TIMM_SOURCE [WORK_DIR]   (MODEL: any momentum
# model; default momentum_resnet18)
set -euo pipefail
TIMM_SRC="$(cd "${1:?usage: benchmarks/timm_scripts.sh TIMM_SOURCE [WORK_DIR]}" && pwd)"
WORK="${2:-$(mktemp -d)}"
PYTHON="${PYTHON:-python}"
export MODEL="${MODEL:-momentum_resnet18}"
mkdir -p "$WORK" && cd "$WORK"
"$PYTHON" - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (('train', 12), ('validation', 4)):
    for c, base in (('cat', (200, 50, 50)), ('dog', (50, 200, 50)), ('fox', (50, 50, 200))):
        folder = Path('data') / split / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(np.array(base) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype('uint8')
            Image.fromarray(pixels).save(folder / f'{i}.png')
PY
rm -rf output converted
set -x
"$PYTHON" -m timm_momentum.tools.run "$TIMM_SRC/train.py" data --train-split train --val-split validation \
    --model "$MODEL" --num-classes 3 --model-kwargs memory_efficient=True gamma=0.5 --img-size 32 -b 8 \
    --epochs 2 --lr 0.01 --sched cosine --warmup-epochs 0 --workers 0 --device cpu --output output --experiment tiny
"$PYTHON" -c "import timm, timm_momentum; from timm.models import load_checkpoint
import os; m = timm.create_model(os.environ['MODEL'], num_classes=3); print('created at gamma', m.momentum_cfg['gamma'])
load_checkpoint(m, 'output/tiny/model_best.pth.tar'); print('load_checkpoint gives gamma', m.momentum_cfg['gamma'])"
"$PYTHON" -m timm_momentum.tools.run "$TIMM_SRC/validate.py" data --split validation --model "$MODEL" \
    --num-classes 3 --checkpoint output/tiny/model_best.pth.tar --img-size 32 -b 4 --workers 0 --device cpu
"$PYTHON" -m timm_momentum.tools.run "$TIMM_SRC/validate.py" data --split validation --model "$MODEL" \
    --num-classes 3 --checkpoint output/tiny/model_best.pth.tar --img-size 32 -b 4 --workers 0 --device cpu \
    --model-kwargs gamma=0.9
timm-momentum convert output/tiny/model_best.pth.tar --out converted --img-size 32
"$PYTHON" -m timm_momentum.tools.run "$TIMM_SRC/validate.py" data --split validation --model local-dir:converted \
    --pretrained --img-size 32 -b 4 --workers 0 --device cpu
