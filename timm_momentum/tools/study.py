"""``timm-momentum study``: does switching to a Momentum ResNet cost accuracy? Plain against momentum, with seeds.

One plain ResNet per depth is trained on digits 0-4 (the upstream) and shared by every arm. Each arm then
fine-tunes on digits 5-9 through ``finetune.train``, once with all training images and once with a few per
class, for several seeds. Each run writes its own ``metrics.csv``; ``study.json``, ``study.md`` and
``study.png`` are computed from those files (and from ``before.csv`` and ``memory.csv``, written here) only.

The reported accuracy is the last epoch's on the held-out test split. Nothing is selected on that split:
the number of epochs is fixed beforehand, and no best checkpoint or early stop is used.
"""
import argparse
import csv
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import ConfigError, run_reporting_user_errors
from .files import atomic_write, write_csv

__all__ = ['Arm', 'StudySettings', 'study_settings', 'study_arms', 'run_study', 'read_metrics', 'summarize',
           'format_markdown', 'plot_study']

UPSTREAM_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]
REGIMES = ('full', 'few-shot')
# One recipe for every arm and the upstream: finetune's default SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
# cosine, no warm-up. The demo's AdamW at lr 2e-3 left the held-out accuracy of 3-epoch runs swinging by up to
# 40 points between seeds (BatchNorm's running statistics trail weights that move that fast).
RECIPE: Dict[str, Any] = dict(dataset='sklearn/digits', in_chans=3, opt='sgd', lr=0.01, momentum=0.9,
                              weight_decay=5e-4, sched='cosine', warmup_epochs=0, progress=False, plots=False,
                              checkpoints=False)
ACCURACY_NOTE = ('test accuracy = the last epoch\'s accuracy on the held-out digits 5-9 test split (20% of the '
                 'digits, stratified; never trained on, never used to choose an epoch or a setting). Best epoch '
                 '= the epoch with the highest test accuracy, shown for information only.')


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning: a depth, plain or momentum, and where the weights start."""
    depth: str  # the plain timm name: resnet18, resnet50
    kind: str  # plain | checkpointed | momentum | scratch
    gamma: Optional[float] = None

    @property
    def name(self) -> str:
        """A label for tables and plots."""
        return {'plain': f'{self.depth} plain', 'checkpointed': f'{self.depth} plain, checkpointed',
                'momentum': f'{self.depth} momentum γ={self.gamma}',
                'scratch': f'{self.depth} momentum γ={self.gamma}, from scratch'}[self.kind]

    @property
    def key(self) -> str:
        """A folder name."""
        return {'plain': f'{self.depth}-plain', 'checkpointed': f'{self.depth}-checkpointed',
                'momentum': f'momentum_{self.depth}-gamma{self.gamma}',
                'scratch': f'momentum_{self.depth}-gamma{self.gamma}-scratch'}[self.kind]

    @property
    def model(self) -> str:
        """The timm model the arm trains."""
        return self.depth if self.kind in ('plain', 'checkpointed') else f'momentum_{self.depth}'

    @property
    def memory_mode(self) -> str:
        """The mode of ``memory.peak_step_memory`` that trains as this arm does."""
        return {'plain': 'plain', 'checkpointed': 'checkpoint'}.get(self.kind, 'memory_efficient')


@dataclass(frozen=True)
class StudySettings:
    """What a study runs: resolution, batches, epochs, seeds and depths."""
    img_size: int
    batch_size: int  # full regime; also the batch of the peak-memory measure
    few_shot_per_class: int
    few_shot_batch_size: int
    epochs_upstream: int
    epochs_full: int
    epochs_few_shot: int
    seeds: int  # resnet18 arms
    deep_seeds: int  # arms of deeper models
    depths: Tuple[str, ...]


def study_settings(seeds: Optional[int] = None, quick: bool = False) -> StudySettings:
    """The default study (3 seeds, resnet18 and resnet50, 32x32), or with ``quick`` a tiny one (1 seed, resnet18, 16x16, 1 epoch)."""
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f'seeds must be an integer >= 1, got {seeds!r}')
    if quick:
        return StudySettings(img_size=16, batch_size=64, few_shot_per_class=5, few_shot_batch_size=5,
                             epochs_upstream=1, epochs_full=1, epochs_few_shot=1, seeds=seeds or 1,
                             deep_seeds=1, depths=('resnet18',))
    return StudySettings(img_size=32, batch_size=32, few_shot_per_class=10, few_shot_batch_size=10,
                         epochs_upstream=3, epochs_full=3, epochs_few_shot=8, seeds=seeds or 3,
                         deep_seeds=1, depths=('resnet18', 'resnet50'))


def study_arms(depths: Sequence[str]) -> List[Arm]:
    """Every arm of resnet18 (plain, checkpointed, momentum γ 0.5/0.9/0.99, γ 0.9 from scratch); plain and γ 0.9 deeper."""
    arms = []
    for depth in depths:
        if depth == 'resnet18':
            arms += [Arm(depth, 'plain'), Arm(depth, 'checkpointed'), *(Arm(depth, 'momentum', g) for g in (0.5, 0.9, 0.99)),
                     Arm(depth, 'scratch', 0.9)]
        else:
            arms += [Arm(depth, 'plain'), Arm(depth, 'momentum', 0.9)]
    return arms


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of a ``metrics.csv`` that ``finetune.train`` wrote, as numbers."""
    return [{k: float(v) for k, v in row.items()} for row in _read_rows(path)]


def _read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _held_out_accuracy(model: nn.Module, classes: Sequence[int], img_size: int) -> float:
    """Accuracy (%) of ``model`` on the digits test split of ``classes``, counted by ``finetune.validate``."""
    from .data import DigitsDataset
    from .finetune import validate

    test = DigitsDataset('validation', classes, img_size)
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    return validate(model, loader, next(model.parameters()).device, None)[1]


def _train_images(settings: StudySettings, regime: str) -> Tuple[int, int]:
    """(training images, images trained on per epoch) of a digits 5-9 run: the loader drops a last short batch."""
    from .data import DigitsDataset

    per_class = settings.few_shot_per_class if regime == 'few-shot' else None
    count = len(DigitsDataset('train', TARGET_CLASSES, 8, 1, per_class))
    batch = settings.few_shot_batch_size if regime == 'few-shot' else settings.batch_size
    return count, count - count % batch if count > batch else count


def _device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _prepare_starts(out: Path, settings: StudySettings, arms: List[Arm], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train each depth's upstream on digits 0-4, convert it for each γ, and write ``before.csv``."""
    import timm
    from safetensors.torch import save_file

    from .convert import convert
    from .finetune import DEFAULTS, train

    starts: Dict[str, Any] = {}
    before_rows = []
    for depth in settings.depths:
        folder = out / 'upstream' / depth
        log(f'upstream: {depth} on digits 0-4, {settings.epochs_upstream} epochs')
        upstream = train(dict(DEFAULTS, **RECIPE, model=depth, classes=UPSTREAM_CLASSES, img_size=settings.img_size,
                              batch_size=settings.batch_size, epochs=settings.epochs_upstream, seed=0,
                              output=str(folder)))
        checkpoint = folder / f'{depth}_digits0-4.safetensors'
        state = {k: v.detach().cpu().contiguous() for k, v in upstream['model'].state_dict().items()}
        atomic_write(checkpoint, lambda tmp: save_file(state, tmp))
        shutil.rmtree(folder / 'final', ignore_errors=True)  # the safetensors file is the upstream the arms load
        starts[depth] = checkpoint
        before_rows.append({'start': depth, 'accuracy': _held_out_accuracy(upstream['model'], UPSTREAM_CLASSES,
                                                                           settings.img_size)})
        for arm in arms:
            if arm.depth == depth and arm.kind == 'momentum':
                converted = convert(str(checkpoint), out / 'start' / arm.key, gamma=arm.gamma, force=True,
                                    img_size=settings.img_size)
                starts[arm.key] = converted.out_dir
                model = timm.create_model(f'local-dir:{converted.out_dir}', pretrained=True)
                before_rows.append({'start': arm.key, 'accuracy': _held_out_accuracy(model, UPSTREAM_CLASSES,
                                                                                     settings.img_size)})
    write_csv(out / 'before.csv', before_rows)
    return starts


def _measure_memory(out: Path, settings: StudySettings, arms: List[Arm], log: Callable[[str], None]) -> None:
    """Peak memory of one training step per (model, mode), in a fresh subprocess, into ``memory.csv``."""
    from .memory import peak_step_memory

    rows = []
    for model, mode in dict.fromkeys((arm.model, arm.memory_mode) for arm in arms):
        log(f'peak step memory: {model} {mode}, batch {settings.batch_size}, {settings.img_size}x{settings.img_size}')
        peak = peak_step_memory(model, mode, settings.batch_size, settings.img_size, _device(),
                                model_kwargs={'num_classes': len(TARGET_CLASSES)}, after_warmup=True)
        rows.append({'model': model, 'mode': mode, 'batch_size': settings.batch_size, 'img_size': settings.img_size,
                     'peak_bytes': peak})
    write_csv(out / 'memory.csv', rows)


def _run_config(arm: Arm, regime: str, seed: int, settings: StudySettings, starts: Dict[str, Any],
                output: Path) -> Dict[str, Any]:
    """The ``finetune.train`` config of one arm, regime and seed."""
    from .finetune import DEFAULTS

    cfg = dict(DEFAULTS, **RECIPE, classes=TARGET_CLASSES, num_classes=len(TARGET_CLASSES), img_size=settings.img_size,
               seed=seed, output=str(output), gamma=arm.gamma or DEFAULTS['gamma'], memory_efficient=True,
               epochs=settings.epochs_few_shot if regime == 'few-shot' else settings.epochs_full,
               batch_size=settings.few_shot_batch_size if regime == 'few-shot' else settings.batch_size,
               train_per_class=settings.few_shot_per_class if regime == 'few-shot' else None)
    if arm.kind in ('plain', 'checkpointed'):
        cfg.update(model=arm.depth, initial_checkpoint=str(starts[arm.depth]), grad_checkpointing=arm.kind == 'checkpointed')
    elif arm.kind == 'momentum':
        cfg.update(model=f'local-dir:{starts[arm.key]}', pretrained=True)
    else:
        cfg.update(model=arm.model)
    return cfg


def _record(arm: Arm, regime: str, seed: int, run_dir: Path, out: Path, settings: StudySettings,
            before: Dict[str, float], memory: Dict[Tuple[str, str], float]) -> Dict[str, Any]:
    """One run's record, read back from the ``metrics.csv`` it wrote."""
    rows = read_metrics(run_dir / 'metrics.csv')
    accuracies = [row['val_acc'] for row in rows]
    count, seen = _train_images(settings, regime)
    start = {'plain': arm.depth, 'checkpointed': arm.depth, 'momentum': arm.key}.get(arm.kind)
    return {
        'arm': arm.name, 'arm_key': arm.key, 'model': arm.model, 'depth': arm.depth, 'kind': arm.kind,
        'gamma': arm.gamma, 'regime': regime, 'seed': seed, 'train_images': count, 'epochs': len(rows),
        'test_acc': accuracies[-1], 'best_epoch': int(rows[accuracies.index(max(accuracies))]['epoch']),
        'best_test_acc': max(accuracies), 'acc_before': before.get(start),
        'peak_step_mib': memory[(arm.model, arm.memory_mode)] / 2 ** 20,
        'images_per_s': statistics.fmean(row['images_per_s'] for row in rows),
        'seconds_per_epoch': statistics.fmean(seen / row['images_per_s'] for row in rows),
        'metrics_csv': str((run_dir / 'metrics.csv').relative_to(out)),
    }


def summarize(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean ± std per arm and regime, with peak-memory and time ratios against the same depth's plain arm."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record['arm_key'], record['regime']), []).append(record)
    summary = []
    for (key, regime), group in groups.items():
        first = group[0]
        plain = groups.get((f"{first['depth']}-plain", regime))
        accuracies = [r['test_acc'] for r in group]
        seconds = statistics.fmean(r['seconds_per_epoch'] for r in group)
        befores = [r['acc_before'] for r in group if r['acc_before'] is not None]
        summary.append({
            'arm': first['arm'], 'arm_key': key, 'depth': first['depth'], 'kind': first['kind'], 'regime': regime,
            'seeds': len(group), 'test_acc_mean': statistics.fmean(accuracies),
            'test_acc_std': statistics.stdev(accuracies) if len(group) > 1 else None,
            'best_epochs': [r['best_epoch'] for r in group],
            'acc_before': statistics.fmean(befores) if befores else None,
            'peak_step_mib': first['peak_step_mib'], 'seconds_per_epoch': seconds,
            'peak_ratio_vs_plain': first['peak_step_mib'] / plain[0]['peak_step_mib'] if plain else None,
            'time_ratio_vs_plain': seconds / statistics.fmean(r['seconds_per_epoch'] for r in plain) if plain else None,
        })
    return summary


def _number(value: Optional[float], fmt: str, suffix: str = '') -> str:
    return '–' if value is None else f'{value:{fmt}}{suffix}'


def format_markdown(study: Dict[str, Any]) -> str:
    """``study.md``: the settings, and a table of mean ± std per arm and regime with ratios against plain."""
    s = study['settings']
    lines = [
        '# Does switching to a Momentum ResNet cost accuracy?', '',
        f"Digits transfer: upstream plain ResNet trained on digits 0–4 ({s['epochs_upstream']} epochs), shared by "
        f"every arm; each arm fine-tuned on digits 5–9 at {s['img_size']}×{s['img_size']}, SGD lr 0.01 (momentum 0.9, weight decay 5e-4), cosine, no warm-up. "
        f"Regimes: full ({study['train_images']['full']} training images, batch {s['batch_size']}, "
        f"{s['epochs_full']} epochs) and few-shot ({s['few_shot_per_class']} per class = "
        f"{study['train_images']['few-shot']} images drawn by seed, batch {s['few_shot_batch_size']}, "
        f"{s['epochs_few_shot']} epochs). Seeds: {s['seeds']} (resnet18), {s['deep_seeds']} (deeper).", '',
        f"- {ACCURACY_NOTE}",
        '- before FT = accuracy of the starting weights on the upstream task (digits 0–4 test split): the upstream '
        'for plain arms, the converted model for momentum arms (what conversion keeps); none from scratch.',
        f"- peak step = peak memory of one training step at batch {s['batch_size']} above the model (fresh "
        'subprocess, after a warm-up; `memory.peak_step_memory`, the bench\'s measure), once per model and mode: γ '
        'changes no tensor size, so the memory-efficient momentum arms of a depth share one measurement.',
        '- s/epoch = training time per epoch (evaluation excluded), from `images_per_s` in metrics.csv. Ratios are '
        'against the plain arm of the same depth in this run.', '',
        '| arm | regime | seeds | test acc. % (mean ± std) | best epochs | before FT % | peak step MiB | × plain '
        '| s/epoch | × plain |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for row in study['summary']:
        std = '' if row['test_acc_std'] is None else f" ± {row['test_acc_std']:.2f}"
        lines.append(
            f"| {row['arm']} | {row['regime']} | {row['seeds']} | {row['test_acc_mean']:.2f}{std} | "
            f"{', '.join(str(e) for e in row['best_epochs'])} | {_number(row['acc_before'], '.2f')} | "
            f"{row['peak_step_mib']:.0f} | {_number(row['peak_ratio_vs_plain'], '.2f', '×')} | "
            f"{row['seconds_per_epoch']:.2f} | {_number(row['time_ratio_vs_plain'], '.2f', '×')} |")
    lines += ['', f"Wall time {study['seconds'] / 60:.1f} min on {study['machine']}; "
              f"command: `{study['command']}`. Every number traces to a metrics.csv under the runs folder "
              '(listed per record in study.json), to before.csv or to memory.csv.', '']
    return '\n'.join(lines)


def plot_study(study: Dict[str, Any], path: Path) -> bool:
    """``study.png``: test accuracy (mean ± std over seeds) against peak step memory, one point per arm and regime.

    Returns False, writing nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(12, 4.8), sharex=True)
    markers = {'plain': 'o', 'checkpointed': 's', 'momentum': 'D', 'scratch': 'x'}
    for ax, regime in zip(axes, REGIMES):
        for i, row in enumerate(r for r in study['summary'] if r['regime'] == regime):
            ax.errorbar(row['peak_step_mib'], row['test_acc_mean'], yerr=row['test_acc_std'] or 0, capsize=4,
                        marker=markers[row['kind']], color=f'C{i}', linestyle='none', label=row['arm'])
        ax.set(xlabel='peak step memory (MiB)', ylabel='test accuracy (%), last epoch',
               title=f'{regime}')
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.02, 0.5))
    fig.suptitle('Digits 5–9 after fine-tuning from a digits 0–4 upstream: accuracy vs peak step memory '
                 '(error bars: std over seeds)')
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)
    return True


def run_study(out: str = 'output/study', seeds: Optional[int] = None, quick: bool = False,
              log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every arm, regime and seed; write study.json, study.md and (with matplotlib) study.png into ``out``."""
    import platform

    from .convert import strict_json
    from .finetune import train

    settings = study_settings(seeds, quick)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f'--out {out_dir} exists and is not a folder')
    if out_dir.is_dir() and any(out_dir.iterdir()):  # each arm writes a new run; finetune refuses to overwrite one
        raise ConfigError(f'--out {out_dir} is not empty: it holds an earlier study, which this one would '
                          f'overwrite; choose another --out, or remove it first')
    started = time.perf_counter()
    arms = study_arms(settings.depths)
    starts = _prepare_starts(out_dir, settings, arms, log)
    _measure_memory(out_dir, settings, arms, log)
    before = {row['start']: float(row['accuracy']) for row in _read_rows(out_dir / 'before.csv')}
    memory = {(row['model'], row['mode']): float(row['peak_bytes']) for row in _read_rows(out_dir / 'memory.csv')}
    records = []
    for arm in arms:
        for regime in REGIMES:
            for seed in range(settings.seeds if arm.depth == 'resnet18' else settings.deep_seeds):
                run_dir = out_dir / 'runs' / arm.key / regime / f'seed{seed}'
                result = train(_run_config(arm, regime, seed, settings, starts, run_dir))
                if arm.kind in ('momentum', 'scratch') and not result['model'].momentum_cfg['memory_efficient']:
                    raise RuntimeError(f'{arm.name} trained without memory_efficient; its numbers would mislead')
                shutil.rmtree(run_dir / 'final', ignore_errors=True)  # the study needs metrics.csv, not the weights
                records.append(_record(arm, regime, seed, run_dir, out_dir, settings, before, memory))
                log(f"{arm.name}, {regime}, seed {seed}: test accuracy {records[-1]['test_acc']:.2f}%")
    study = {
        'about': ACCURACY_NOTE, 'settings': asdict(settings),
        'train_images': {regime: _train_images(settings, regime)[0] for regime in REGIMES},
        'command': 'timm-momentum study ' + ' '.join(
            [f'--out {out}'] + ([f'--seeds {seeds}'] if seeds else []) + (['--quick'] if quick else [])),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, '
                   f'{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end',
        'seconds': time.perf_counter() - started, 'records': records, 'summary': summarize(records),
    }
    atomic_write(out_dir / 'study.json', lambda tmp: Path(tmp).write_text(strict_json(study)))
    atomic_write(out_dir / 'study.md', lambda tmp: Path(tmp).write_text(format_markdown(study)))
    if not plot_study(study, out_dir / 'study.png'):
        log('matplotlib is not installed: study.png skipped')
    return study


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum study`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    if args.seeds is not None and args.seeds < 1:
        print(f'error: --seeds must be >= 1, got {args.seeds}', file=sys.stderr)
        return 2
    study = run_reporting_user_errors(lambda: run_study(args.out, args.seeds, args.quick))
    if study is None:
        return 2
    print(format_markdown(study))
    print(f'wrote study.json, study.md and study.png in {args.out}')
    return 0
