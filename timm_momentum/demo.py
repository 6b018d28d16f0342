"""``timm-momentum demo``: the offline digits pipeline. A plain ResNet trained on digits 0-4 is converted
to a Momentum ResNet, which is then fine-tuned on digits 5-9 in memory-efficient mode.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .convert import convert
from .errors import ConfigError, ConversionError
from .finetune import DEFAULTS, train
from .memory import saved_tensor_bytes

__all__ = ['run_demo']


def run_demo(output: str = 'output/demo', source: Optional[str] = None, epochs_source: int = 15,
             epochs_target: int = 15, img_size: int = 32) -> Dict[str, Any]:
    """The offline pipeline: train resnet18 on digits 0-4, convert (gamma 0.9), fine-tune on digits 5-9."""
    import timm
    from safetensors.torch import save_file

    out = Path(output)
    started = time.perf_counter()
    base = dict(DEFAULTS, dataset='sklearn/digits', img_size=img_size, in_chans=3, batch_size=64, opt='adamw',
                lr=2e-3, weight_decay=0.05, sched='cosine', warmup_epochs=1, progress=False)
    if source is None:
        upstream = train(dict(base, model='resnet18', classes=[0, 1, 2, 3, 4], epochs=epochs_source,
                              output=str(out / 'upstream')))
        checkpoint = out / 'upstream' / 'resnet18_digits0-4.safetensors'
        save_file({k: v.contiguous() for k, v in upstream['model'].state_dict().items()}, str(checkpoint))
        source = str(checkpoint)
        upstream_acc = upstream['metrics']['val_acc']
    else:
        upstream_acc = None
    converted = convert(source, out / 'converted', gamma=0.9, force=True, img_size=img_size)
    result = train(dict(base, model=f'local-dir:{converted.out_dir}', pretrained=True, classes=[5, 6, 7, 8, 9],
                        num_classes=5, epochs=epochs_target, gamma=0.9, memory_efficient=True,
                        output=str(out / 'finetune')))
    x = torch.randn(base['batch_size'], 3, img_size, img_size)
    momentum_bytes = saved_tensor_bytes(timm.create_model(f'local-dir:{converted.out_dir}', memory_efficient=True,
                                                          num_classes=5).train(), x)
    plain_bytes = saved_tensor_bytes(timm.create_model('resnet18', num_classes=5).train(), x)
    report = {'upstream_val_acc_digits0-4': upstream_acc, 'test_acc_digits5-9': result['metrics']['val_acc'],
              'saved_activation_bytes_momentum': momentum_bytes, 'saved_activation_bytes_resnet18': plain_bytes,
              'activation_ratio': momentum_bytes / plain_bytes, 'seconds': time.perf_counter() - started,
              'output': str(out)}
    return report


def _run_demo(args: argparse.Namespace) -> int:
    try:
        report = run_demo(args.output, args.source, args.epochs_source, args.epochs_target)
    except (ConfigError, ConversionError, FloatingPointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f"digits 5-9 test accuracy after fine-tuning: {report['test_acc_digits5-9']:.2f}% "
          f"(upstream resnet18 on digits 0-4: {report['upstream_val_acc_digits0-4']})")
    print(f"activation bytes saved for backward, batch 64 at 32x32: momentum memory-efficient "
          f"{report['saved_activation_bytes_momentum'] / 2 ** 20:.1f} MiB vs resnet18 "
          f"{report['saved_activation_bytes_resnet18'] / 2 ** 20:.1f} MiB ({report['activation_ratio']:.2f}x)")
    print(f"time {report['seconds']:.0f} s; outputs, metrics.csv and plots in {report['output']}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser('demo', help='offline digits pipeline: train resnet18, convert, fine-tune')
    parser.add_argument('--output', default='output/demo', help='folder for every stage\'s outputs')
    parser.add_argument('--source', default=None, help='a ResNet checkpoint or timm tag to convert instead of '
                        'training one (default: train resnet18 on digits 0-4)')
    parser.add_argument('--epochs-source', type=int, default=15, help='epochs of the upstream resnet18 on digits 0-4')
    parser.add_argument('--epochs-target', type=int, default=15, help='fine-tuning epochs on digits 5-9')
    parser.set_defaults(func=_run_demo)
