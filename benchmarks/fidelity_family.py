"""The fidelity table for a sample of timm's ResNet family beyond the plain ResNets, on real Fashion-MNIST.

    python benchmarks/fidelity_family.py [--archs resnet50d,seresnext26d_32x4d,wide_resnet50_2,resnetrs101]
                                         [--phase upstream|all] [--out benchmarks/fidelity/family]

1. Upstreams. Each timm architecture, randomly initialised, is trained on Fashion-MNIST (32x32, 3 channels) by
   ``timm_momentum.tools.finetune`` with fidelity.py's recipe, on the first ``TRAIN_LIMIT`` training images for
   ``EPOCHS`` epochs (the CPU budget: wide_resnet50_2 and resnetrs101 take several times resnet50's step), and
   exported to ``OUT/upstream/ARCH/final``. Nothing is chosen on the test split; the last epoch is kept. An
   upstream already there is reused.
2. Conversions. Each upstream goes through ``timm_momentum.tools.convert`` (which reads the architecture from the
   folder's config.json) at gamma 0.9 and under the faithful policy 'auto', unhealed, and is loaded back from the
   folder with ``local-dir:``.
3. Measurements against the upstream on all 10000 test images: top-1, top-1 agreement, KL(upstream || converted);
   on 16 training images in train mode: the memory-efficient gradient error against standard backprop (input and
   worst parameter, relative, float32), against default standard mode (float32 state) and against standard mode
   with the memory-efficient forward's float64 state (``standard_matching_memory_efficient``: bitwise the same
   forward, so only the backward differs), and the bytes saved for backward, memory-efficient against the plain
   timm network's.

Writes ``OUT/records/ARCH.json`` per architecture (an architecture already measured is not measured again) and
``OUT/fidelity.md``.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from fidelity import GRAD_IMAGES, against_reference, grad_error, logits, saved_mib, train_plain  # noqa: E402
from timm_momentum.tools.files import atomic_write  # noqa: E402

SAMPLE = ('resnet50d', 'seresnext26d_32x4d', 'wide_resnet50_2', 'resnetrs101')
TRAIN_LIMIT = 10000  # the first 10000 of the 60000 training images
EPOCHS = 2
GAMMAS = (0.9, 'auto')
MiB = 2 ** 20


def train_upstream(arch: str, out: Path) -> Dict[str, Any]:
    """Train (or reuse) the plain timm ``arch`` upstream on the first TRAIN_LIMIT images; returns its metrics and
    the seconds it took."""
    return train_plain(arch, out / 'upstream' / arch, EPOCHS, {'train_images': TRAIN_LIMIT}, train_limit=TRAIN_LIMIT)


def measure(arch: str, out: Path, scratch: Path) -> List[Dict[str, Any]]:
    """Convert the upstream at each of GAMMAS, load each back, measure against the upstream."""
    import shutil

    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.tools.memory import saved_tensor_bytes
    from timm_momentum.tools.convert import convert
    from timm_momentum.tools.data import FashionMNIST

    upstream_dir = out / 'upstream' / arch / 'final'
    test = FashionMNIST('test', img_size=32)
    test_images, test_labels = test.batch(slice(None)), test.targets
    train = FashionMNIST('train', img_size=32, limit=2048)
    grad_images, grad_labels = train.batch(slice(-GRAD_IMAGES, None)), train.targets[-GRAD_IMAGES:]
    source = timm.create_model(f'local-dir:{upstream_dir}', pretrained=True)
    reference = logits(source, test_images)
    plain_mib = saved_tensor_bytes(source.train(), grad_images) / MiB
    records = [{'arch': arch, 'gamma': 'source', 'top1': float((reference.argmax(-1) == test_labels).float().mean()),
                'agreement': 1.0, 'kl': 0.0, 'stage_gamma': None, 'saved_mib_fp32': plain_mib}]
    print(json.dumps(records[0]), flush=True)
    for gamma in GAMMAS:
        started = time.perf_counter()
        folder = scratch / f'{arch}-{gamma}'
        result = convert(f'local-dir:{upstream_dir}', folder, gamma=gamma, force=True)
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
        assert model.momentum_cfg['gamma'] == result.model_args['gamma'], 'gamma did not round-trip'
        converted = logits(model, test_images)
        record = {
            'arch': arch, 'momentum_arch': result.arch, 'gamma': gamma, 'stage_gamma': model.momentum_cfg['gamma'],
            **against_reference(converted, reference, test_labels),
            'grad_error_fp32': grad_error(model, grad_images, grad_labels),
            'grad_error_fp32_matching': _matching_grad_error(model, grad_images, grad_labels),
            'saved_mib_fp32': saved_mib(model, grad_images, amp=False),
            'plain_saved_mib_fp32': plain_mib,
        }
        record['seconds'] = time.perf_counter() - started
        records.append(record)
        shutil.rmtree(folder)
        print(json.dumps(record), flush=True)
    return records


def _matching_grad_error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """``grad_error`` against standard backprop whose forward is bitwise the memory-efficient one (float64 state):
    what the backward itself gets wrong, apart from the float32 state's rounding in default standard mode."""
    from timm_momentum.core.config import standard_matching_memory_efficient

    with standard_matching_memory_efficient():
        return grad_error(model, images, labels)


def _gamma_text(gammas: Any) -> str:
    return '–' if gammas is None else '(' + ', '.join(f'{g:g}' for g in gammas) + ')'


def format_markdown(measured: List[Dict[str, Any]], settings: str) -> str:
    lines = ['# Fidelity of converted timm ResNet-family models on Fashion-MNIST', '', settings, '']
    for entry in measured:
        up = entry['upstream']
        lines += [f"## {up['model']} (upstream: {up['test_top1']:.2f} % test top-1 after {up['epochs']} epochs on "
                  f"{up['train_images']} training images, {up['wall_s'] / 60:.0f} min)", '',
                  '| γ | γ per stage | top-1 % | agreement % | KL | '
                  'grad err fp32 vs standard (input / worst param) | '
                  'vs bitwise-matching standard | saved MiB fp32 (× plain) |', '|---|---|---|---|---|---|---|---|']
        for r in entry['records']:
            grad_text, matching_text = (f"{g['input']:.1e} / {g['worst_param']:.1e}" if g else '' for g in
                                        (r.get('grad_error_fp32'), r.get('grad_error_fp32_matching')))
            ratio = f" ({r['saved_mib_fp32'] / r['plain_saved_mib_fp32']:.2f}×)" if 'plain_saved_mib_fp32' in r else ''
            lines.append(f"| {r['gamma']} | {_gamma_text(r['stage_gamma'])} | {100 * r['top1']:.2f} | "
                         f"{100 * r['agreement']:.2f} | {r['kl']:.4f} | {grad_text} | {matching_text} | "
                         f"{r['saved_mib_fp32']:.2f}{ratio} |")
        lines.append('')
    return '\n'.join(lines)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', default=','.join(SAMPLE), help='timm architectures (default: %(default)s)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'fidelity' / 'family'), help='output folder')
    parser.add_argument('--phase', choices=('upstream', 'all'), default='all',
                        help="'upstream' only trains the upstreams (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    archs = args.archs.split(',')
    settings = (f'torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, load average '
                f'at start {os.getloadavg()[0]:.1f}; upstreams: the first {TRAIN_LIMIT} Fashion-MNIST training '
                f'images, {EPOCHS} epochs; test: all 10000 test images at 32x32; gradients and saved bytes: '
                f'{GRAD_IMAGES} training images, train mode; unhealed conversions')
    print(settings, flush=True)
    upstreams = {arch: train_upstream(arch, out) for arch in archs}
    if args.phase == 'upstream':
        return 0
    for arch in archs:
        path = out / 'records' / f'{arch}.json'
        if not path.is_file():
            measured = {'settings': settings, 'upstream': upstreams[arch],
                        'records': measure(arch, out, out / 'scratch')}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(measured, indent=1)))
    measured = [json.loads((out / 'records' / f'{arch}.json').read_text()) for arch in archs]
    markdown = format_markdown(measured, measured[0]['settings'])
    atomic_write(out / 'fidelity.md', lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    return 0


if __name__ == '__main__':
    sys.exit(main())
