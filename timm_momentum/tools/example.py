"""``timm-momentum example``: build a Momentum ResNet and compare its stored activations with ResNet's."""
import argparse
from typing import Dict

import torch

from .memory import MiB, build_model, saved_tensor_bytes


def compare_saved_activations(depths: str = '50,101,152', batch_size: int = 2, img_size: int = 64) -> Dict[str, Dict[str, int]]:
    """Bytes saved for backward by timm's resnet and by the momentum model in memory-efficient mode."""
    results = {}
    x = torch.randn(batch_size, 3, img_size, img_size)
    for depth in (int(d) for d in depths.split(',')):
        plain = saved_tensor_bytes(build_model(f'resnet{depth}', 'plain'), x)
        momentum = saved_tensor_bytes(build_model(f'momentum_resnet{depth}', 'memory_efficient'), x)
        results[f'resnet{depth}'] = {'plain': plain, 'momentum_memory_efficient': momentum}
    return results


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum example`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    results = compare_saved_activations(args.depths, args.batch_size, args.img_size)
    print(f'bytes saved for backward, batch {args.batch_size}, {args.img_size}x{args.img_size}:')
    print(f'{"depth":>8} {"resnet (MiB)":>14} {"momentum, memory_efficient (MiB)":>34} {"ratio":>7}')
    for name, row in results.items():
        print(f'{name:>8} {row["plain"] / MiB:14.1f} {row["momentum_memory_efficient"] / MiB:34.1f} '
              f'{row["momentum_memory_efficient"] / row["plain"]:7.3f}')
    return 0
