"""``timm-momentum demo``: the offline digits pipeline. A plain ResNet trained on digits 0-4 is converted
to a Momentum ResNet, which is then fine-tuned on digits 5-9 in memory-efficient mode.

Each digit set is split 80/20 (stratified); every accuracy the demo prints is on the 20% that training never
sees, which it calls "val" throughout, as fine-tuning's epoch lines do.
"""
import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .convert import convert
from .errors import ConfigError, run_reporting_user_errors
from .finetune import DEFAULTS, train
from .memory import saved_tensor_bytes

__all__ = ['run_demo', 'folder_bytes']


def folder_bytes(folder: Path) -> int:
    """The total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob('*') if p.is_file())


def run_demo(output: str = 'output/demo', source: Optional[str] = None, epochs_source: int = 15,
             epochs_target: int = 15, img_size: int = 32, progress: bool = True,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The offline pipeline: train resnet18 on digits 0-4, convert (gamma 0.9), fine-tune on digits 5-9.

    Each stage logs a heading, fine-tuning's epoch lines (and, with ``progress``, a bar within each epoch),
    and one result line.
    """
    import timm
    from safetensors.torch import save_file

    out = Path(output)
    if out.is_dir() and any(out.iterdir()):  # each stage writes a new run; finetune refuses to overwrite one
        raise ConfigError(f'{out} is not empty: it holds an earlier demo, which this one would overwrite; '
                          f'choose another --output, or remove it first')
    started = time.perf_counter()
    base = dict(DEFAULTS, dataset='sklearn/digits', img_size=img_size, in_chans=3, batch_size=64, opt='adamw',
                lr=2e-3, weight_decay=0.05, sched='cosine', warmup_epochs=1, progress=progress)
    upstream_acc = None
    if source is None:
        log(f'== 1/3 upstream: train a plain resnet18 on digits 0-4 for {epochs_source} epochs, '
            f'{img_size}x{img_size} -> {out / "upstream"}')
        upstream = train(dict(base, model='resnet18', classes=[0, 1, 2, 3, 4], epochs=epochs_source,
                              output=str(out / 'upstream')))
        checkpoint = out / 'upstream' / 'resnet18_digits0-4.safetensors'
        save_file({k: v.contiguous() for k, v in upstream['model'].state_dict().items()}, str(checkpoint))
        source = str(checkpoint)
        upstream_acc = upstream['metrics']['val_acc']
        log(f'upstream resnet18: val accuracy {upstream_acc:.2f}% on digits 0-4')
    else:
        log(f'== 1/3 upstream: skipped, converting {source}')
    log(f'== 2/3 conversion: {Path(source).name} -> Momentum ResNet at gamma 0.9 -> {out / "converted"}')
    converted = convert(source, out / 'converted', gamma=0.9, force=True, img_size=img_size,
                        eval_images='sklearn/digits')
    drift = converted.verify['drift_at_gamma']
    equivalence = converted.verify['equivalence']
    exact = (f"equal to the source at gamma 0 (max logit difference {equivalence['max_abs_logit_diff_gamma0']:.1g})"
             if 'passed' in equivalence else 'gamma 0 equivalence not checked')
    log(f"converted to {converted.arch}: {exact}; at gamma 0.9 its top-1 class agrees with the source's on "
        f"{100 * drift['top1_agreement']:.1f}% of {drift['images']} val digits, before fine-tuning")
    log(f'== 3/3 fine-tuning: {converted.arch}, memory-efficient, on digits 5-9 for {epochs_target} epochs '
        f'-> {out / "finetune"}')
    result = train(dict(base, model=f'local-dir:{converted.out_dir}', pretrained=True, classes=[5, 6, 7, 8, 9],
                        num_classes=5, epochs=epochs_target, gamma=0.9, memory_efficient=True,
                        output=str(out / 'finetune')))
    log(f"fine-tuned {converted.arch}: val accuracy {result['metrics']['val_acc']:.2f}% on digits 5-9")
    x = torch.randn(base['batch_size'], 3, img_size, img_size)
    momentum_bytes = saved_tensor_bytes(timm.create_model(f'local-dir:{converted.out_dir}', memory_efficient=True,
                                                          num_classes=5).train(), x)
    plain_bytes = saved_tensor_bytes(timm.create_model('resnet18', num_classes=5).train(), x)
    return {'upstream_val_acc_digits0-4': upstream_acc, 'val_acc_digits5-9': result['metrics']['val_acc'],
            'saved_activation_bytes_momentum': momentum_bytes, 'saved_activation_bytes_resnet18': plain_bytes,
            'activation_ratio': momentum_bytes / plain_bytes, 'seconds': time.perf_counter() - started,
            'output': str(out), 'output_bytes': folder_bytes(out),
            'checkpoint_bytes': sum(p.stat().st_size for p in out.rglob('last.pth.tar'))}


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum demo`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    report = run_reporting_user_errors(lambda: run_demo(args.output, args.source, args.epochs_source,
                                                        args.epochs_target))
    if report is None:
        return 2
    upstream = report['upstream_val_acc_digits0-4']
    print('== summary')
    print(f"digits 5-9 val accuracy after fine-tuning: {report['val_acc_digits5-9']:.2f}%"
          + (f" (upstream resnet18 on digits 0-4: {upstream:.2f}% val)" if upstream is not None else ''))
    print(f"activation bytes saved for backward, batch 64 at 32x32: momentum memory-efficient "
          f"{report['saved_activation_bytes_momentum'] / 2 ** 20:.1f} MiB vs resnet18 "
          f"{report['saved_activation_bytes_resnet18'] / 2 ** 20:.1f} MiB ({report['activation_ratio']:.2f}x)")
    print(f"time {report['seconds']:.0f} s; {report['output']} holds {report['output_bytes'] / 1e6:.0f} MB "
          f"({report['checkpoint_bytes'] / 1e6:.0f} MB of it the last.pth.tar resume checkpoints, which can be "
          f"deleted), with metrics.csv, loss and accuracy plots and the best/ and final/ models of each stage")
    return 0
