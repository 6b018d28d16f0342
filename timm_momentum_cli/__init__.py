"""The ``timm-momentum`` command line. It only parses arguments and calls library functions.

This package imports only the standard library. ``import timm_momentum`` imports torch and timm, because it
registers the models with timm, and that takes seconds. So ``timm-momentum --help`` and every subcommand's
``--help`` never touch ``timm_momentum``. A subcommand imports its tool module (``timm_momentum.tools.NAME``)
when it runs, and calls that module's ``run_cli(args)``.

Every option gets a one-line ``help``; each subcommand's ``--help`` shows the defaults (``tests/test_cli.py``
checks both). Defaults that the tools define are copied here as literals. ``tests/test_cli.py`` checks that
each copy equals the tool's own value.
"""
import argparse
from typing import Any, Dict, List, Optional

__all__ = ['build_parser', 'main', 'FINETUNE_DEFAULTS', 'BENCH_AMP_DTYPES', 'BENCH_COMPILED_CONFIGS',
           'BENCH_DEFAULT_COMPILED', 'CONVERT_DRIFT_IMAGES']

# timm_momentum.tools.finetune.DEFAULTS (what each key means is said there), which finetune's epilog lists.
FINETUNE_DEFAULTS: Dict[str, Any] = {
    'model': 'momentum_resnet50', 'pretrained': False, 'initial_checkpoint': None, 'num_classes': None,
    'in_chans': 3, 'img_size': None, 'gamma': None, 'memory_efficient': True, 'drop_path': 0.0, 'drop': 0.0,
    'grad_checkpointing': False,
    'dataset': 'sklearn/digits', 'data_dir': None, 'train_split': 'train', 'val_split': 'validation',
    'classes': None, 'download': False, 'workers': 2, 'pin_mem': True, 'hflip': 0.5, 'scale': None,
    'crop_padding': None, 'train_per_class': None, 'train_limit': None, 'val_limit': None,
    'batch_size': 64, 'grad_accum_steps': 1, 'epochs': 10, 'opt': 'sgd', 'lr': 0.01, 'momentum': 0.9,
    'weight_decay': 5e-4, 'sched': 'cosine', 'warmup_epochs': 0, 'min_lr': 0.0,
    'decay_milestones': [90, 180, 270], 'decay_rate': 0.1, 'smoothing': 0.0, 'mixup': 0.0, 'cutmix': 0.0,
    'model_ema': False, 'model_ema_decay': 0.999, 'clip_grad': None,
    'distill_weight': 0.0, 'distill_from': None, 'distill_temperature': 1.0, 'distill_eval_norms': False,
    'device': 'auto', 'amp': 'auto', 'channels_last': False, 'compile': False, 'cudnn_benchmark': True,
    'seed': 42, 'output': None,
    'resume': False, 'log_interval': 10, 'progress': True,
    'plots': True,
    'checkpoints': True,
}
# sorted(timm_momentum.tools.memory.AMP_DTYPES): bench --amp's choices.
BENCH_AMP_DTYPES = ('bf16', 'fp16')
# The keys of timm_momentum.tools.bench.COMPILED_CONFIGS: what bench --compile takes.
BENCH_COMPILED_CONFIGS = ('checkpointing', 'standard', 'memory-efficient')
# What bench --compile alone measures: the two memory-saving options a user weighs.
BENCH_DEFAULT_COMPILED = ('checkpointing', 'memory-efficient')
# timm_momentum.tools.convert.DRIFT_IMAGES: the most images convert --eval-images measures drift on.
CONVERT_DRIFT_IMAGES = 256


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless the help already says it or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or 'default' in (action.help or ''):
            return action.help or ''
        return super()._get_help_string(action)


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its ``--help`` shows each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault('formatter_class', _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


# Each subcommand's handler imports its tool, and so torch and timm, only when the subcommand runs.

def _finetune(args: argparse.Namespace) -> int:
    from timm_momentum.tools.finetune import run_cli
    return run_cli(args)


def _demo(args: argparse.Namespace) -> int:
    from timm_momentum.tools.demo import run_cli
    return run_cli(args)


def _example(args: argparse.Namespace) -> int:
    from timm_momentum.tools.example import run_cli
    return run_cli(args)


def _convert(args: argparse.Namespace) -> int:
    from timm_momentum.tools.convert import run_cli
    return run_cli(args)


def _bench(args: argparse.Namespace) -> int:
    from timm_momentum.tools.bench import run_cli
    return run_cli(args)


def _study(args: argparse.Namespace) -> int:
    from timm_momentum.tools.study import run_cli
    return run_cli(args)


def _models(args: argparse.Namespace) -> int:
    from timm_momentum.tools.models import run_cli
    return run_cli(args)


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser('models', help="the momentum models of timm's ResNet family and ViTs, as README tables them")
    parser.add_argument('--write', action='store_true',
                        help="rewrite README.md's models table, MODELS.md and convert/zoo.yaml from timm's registry")
    parser.add_argument('--repo', default=None, help='the checkout to write in (default: the one this package is in)')
    parser.set_defaults(func=_models)


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    keys = ', '.join(f'{k} ({v})' for k, v in FINETUNE_DEFAULTS.items())
    parser = subparsers.add_parser('finetune', help='fine-tune a (momentum) model from a YAML config',
                                   epilog=f'config keys, each settable as --key value, with their defaults: {keys}')
    parser.add_argument('--config', default=None, help='YAML config in configs/; any other --key value '
                        'overrides that key (names as in timm train.py, plus gamma and memory_efficient; '
                        'default: none, the defaults listed below)')
    parser.set_defaults(func=_finetune, accepts_overrides=True, overrides=[])


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser('demo', help='offline digits pipeline: train resnet18, convert, fine-tune')
    parser.add_argument('--output', default='output/demo', help='folder for every stage\'s outputs')
    parser.add_argument('--source', default=None, help='a ResNet checkpoint or timm tag to convert instead of '
                        'training one (default: train resnet18 on digits 0-4)')
    parser.add_argument('--epochs-source', type=int, default=15, help='epochs of the upstream resnet18 on digits 0-4')
    parser.add_argument('--epochs-target', type=int, default=15, help='fine-tuning epochs on digits 5-9')
    parser.set_defaults(func=_demo)


def _add_example(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser('example', help='compare stored activations of ResNet and Momentum ResNet')
    parser.add_argument('--depths', default='50,101,152', help='comma-separated ResNet depths to compare')
    parser.add_argument('--batch-size', type=int, default=2, help='batch of the measured training step')
    parser.add_argument('--img-size', type=int, default=64, help='input resolution')
    parser.set_defaults(func=_example)


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser('convert', help='convert a pretrained ResNet checkpoint into a Momentum ResNet repo')
    parser.add_argument('source', help='local .safetensors/.pth/.bin file (a timm train.py checkpoint too), a model '
                        'folder (local-dir:PATH), hf-hub:ORG/NAME, or a timm ResNet name/tag')
    parser.add_argument('--out', required=True, help='output folder (Hugging Face / timm layout)')
    parser.add_argument('--gamma', default=None,
                        help="momentum stored in the config: a number in [0, 1), one per stage (0,0,0.036,0), or a "
                        "policy: auto, the faithful one (default: auto for "
                        "timm/torchvision ResNets, 0.9 for the paper block function, the source's own for the "
                        "official momentumnet layouts and for momentum checkpoints, which record it)")
    parser.add_argument('--source-gamma', default=None,
                        help='the gamma an official momentumnet checkpoint was trained at (default: 0.9, its '
                        'package default); timm/torchvision ResNets take none, momentum checkpoints only their own')
    parser.add_argument('--arch', default=None, help='override the inferred architecture, e.g. momentum_resnet50 '
                        '(default: inferred from the weights)')
    parser.add_argument('--force', action='store_true', help='replace a non-empty output folder')
    parser.add_argument('--push-to-hub', default=None, metavar='ORG/NAME',
                        help='upload the folder to this Hub repo afterwards (default: no upload)')
    parser.add_argument('--img-size', type=int, default=None, help='input resolution (default: the source cfg)')
    parser.add_argument('--heal-images', default=None, help='unlabeled images for healing: sklearn/digits, '
                        'torch/fashion_mnist (its idx files in /usr/share/datasets/fashion-mnist) or a folder '
                        '(default: none, no healing)')
    parser.add_argument('--recalibrate-bn', action='store_true', help='re-estimate BatchNorm statistics at --gamma')
    parser.add_argument('--distill-steps', type=int, default=0, help='then distil the source for N steps (100 is a good start)')
    parser.add_argument('--eval-images', default=None,
                        help=f'images to measure drift from the source on, up to {CONVERT_DRIFT_IMAGES} (sklearn/digits, '
                        f'torch/fashion_mnist or a folder; default: --heal-images, else 2 images of random noise)')
    parser.set_defaults(func=_convert)


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'bench', help='memory, speed and gradient error against ResNet and checkpointing')
    parser.add_argument('--models', default='momentum_resnet50,momentum_resnet101,momentum_resnet152',
                        help='comma-separated momentum models; each is compared with its source resnet')
    parser.add_argument('--batch-size', type=int, default=16, help='batch of the peak-memory measurements')
    parser.add_argument('--img-size', type=int, default=224, help='input resolution')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where to measure')
    parser.add_argument('--amp', default=None, choices=list(BENCH_AMP_DTYPES), help='autocast dtype (default fp32)')
    parser.add_argument('--time-batch-size', type=int, default=4,
                        help='batch of the timing, gradient and saved-bytes measurements')
    parser.add_argument('--warmup', type=int, default=1, help='warm-up steps per configuration before timing')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per configuration (median reported)')
    parser.add_argument('--repeats', type=int, default=1,
                        help='blocks of --steps interleaved rounds, each after --warmup rounds in fresh processes on '
                             'CPU (a compiled row compiles again, from torch\'s cache); rows report the median ratio '
                             'to plain resnet and its min-max over the repeats')
    parser.add_argument('--arms', default=None,
                        help='comma-separated eager configurations beside plain resnet, from checkpointing, standard, '
                             'memory-efficient, transitions-stored, official (default: all)')
    parser.add_argument('--compile', nargs='?', const=','.join(BENCH_DEFAULT_COMPILED), default=None,
                        metavar='KEYS', help=f'also measure torch.compile\'d configurations, comma-separated from '
                        f'{", ".join(BENCH_COMPILED_CONFIGS)}; alone: {",".join(BENCH_DEFAULT_COMPILED)} '
                        f'(default: none compiled)')
    parser.add_argument('--compile-backend', default='inductor', help='torch.compile backend of --compile')
    parser.add_argument('--no-peak', action='store_true', help='skip peak memory (one subprocess per row on CPU)')
    parser.add_argument('--one-process', action='store_true',
                        help='on CPU, time every configuration in this one process instead of each in a process of '
                             'its own, fresh for each repeat (they then share one heap, and the largest pays page '
                             'faults for it)')
    parser.add_argument('--no-max-batch', action='store_true', help='on CUDA, skip the largest-batch search')
    parser.add_argument('--max-batch-models', default=None,
                        help='comma-separated models whose largest batch is searched (default: all)')
    parser.add_argument('--max-batch-limit', type=int, default=8192, help='largest batch the search tries')
    parser.add_argument('--max-batch-seconds', type=float, default=120.0,
                        help='search time per model and configuration before it stops')
    parser.add_argument('--out', default=None, help='write the results as JSON to this file (default: print only)')
    parser.add_argument('--plot', default=None, help='draw memory, time and time against memory as PNG to this file '
                        '(default: no plot; needs matplotlib)')
    parser.set_defaults(func=_bench)


def _add_study(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser('study', help='plain vs momentum fine-tuning on digits or Fashion-MNIST, with seeds: does it cost accuracy?')
    parser.add_argument('--out', default='output/study', help='output folder (runs, study.json, study.md, study.png)')
    parser.add_argument('--seeds', type=int, default=None, help='seeds per resnet18 arm (default 3; 1 with --quick)')
    parser.add_argument('--quick', action='store_true', help='a tiny study: one seed, resnet18 only, 16x16, one epoch')
    parser.add_argument('--task', default='digits', choices=('digits', 'fashion-mnist'),
                        help='the transfer: classes 0-4 upstream, 5-9 fine-tuned (fashion-mnist needs its idx files)')
    parser.add_argument('--train-limit', type=int, default=None,
                        help='the first N training images of each task (default: all; for a CPU budget)')
    parser.add_argument('--val-limit', type=int, default=None,
                        help='the first N test images of each task (default: all; for a CPU budget)')
    parser.set_defaults(func=_study)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog='timm-momentum',
        description='Invertible Momentum ResNets for timm (Sander et al., ICML 2021, arXiv:2102.07870).')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', parser_class=_SubcommandParser)
    for add_subcommand in (_add_finetune, _add_demo, _add_example, _add_convert, _add_bench, _add_study,
                           _add_models):
        add_subcommand(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``timm-momentum`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, 'accepts_overrides', False):
            parser.error(f'unrecognized arguments: {" ".join(extra)}')
        args.overrides = list(getattr(args, 'overrides', [])) + extra
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
