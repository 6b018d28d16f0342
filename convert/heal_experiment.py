"""How much each healing option brings a converted net back to its source, on the digits transfer task.

A plain timm ResNet is trained on digits 0-4 (sklearn's real handwritten digits), converted to its
Momentum ResNet at each gamma, and evaluated on held-out digits 0-4 before any fine-tuning: without
healing, with BatchNorm recalibration, with distillation of the source, and with recalibration followed
by distillation. Besides top-1, it reports how far the converted net's predictions are from the source's
(KL divergence of the source's softmax from the converted net's, averaged over the test images), which
still separates the options where top-1 saturates.

    python convert/heal_experiment.py [--model resnet18] [--gammas 0.9 0.99] [--out convert/HEALING.md]
    python convert/heal_experiment.py --model resnet50 --out convert/HEALING_resnet50.md
"""
import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from timm_momentum.tools.convert import convert
from timm_momentum.tools.data import DigitsDataset
from timm_momentum.tools.files import atomic_write
from timm_momentum.tools.finetune import DEFAULTS, train


def evaluate(model: torch.nn.Module, dataset: DigitsDataset, reference: torch.Tensor = None):
    """Top-1 accuracy in %, and the KL divergence from ``reference`` log-probabilities, on a whole split."""
    with torch.no_grad():
        log_probs = model.eval()(dataset.images).log_softmax(-1)
    accuracy = 100.0 * float((log_probs.argmax(-1) == dataset.targets).float().mean())
    if reference is None:
        return accuracy, 0.0, log_probs
    kl = float(torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction='batchmean'))
    return accuracy, kl, log_probs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='convert/HEALING.md')
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--gammas', type=float, nargs='+', default=[0.9, 0.99])
    parser.add_argument('--distill-steps', type=int, default=100)
    parser.add_argument('--epochs', type=int, default=10)
    args = parser.parse_args()
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix='heal-'))
    cfg = dict(DEFAULTS, model=args.model, dataset='sklearn/digits', classes=[0, 1, 2, 3, 4], img_size=32,
               batch_size=64, epochs=args.epochs, opt='adamw', lr=2e-3, weight_decay=0.05, warmup_epochs=1,
               progress=False, output=str(work / 'upstream'))
    source = train(cfg)['model']
    weights = work / f'{args.model}.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    test = DigitsDataset('validation', [0, 1, 2, 3, 4], 32, 3)
    source_acc, _, reference = evaluate(source, test)
    rows = [(f'source {args.model}', '0', source_acc, 0.0)]
    options = [('no healing', {}),
               ('BatchNorm recalibration', {'recalibrate_bn': True}),
               (f'distillation, {args.distill_steps} steps', {'distill_steps': args.distill_steps}),
               ('recalibration, then distillation', {'recalibrate_bn': True, 'distill_steps': args.distill_steps})]
    for gamma in args.gammas:
        for label, heal in options:
            out = convert(str(weights), work / f'{gamma}-{label}'.replace(' ', '_').replace(',', ''), gamma=gamma,
                          img_size=32, heal_images='sklearn/digits' if heal else None, **heal)
            model = timm.create_model(f'local-dir:{out.out_dir}', pretrained=True)
            accuracy, kl, _ = evaluate(model, test, reference)
            rows.append((label, f'{gamma:g}', accuracy, kl))
            print(f'gamma {gamma:g} {label}: top-1 {accuracy:.2f}%, KL to source {kl:.4f}', flush=True)
    command = (f'python convert/heal_experiment.py --model {args.model} --gammas '
               f'{" ".join(f"{g:g}" for g in args.gammas)} --epochs {args.epochs} --distill-steps {args.distill_steps}')
    lines = ['# Healing after conversion: measured', '',
             f'Command: `{command}` ({time.time() - started:.0f} s on the 2-core CPU machine, '
             f'torch {torch.__version__}, timm {timm.__version__}).', '',
             f'A timm {args.model} trained on sklearn digits 0-4 (32x32, {args.epochs} epochs), converted to its '
             f'Momentum ResNet at each gamma, evaluated on held-out digits 0-4 ({len(test)} images) before any '
             f'fine-tuning. Healing uses the unlabeled training images of all ten digits. KL is the divergence '
             f'of the source\'s predicted distribution from the converted net\'s, averaged over the test images '
             f'(0 = the same function on this data).', '',
             '| model | gamma | top-1 on digits 0-4 | KL to source |', '|---|---|---|---|']
    lines += [f'| {label} | {gamma} | {acc:.2f}% | {kl:.4f} |' for label, gamma, acc, kl in rows]
    atomic_write(args.out, lambda tmp: Path(tmp).write_text('\n'.join(lines) + '\n'))
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
