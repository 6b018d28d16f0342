"""The fidelity rows of a small Vision Transformer, on real Fashion-MNIST (issue 23).

    python benchmarks/fidelity_vit.py [--arch vit_small_patch8_224] [--out benchmarks/fidelity/vit]

1. Upstream. timm's ``ARCH`` (ViT-S/8: 12 blocks, width 384), randomly initialised, is trained at 32x32 (16
   patches and a class token) on the first ``TRAIN_LIMIT`` Fashion-MNIST training images for ``EPOCHS`` epochs by
   ``timm_momentum.tools.finetune`` (AdamW, the usual ViT recipe; SGD trains ViTs from scratch poorly), and
   exported to ``OUT/upstream/ARCH/final``. Nothing is chosen on the test split; the last epoch is kept. An
   upstream already there is reused.
2. Conversions. The upstream goes through ``timm_momentum.tools.convert`` at gamma 0.9 and under the faithful
   policy 'auto', unhealed, and is loaded back from the folder with ``local-dir:``. The converter writes the
   drop-in block function, f(x) = block(x) - x, one chain step per block; the split rows (attention and MLP as two
   steps, a chain of 24) set ``block_fn='split'`` on the loaded model, at 0.9 and at the policy's gamma for 24
   steps.
3. Measurements against the upstream on all 10000 test images: top-1, top-1 agreement, KL(upstream || converted);
   on 16 training images in train mode: the memory-efficient gradient error against standard backprop (input and
   worst parameter, relative, float32), against default standard mode and against bitwise-matching standard mode,
   and the bytes saved for backward, memory-efficient against the plain timm ViT's.

Writes ``OUT/records/ARCH.json`` (not measured again when there) and ``OUT/fidelity.md``.
"""
import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from fidelity import GRAD_IMAGES, against_reference, grad_error, logits, saved_mib, train_plain  # noqa: E402
from fidelity_family import _matching_grad_error  # noqa: E402
from timm_momentum.tools.files import atomic_write  # noqa: E402

ARCH = 'vit_small_patch8_224'
TRAIN_LIMIT = 10000  # the first 10000 of the 60000 training images
EPOCHS = 3
VIT_RECIPE = dict(opt='adamw', lr=1e-3, weight_decay=0.05, warmup_epochs=0, batch_size=128)
VARIANTS = (('dropin', 0.9), ('dropin', 'auto'), ('split', 0.9), ('split', 'auto'))
MiB = 2 ** 20


def measure(arch: str, out: Path, scratch: Path) -> List[Dict[str, Any]]:
    """Convert the upstream at 0.9 and 'auto', load each back, measure it with each block function."""
    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum import resolve_gamma
    from timm_momentum.tools.convert import convert
    from timm_momentum.tools.data import FashionMNIST
    from timm_momentum.tools.memory import saved_tensor_bytes

    upstream_dir = out / 'upstream' / arch / 'final'
    test = FashionMNIST('test', img_size=32)
    test_images, test_labels = test.batch(slice(None)), test.targets
    train = FashionMNIST('train', img_size=32, limit=2048)
    grad_images, grad_labels = train.batch(slice(-GRAD_IMAGES, None)), train.targets[-GRAD_IMAGES:]
    source = timm.create_model(f'local-dir:{upstream_dir}', pretrained=True)
    reference = logits(source, test_images)
    plain_mib = saved_tensor_bytes(source.train(), grad_images) / MiB
    records = [{'arch': arch, 'block_fn': '–', 'gamma': 'source', 'chain_gamma': None, 'saved_mib_fp32': plain_mib,
                'top1': float((reference.argmax(-1) == test_labels).float().mean()), 'agreement': 1.0, 'kl': 0.0}]
    print(json.dumps(records[0]), flush=True)
    for block_fn, gamma in VARIANTS:
        started = time.perf_counter()
        folder = scratch / f'{arch}-{gamma}'
        if not folder.is_dir():
            convert(f'local-dir:{upstream_dir}', folder, gamma=gamma, force=True)
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
        if block_fn == 'split':  # the policy's gamma for the split chain's 2 x depth steps
            steps = 2 * len(model.blocks)
            model.set_momentum(block_fn='split', gamma=resolve_gamma(gamma, [steps])[0][0] if gamma == 'auto'
                               else gamma)
        converted = logits(model, test_images)
        record = {
            'arch': arch, 'block_fn': block_fn, 'gamma': gamma, 'chain_gamma': [model.blocks.gamma],
            'chain_steps': model.blocks.chain_length(), **against_reference(converted, reference, test_labels),
            'grad_error_fp32': grad_error(model, grad_images, grad_labels),
            'grad_error_fp32_matching': _matching_grad_error(model, grad_images, grad_labels),
            'saved_mib_fp32': saved_mib(model, grad_images, amp=False), 'plain_saved_mib_fp32': plain_mib,
            'seconds': time.perf_counter() - started,
        }
        records.append(record)
        print(json.dumps(record), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return records


def format_markdown(entry: Dict[str, Any]) -> str:
    up = entry['upstream']
    lines = ['# Fidelity of a converted timm ViT on Fashion-MNIST', '', entry['settings'], '',
             f"## {up['model']} at 32x32 (upstream: {up['test_top1']:.2f} % test top-1 after {up['epochs']} epochs "
             f"on {up['train_images']} training images, {up['wall_s'] / 60:.0f} min)", '',
             '| block function | γ | chain γ (steps) | top-1 % | agreement % | KL | '
             'grad err fp32 vs standard (input / worst param) | vs bitwise-matching standard | '
             'saved MiB fp32 (× plain) |', '|---|---|---|---|---|---|---|---|---|']
    for r in entry['records']:
        grad_text, matching_text = (f"{g['input']:.1e} / {g['worst_param']:.1e}" if g else '' for g in
                                    (r.get('grad_error_fp32'), r.get('grad_error_fp32_matching')))
        ratio = f" ({r['saved_mib_fp32'] / r['plain_saved_mib_fp32']:.2f}×)" if 'plain_saved_mib_fp32' in r else ''
        chain = f"{r['chain_gamma'][0]:g} ({r['chain_steps']})" if r['chain_gamma'] else '–'
        lines.append(f"| {r['block_fn']} | {r['gamma']} | {chain} | {100 * r['top1']:.2f} | "
                     f"{100 * r['agreement']:.2f} | {r['kl']:.4f} | {grad_text} | {matching_text} | "
                     f"{r['saved_mib_fp32']:.2f}{ratio} |")
    return '\n'.join(lines + [''])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default=ARCH, help='a timm Block-based ViT (default: %(default)s)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'fidelity' / 'vit'), help='output folder')
    args = parser.parse_args(argv)
    out = Path(args.out)
    settings = (f'torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, load average '
                f'at start {os.getloadavg()[0]:.1f}; upstream: the first {TRAIN_LIMIT} Fashion-MNIST training '
                f'images, {EPOCHS} epochs, {VIT_RECIPE}; test: all 10000 test images at 32x32; gradients and saved '
                f'bytes: {GRAD_IMAGES} training images, train mode; unhealed conversions')
    print(settings, flush=True)
    upstream = train_plain(args.arch, out / 'upstream' / args.arch, EPOCHS, {'train_images': TRAIN_LIMIT},
                           train_limit=TRAIN_LIMIT, **VIT_RECIPE)
    path = out / 'records' / f'{args.arch}.json'
    if not path.is_file():
        measured = {'settings': settings, 'upstream': upstream, 'records': measure(args.arch, out, out / 'scratch')}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(measured, indent=1)))
    markdown = format_markdown(json.loads(path.read_text()))
    atomic_write(out / 'fidelity.md', lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    return 0


if __name__ == '__main__':
    sys.exit(main())
