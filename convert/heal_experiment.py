"""How much accuracy each healing option recovers after conversion, on the digits transfer task.

A plain timm resnet18 is trained on digits 0-4 (sklearn's real handwritten digits), converted to
momentum_resnet18 at gamma 0.9, and evaluated on held-out digits 0-4 before fine-tuning:
without healing, with BatchNorm recalibration, with distillation of the source, and with both.

    python convert/heal_experiment.py [--out convert/HEALING.md]
"""
import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from timm_momentum.convert import convert
from timm_momentum.finetune import DEFAULTS, DigitsDataset, train


def accuracy(model: torch.nn.Module, dataset: DigitsDataset) -> float:
    """Top-1 accuracy in % on a whole digits split."""
    with torch.no_grad():
        return 100.0 * float((model.eval()(dataset.images).argmax(-1) == dataset.targets).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='convert/HEALING.md')
    parser.add_argument('--gamma', type=float, default=0.9)
    parser.add_argument('--distill-steps', type=int, default=200)
    parser.add_argument('--epochs', type=int, default=10)
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix='heal-'))
    cfg = dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=[0, 1, 2, 3, 4], img_size=32,
               batch_size=64, epochs=args.epochs, opt='adamw', lr=2e-3, weight_decay=0.05, warmup_epochs=1,
               progress=False, output=str(work / 'upstream'))
    source = train(cfg)['model']
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(work / 'resnet18.safetensors'))
    test = DigitsDataset('validation', [0, 1, 2, 3, 4], 32, 3)
    rows = [('source resnet18 (gamma = 0)', accuracy(source, test))]
    options = [('converted, no healing', {}),
               ('BatchNorm recalibration', {'recalibrate_bn': True}),
               (f'distillation, {args.distill_steps} steps', {'distill_steps': args.distill_steps}),
               ('distillation + recalibration', {'distill_steps': args.distill_steps, 'recalibrate_bn': True})]
    for label, heal in options:
        out = convert(str(work / 'resnet18.safetensors'), work / label.replace(' ', '_'), gamma=args.gamma, img_size=32,
                      heal_images='sklearn/digits' if heal else None, **heal)
        rows.append((label, accuracy(timm.create_model(f'local-dir:{out.out_dir}', pretrained=True), test)))
    lines = ['# Healing after conversion: measured', '',
             f'Command: `python convert/heal_experiment.py --epochs {args.epochs} --distill-steps {args.distill_steps}` ({time.time() - started:.0f} s on the 2-core CPU machine, '
             f'torch {torch.__version__}, timm {timm.__version__}).', '',
             f'A timm resnet18 trained on sklearn digits 0-4 (32x32), converted to momentum_resnet18 at '
             f'gamma={args.gamma}, evaluated on held-out digits 0-4 ({len(test)} images) before any fine-tuning. '
             f'Healing uses the unlabeled training images of all ten digits.', '',
             '| model | top-1 on digits 0-4 |', '|---|---|']
    lines += [f'| {label} | {acc:.2f}% |' for label, acc in rows]
    Path(args.out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
