"""``timm-momentum study``: does switching to a Momentum ResNet cost accuracy? Plain against momentum, with seeds.

A task (``--task``: scikit-learn's digits, the default and quick one, or Fashion-MNIST) is split into classes 0-4
and 5-9. One plain ResNet per depth is trained on classes 0-4 (the upstream) and shared by every arm. Each arm
then fine-tunes on classes 5-9 through ``finetune.train``, once with all training images and once with a few per
class, for several seeds: plain, plain checkpointed, momentum at the faithful γ, at γ 0.9 unhealed, at γ 0.9
healed by distillation (fine-tuning's distillation mode) and at γ 0.9 from scratch. Each run writes its own
``metrics.csv``; ``study.json``, ``study.md`` and ``study.png`` are computed from those files (and from
``before.csv`` and ``memory.csv``, written here) only.

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .data import FASHION_MNIST, FASHION_MNIST_CLASSES
from .errors import ConfigError, run_reporting_user_errors
from .files import atomic_write, write_csv

__all__ = ['Task', 'TASKS', 'Arm', 'StudySettings', 'study_settings', 'study_arms', 'run_study', 'read_metrics',
           'summarize', 'compare_to_plain', 'accuracy_note', 'format_markdown', 'plot_study']

UPSTREAM_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]
REGIMES = ('full', 'few-shot')
# One recipe for every arm and the upstream: finetune's default SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
# cosine, no warm-up. The demo's AdamW at lr 2e-3 left the held-out accuracy of 3-epoch runs swinging by up to
# 40 points between seeds (BatchNorm's running statistics trail weights that move that fast).
RECIPE: Dict[str, Any] = dict(in_chans=3, opt='sgd', lr=0.01, momentum=0.9, weight_decay=5e-4, sched='cosine',
                              warmup_epochs=0, progress=False, plots=False, checkpoints=False)
# Healing (the healed arm): fine-tuning's distillation mode, the KL alone to the source (the upstream at gamma 0)
# on the upstream task's training images, before the arm fine-tunes on the target classes. BatchNorm in eval mode
# and AdamW at 1e-4, the converter's healing: on Fashion-MNIST (resnet18, gamma 0.9, 1 epoch of 2000 images) this
# reached 93.1% top-1 agreement with the source; train-mode BatchNorm 88.9%, eval mode at lr 1e-3 77.5%.
HEAL_RECIPE: Dict[str, Any] = dict(distill_weight=1.0, distill_eval_norms=True, opt='adamw', lr=1e-4,
                                   weight_decay=0.0, momentum=0.9)
PAPER_GAMMA_ARM = 0.9


@dataclass(frozen=True)
class Task:
    """A transfer: the upstream trains on classes 0-4 of ``dataset``, every arm fine-tunes on its classes 5-9."""
    name: str  # the --task value
    dataset: str  # finetune's dataset
    title: str
    classes: Tuple[str, ...]  # the class names, 0-9
    test_split: str  # what the held-out split is, for the report

    def named(self, classes: Sequence[int]) -> str:
        """'classes 5–9 (Sandal, ...)' or, for digits, 'digits 5–9'."""
        span = f'{classes[0]}–{classes[-1]}'
        if self.name == 'digits':
            return f'digits {span}'
        return f"classes {span} ({', '.join(self.classes[c] for c in classes)})"


TASKS: Dict[str, Task] = {
    'digits': Task('digits', 'sklearn/digits', 'Digits (scikit-learn)', tuple(str(i) for i in range(10)),
                   'the held-out test split (20% of the digits, stratified)'),
    'fashion-mnist': Task('fashion-mnist', FASHION_MNIST, 'Fashion-MNIST', FASHION_MNIST_CLASSES,
                          'the Fashion-MNIST test split (10000 images, 1000 per class)'),
}


def accuracy_note(task: Task, limit: str = '') -> str:
    """How the reported accuracy is measured (``limit``: which part of the split), and what it is never used for."""
    return (f"test accuracy = the last epoch's accuracy on {task.test_split} of {task.named(TARGET_CLASSES)}{limit}: never "
            f"trained on, never used to choose an epoch or a setting. Best epoch = the epoch with the highest test "
            f"accuracy, shown for information only.")


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning: a depth, plain or momentum, and where the weights start."""
    depth: str  # the plain timm name: resnet18, resnet50
    kind: str  # plain | checkpointed | momentum | healed | scratch
    gamma: Optional[Union[float, str]] = None  # a number, or 'auto' (the faithful policy)

    @property
    def name(self) -> str:
        """A label for tables and plots."""
        gamma = 'faithful γ (auto)' if self.gamma == 'auto' else f'γ={self.gamma}'
        return {'plain': f'{self.depth} plain', 'checkpointed': f'{self.depth} plain, checkpointed',
                'momentum': f'{self.depth} momentum {gamma}', 'healed': f'{self.depth} momentum {gamma}, healed',
                'scratch': f'{self.depth} momentum {gamma}, from scratch'}[self.kind]

    @property
    def key(self) -> str:
        """A folder name."""
        gamma = 'faithful' if self.gamma == 'auto' else f'gamma{self.gamma}'
        return {'plain': f'{self.depth}-plain', 'checkpointed': f'{self.depth}-checkpointed',
                'momentum': f'momentum_{self.depth}-{gamma}', 'healed': f'momentum_{self.depth}-{gamma}-healed',
                'scratch': f'momentum_{self.depth}-{gamma}-scratch'}[self.kind]

    @property
    def model(self) -> str:
        """The timm model the arm trains."""
        return self.depth if self.kind in ('plain', 'checkpointed') else f'momentum_{self.depth}'

    @property
    def memory_mode(self) -> str:
        """The mode of ``memory.peak_step_memory`` that trains as this arm does."""
        return {'plain': 'plain', 'checkpointed': 'checkpoint'}.get(self.kind, 'memory_efficient')

    @property
    def start(self) -> Optional[str]:
        """The key of the weights the arm starts from (``before.csv``), None from scratch."""
        return {'plain': self.depth, 'checkpointed': self.depth, 'momentum': self.key,
                'healed': self.key}.get(self.kind)


@dataclass(frozen=True)
class StudySettings:
    """What a study runs: task, resolution, batches, epochs, seeds and depths."""
    task: str
    img_size: int
    batch_size: int  # full regime; also the batch of the peak-memory measure
    few_shot_per_class: int
    few_shot_batch_size: int
    epochs_upstream: int
    epochs_full: int
    epochs_few_shot: int
    epochs_heal: int
    seeds: int  # resnet18 arms
    deep_seeds: int  # arms of deeper models
    depths: Tuple[str, ...]
    train_limit: Optional[int] = None  # the first N training images of each task (None: all of them)
    val_limit: Optional[int] = None  # the first N test images of each task's classes (None: all of them)


def study_settings(seeds: Optional[int] = None, quick: bool = False, task: str = 'digits',
                   train_limit: Optional[int] = None, val_limit: Optional[int] = None) -> StudySettings:
    """The study of ``task`` (3 seeds for every arm, resnet18 and resnet50, 32x32), or with ``quick`` a tiny one
    (1 seed, resnet18, 16x16, 1 epoch; on Fashion-MNIST 320 training and 200 test images)."""
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f'seeds must be an integer >= 1, got {seeds!r}')
    if task not in TASKS:
        raise ConfigError(f'task must be one of {sorted(TASKS)}, got {task!r}')
    for name, value in (('train_limit', train_limit), ('val_limit', val_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'{name} must be an integer >= 1, got {value!r}')
    if quick:
        fashion = task == 'fashion-mnist'
        return StudySettings(task=task, img_size=16, batch_size=64, few_shot_per_class=5, few_shot_batch_size=5,
                             epochs_upstream=1, epochs_full=1, epochs_few_shot=1, epochs_heal=1, seeds=seeds or 1,
                             deep_seeds=seeds or 1, depths=('resnet18',),
                             train_limit=train_limit or (320 if fashion else None),
                             val_limit=val_limit or (200 if fashion else None))
    if task == 'fashion-mnist':
        return StudySettings(task=task, img_size=32, batch_size=64, few_shot_per_class=10, few_shot_batch_size=10,
                             epochs_upstream=4, epochs_full=3, epochs_few_shot=6, epochs_heal=1, seeds=seeds or 3,
                             deep_seeds=seeds or 3, depths=('resnet18', 'resnet50'), train_limit=train_limit,
                             val_limit=val_limit)
    return StudySettings(task=task, img_size=32, batch_size=32, few_shot_per_class=10, few_shot_batch_size=10,
                         epochs_upstream=3, epochs_full=3, epochs_few_shot=8, epochs_heal=2, seeds=seeds or 3,
                         deep_seeds=seeds or 3, depths=('resnet18', 'resnet50'), train_limit=train_limit,
                         val_limit=val_limit)


def study_arms(depths: Sequence[str], task: str = 'digits') -> List[Arm]:
    """For every depth: plain, plain checkpointed, momentum at the faithful γ, at γ 0.9 unhealed, at γ 0.9 healed by
    distillation, and at γ 0.9 from scratch; on digits, resnet18 also at γ 0.5 and 0.99."""
    arms = []
    for depth in depths:
        extra = (0.5, PAPER_GAMMA_ARM, 0.99) if depth == 'resnet18' and task == 'digits' else (PAPER_GAMMA_ARM,)
        arms += [Arm(depth, 'plain'), Arm(depth, 'checkpointed'), Arm(depth, 'momentum', 'auto'),
                 *(Arm(depth, 'momentum', g) for g in extra), Arm(depth, 'healed', PAPER_GAMMA_ARM),
                 Arm(depth, 'scratch', PAPER_GAMMA_ARM)]
    return arms


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The rows of a ``metrics.csv`` that ``finetune.train`` wrote, as numbers."""
    return [{k: float(v) for k, v in row.items()} for row in _read_rows(path)]


def _read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _test_set(settings: StudySettings, classes: Sequence[int]) -> Any:
    """The held-out split of ``classes`` of the study's task, as every run validates on it."""
    from .data import DigitsDataset, FashionMNIST

    if settings.task == 'digits':
        return DigitsDataset('validation', classes, settings.img_size, limit=settings.val_limit)
    return FashionMNIST('validation', None, classes, settings.img_size, limit=settings.val_limit)


def _upstream_logits(model: nn.Module, test: Any) -> torch.Tensor:
    """``model``'s eval-mode logits on every image of ``test``."""
    loader = torch.utils.data.DataLoader(test, batch_size=256)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x.to(device)).float().cpu() for x, _ in loader])


def _before_row(start: str, logits: torch.Tensor, test: Any, source: Optional[torch.Tensor]) -> Dict[str, Any]:
    """A ``before.csv`` row: accuracy on the upstream task and, for a momentum start, top-1 agreement with the
    source (the upstream itself), both in %."""
    row = {'start': start, 'accuracy': 100.0 * int((logits.argmax(-1) == test.targets).sum()) / len(test)}
    row['agreement_with_source'] = None if source is None else \
        100.0 * int((logits.argmax(-1) == source.argmax(-1)).sum()) / len(test)
    return row


def _train_images(settings: StudySettings, regime: str) -> Tuple[int, int]:
    """(training images, images trained on per epoch) of a classes 5-9 run: the loader drops a last short batch."""
    from .data import DigitsDataset, FashionMNIST

    per_class = settings.few_shot_per_class if regime == 'few-shot' else None
    if settings.task == 'digits':
        count = len(DigitsDataset('train', TARGET_CLASSES, 8, 1, per_class, limit=settings.train_limit))
    else:
        count = len(FashionMNIST('train', None, TARGET_CLASSES, 8, 1, settings.train_limit, per_class))
    batch = settings.few_shot_batch_size if regime == 'few-shot' else settings.batch_size
    return count, count - count % batch if count > batch else count


def _device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _task_config(settings: StudySettings, **overrides: Any) -> Dict[str, Any]:
    """A ``finetune.train`` config on the study's task: the recipe, its data limits, then ``overrides``."""
    from .finetune import DEFAULTS

    cfg = dict(DEFAULTS, **RECIPE, dataset=TASKS[settings.task].dataset, img_size=settings.img_size,
               train_limit=settings.train_limit, val_limit=settings.val_limit)
    cfg.update(overrides)
    return cfg


def _prepare_starts(out: Path, settings: StudySettings, arms: List[Arm], log: Callable[[str], None]) -> Dict[str, Any]:
    """Train each depth's upstream on classes 0-4, convert it for each γ, heal the healed arms' starts, and write
    ``before.csv``."""
    from safetensors.torch import save_file

    from .finetune import train

    task = TASKS[settings.task]
    test = _test_set(settings, UPSTREAM_CLASSES)
    starts: Dict[str, Any] = {}
    before_rows = []
    for depth in settings.depths:
        folder = out / 'upstream' / depth
        log(f'upstream: {depth} on {task.named(UPSTREAM_CLASSES)}, {settings.epochs_upstream} epochs')
        upstream = train(_task_config(settings, model=depth, classes=UPSTREAM_CLASSES, batch_size=settings.batch_size,
                                      epochs=settings.epochs_upstream, seed=0, output=str(folder)))
        checkpoint = folder / f'{depth}_{task.name}0-4.safetensors'
        state = {k: v.detach().cpu().contiguous() for k, v in upstream['model'].state_dict().items()}
        atomic_write(checkpoint, lambda tmp: save_file(state, tmp))
        shutil.rmtree(folder / 'final', ignore_errors=True)  # the safetensors file is the upstream the arms load
        starts[depth] = checkpoint
        source = _upstream_logits(upstream['model'], test)
        before_rows.append(_before_row(depth, source, test, None))
        for arm in arms:
            if arm.depth == depth and arm.kind in ('momentum', 'healed'):
                starts[arm.key] = _momentum_start(out, arm, checkpoint, settings, log)
                model = _load_folder(starts[arm.key])
                before_rows.append(_before_row(arm.key, _upstream_logits(model, test), test, source))
    write_csv(out / 'before.csv', before_rows)
    return starts


def _load_folder(folder: Path) -> nn.Module:
    import timm

    return timm.create_model(f'local-dir:{folder}', pretrained=True)


def _momentum_start(out: Path, arm: Arm, checkpoint: Path, settings: StudySettings,
                    log: Callable[[str], None]) -> Path:
    """The folder a momentum arm starts from: the upstream converted at the arm's γ and, for the healed arm, then
    healed by fine-tuning's distillation mode (the KL alone to the source) on the upstream task's training images."""
    from .convert import convert
    from .finetune import train

    converted = out / 'start' / Arm(arm.depth, 'momentum', arm.gamma).key
    if not converted.is_dir():
        convert(str(checkpoint), converted, gamma=arm.gamma, force=True, img_size=settings.img_size)
    if arm.kind == 'momentum':
        return converted
    healed = out / 'heal' / arm.key
    log(f'heal: {arm.name}, distilling the source on {TASKS[settings.task].named(UPSTREAM_CLASSES)}, '
        f'{settings.epochs_heal} epoch(s)')
    train(_task_config(settings, **HEAL_RECIPE, model=f'local-dir:{converted}', pretrained=True,
                       classes=UPSTREAM_CLASSES, batch_size=settings.batch_size, epochs=settings.epochs_heal, seed=0,
                       output=str(healed)))
    return healed / 'final'


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
    cfg = _task_config(settings, classes=TARGET_CLASSES, num_classes=len(TARGET_CLASSES), seed=seed,
                       output=str(output), gamma=arm.gamma, memory_efficient=True,
                       epochs=settings.epochs_few_shot if regime == 'few-shot' else settings.epochs_full,
                       batch_size=settings.few_shot_batch_size if regime == 'few-shot' else settings.batch_size,
                       train_per_class=settings.few_shot_per_class if regime == 'few-shot' else None)
    if arm.kind in ('plain', 'checkpointed'):
        cfg.update(model=arm.depth, initial_checkpoint=str(starts[arm.depth]), grad_checkpointing=arm.kind == 'checkpointed',
                   gamma=None)
    elif arm.kind in ('momentum', 'healed'):  # the folder records the γ it was converted (and healed) at
        cfg.update(model=f'local-dir:{starts[arm.key]}', pretrained=True, gamma=None)
    else:
        cfg.update(model=arm.model)
    return cfg


def _record(arm: Arm, regime: str, seed: int, run_dir: Path, out: Path, settings: StudySettings,
            before: Dict[str, float], memory: Dict[Tuple[str, str], float], gamma: Any) -> Dict[str, Any]:
    """One run's record, read back from the ``metrics.csv`` it wrote; ``gamma`` is what it trained at."""
    rows = read_metrics(run_dir / 'metrics.csv')
    accuracies = [row['val_acc'] for row in rows]
    count, seen = _train_images(settings, regime)
    return {
        'arm': arm.name, 'arm_key': arm.key, 'model': arm.model, 'depth': arm.depth, 'kind': arm.kind,
        'gamma': arm.gamma, 'gamma_per_stage': gamma, 'regime': regime, 'seed': seed, 'train_images': count,
        'epochs': len(rows), 'test_acc': accuracies[-1],
        'best_epoch': int(rows[accuracies.index(max(accuracies))]['epoch']),
        'best_test_acc': max(accuracies), 'acc_before': before.get(arm.start),
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


def compare_to_plain(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each arm against the plain arm of its depth and regime, paired by seed (a seed fixes the data order and the
    few-shot draw for every arm): the mean and std of the per-seed differences in test accuracy, and the two-sided
    p-value of a paired t-test (None with fewer than 2 pairs, when the differences do not vary, or without scipy).
    'significant' is p < 0.05; with 3 seeds only large, consistent differences reach it."""
    by_run = {(r['arm_key'], r['regime'], r['seed']): r for r in records}
    out = []
    for (key, regime) in dict.fromkeys((r['arm_key'], r['regime']) for r in records):
        group = [r for r in records if (r['arm_key'], r['regime']) == (key, regime)]
        first = group[0]
        if first['kind'] == 'plain':
            continue
        pairs = [(r['test_acc'], by_run[(f"{first['depth']}-plain", regime, r['seed'])]['test_acc']) for r in group
                 if (f"{first['depth']}-plain", regime, r['seed']) in by_run]
        if not pairs:
            continue
        differences = [a - b for a, b in pairs]
        std = statistics.stdev(differences) if len(differences) > 1 else None
        p_value = _paired_p_value(differences)
        out.append({'arm': first['arm'], 'arm_key': key, 'regime': regime, 'pairs': len(pairs),
                    'difference_mean': statistics.fmean(differences), 'difference_std': std, 'p_value': p_value,
                    'significant': p_value is not None and p_value < 0.05})
    return out


def _paired_p_value(differences: List[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test that the mean difference is 0."""
    if len(differences) < 2:
        return None
    std = statistics.stdev(differences)
    mean = statistics.fmean(differences)
    if std == 0:
        return None if mean == 0 else 0.0
    try:
        from scipy import stats
    except ImportError:
        return None
    t = mean / (std / len(differences) ** 0.5)
    return float(2 * stats.t.sf(abs(t), len(differences) - 1))


def _number(value: Optional[float], fmt: str, suffix: str = '') -> str:
    return '–' if value is None else f'{value:{fmt}}{suffix}'


def format_markdown(study: Dict[str, Any]) -> str:
    """``study.md``: the settings, a table of mean ± std per arm and regime with ratios against plain, and each
    arm's paired difference from plain with its significance."""
    s = study['settings']
    task = TASKS[s['task']]
    limit = (f", the first {s['train_limit']} training images of each task's classes" if s['train_limit'] else '')
    test_limit = f", its first {s['val_limit']} images" if s['val_limit'] else ''
    lines = [
        f"# Does switching to a Momentum ResNet cost accuracy? {task.title}", '',
        f"Transfer on {task.title}: an upstream plain ResNet per depth trained on {task.named(UPSTREAM_CLASSES)} "
        f"({s['epochs_upstream']} epochs), shared by every arm; each arm fine-tuned on {task.named(TARGET_CLASSES)} at "
        f"{s['img_size']}×{s['img_size']}{limit}, SGD lr 0.01 (momentum 0.9, weight decay 5e-4), cosine, no warm-up. "
        f"Regimes: full ({study['train_images']['full']} training images, batch {s['batch_size']}, "
        f"{s['epochs_full']} epochs) and few-shot ({s['few_shot_per_class']} per class = "
        f"{study['train_images']['few-shot']} images drawn by seed, batch {s['few_shot_batch_size']}, "
        f"{s['epochs_few_shot']} epochs). Seeds: {s['seeds']} (resnet18), {s['deep_seeds']} (deeper); seed k of "
        f"every arm sees the same data order and few-shot draw.", '',
        f"- {accuracy_note(task, test_limit)}",
        f"- arms: plain; plain with timm's gradient checkpointing; momentum at the faithful γ (policy 'auto', per "
        f"stage as listed in study.json), at γ {PAPER_GAMMA_ARM} as converted (unhealed), at γ {PAPER_GAMMA_ARM} "
        f"healed (fine-tuning's distillation mode: the KL alone to the source, the upstream at γ 0, for "
        f"{s['epochs_heal']} epoch(s) on the unlabeled training images of {task.named(UPSTREAM_CLASSES)}, AdamW lr "
        f"1e-4, BatchNorm in eval mode; its run is under heal/), and at γ {PAPER_GAMMA_ARM} from scratch. Momentum arms train in "
        f"memory-efficient mode.",
        f"- before FT = accuracy of the starting weights on the upstream task ({task.named(UPSTREAM_CLASSES)}, "
        f"test split): the upstream for plain arms, the converted (or healed) model for momentum arms; none from "
        f"scratch. agree = top-1 agreement of a momentum start with the upstream there (before.csv).",
        f"- peak step = peak memory of one training step at batch {s['batch_size']} above the model (fresh "
        'subprocess, after a warm-up; `memory.peak_step_memory`, the bench\'s measure), once per model and mode: γ '
        'changes no tensor size, so the memory-efficient momentum arms of a depth share one measurement.',
        '- s/epoch = training time per epoch (evaluation excluded), from `images_per_s` in metrics.csv. Ratios are '
        'against the plain arm of the same depth in this run.', '',
        '| arm | regime | seeds | test acc. % (mean ± std) | best epochs | before FT % | agree % | peak step MiB '
        '| × plain | s/epoch | × plain |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    agreement = {row['start']: row.get('agreement_with_source') for row in study.get('before', [])}
    for row in study['summary']:
        std = '' if row['test_acc_std'] is None else f" ± {row['test_acc_std']:.2f}"
        lines.append(
            f"| {row['arm']} | {row['regime']} | {row['seeds']} | {row['test_acc_mean']:.2f}{std} | "
            f"{', '.join(str(e) for e in row['best_epochs'])} | {_number(row['acc_before'], '.2f')} | "
            f"{_number(agreement.get(row['arm_key']), '.1f')} | "
            f"{row['peak_step_mib']:.0f} | {_number(row['peak_ratio_vs_plain'], '.2f', '×')} | "
            f"{row['seconds_per_epoch']:.2f} | {_number(row['time_ratio_vs_plain'], '.2f', '×')} |")
    lines += ['', '## Against plain, paired by seed', '',
              'Difference in test accuracy from the plain arm of the same depth and regime (points; mean ± std over '
              'seeds of the per-seed differences), and the two-sided p-value of a paired t-test. Significant: '
              'p < 0.05. With 3 seeds a test has little power: "not significant" means no difference this study can '
              'tell apart from seed noise, not that there is none.', '',
              '| arm | regime | pairs | Δ vs plain (points) | p | significant |', '|---|---|---|---|---|---|']
    for row in study['comparisons']:
        std = '' if row['difference_std'] is None else f" ± {row['difference_std']:.2f}"
        lines.append(f"| {row['arm']} | {row['regime']} | {row['pairs']} | {row['difference_mean']:+.2f}{std} | "
                     f"{_number(row['p_value'], '.3f')} | {'yes' if row['significant'] else 'no'} |")
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
    task = TASKS[study['settings']['task']]
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(12, 4.8), sharex=True)
    markers = {'plain': 'o', 'checkpointed': 's', 'momentum': 'D', 'healed': 'P', 'scratch': 'x'}
    for ax, regime in zip(axes, REGIMES):
        for i, row in enumerate(r for r in study['summary'] if r['regime'] == regime):
            ax.errorbar(row['peak_step_mib'], row['test_acc_mean'], yerr=row['test_acc_std'] or 0, capsize=4,
                        marker=markers[row['kind']], color=plt.cm.tab20(i % 20), linestyle='none', label=row['arm'])
        ax.set(xlabel='peak step memory (MiB)', ylabel='test accuracy (%), last epoch', title=f'{regime}')
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f'{task.title}: {task.named(TARGET_CLASSES)} after fine-tuning from a '
                 f'{task.named(UPSTREAM_CLASSES).split(" (")[0]} upstream: accuracy vs peak step memory '
                 f'(error bars: std over seeds)', fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)
    return True


def run_study(out: str = 'output/study', seeds: Optional[int] = None, quick: bool = False,
              log: Callable[[str], None] = print, task: str = 'digits',
              train_limit: Optional[int] = None, val_limit: Optional[int] = None) -> Dict[str, Any]:
    """Run every arm, regime and seed of ``task``; write study.json, study.md and (with matplotlib) study.png into
    ``out``."""
    import platform

    from .convert import strict_json
    from .finetune import train

    settings = study_settings(seeds, quick, task, train_limit, val_limit)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f'--out {out_dir} exists and is not a folder')
    if out_dir.is_dir() and any(out_dir.iterdir()):  # each arm writes a new run; finetune refuses to overwrite one
        raise ConfigError(f'--out {out_dir} is not empty: it holds an earlier study, which this one would '
                          f'overwrite; choose another --out, or remove it first')
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    arms = study_arms(settings.depths, settings.task)
    starts = _prepare_starts(out_dir, settings, arms, log)
    _measure_memory(out_dir, settings, arms, log)
    before_rows = _read_rows(out_dir / 'before.csv')
    before = {row['start']: float(row['accuracy']) for row in before_rows}
    memory = {(row['model'], row['mode']): float(row['peak_bytes']) for row in _read_rows(out_dir / 'memory.csv')}
    records = []
    for arm in arms:
        for regime in REGIMES:
            for seed in range(settings.seeds if arm.depth == 'resnet18' else settings.deep_seeds):
                run_dir = out_dir / 'runs' / arm.key / regime / f'seed{seed}'
                result = train(_run_config(arm, regime, seed, settings, starts, run_dir))
                if arm.model != arm.depth and not result['model'].momentum_cfg['memory_efficient']:
                    raise RuntimeError(f'{arm.name} trained without memory_efficient; its numbers would mislead')
                shutil.rmtree(run_dir / 'final', ignore_errors=True)  # the study needs metrics.csv, not the weights
                records.append(_record(arm, regime, seed, run_dir, out_dir, settings, before, memory,
                                       result['cfg']['gamma']))
                log(f"{arm.name}, {regime}, seed {seed}: test accuracy {records[-1]['test_acc']:.2f}%")
    options = ([f'--task {task}'] if task != 'digits' else []) + [f'--out {out}'] + \
        ([f'--seeds {seeds}'] if seeds else []) + ([f'--train-limit {train_limit}'] if train_limit else []) + \
        ([f'--val-limit {val_limit}'] if val_limit else []) + \
        (['--quick'] if quick else [])
    study = {
        'about': accuracy_note(TASKS[settings.task]), 'settings': asdict(settings),
        'train_images': {regime: _train_images(settings, regime)[0] for regime in REGIMES},
        'command': 'timm-momentum study ' + ' '.join(options),
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, '
                   f'{torch.get_num_threads()} threads, load average {load_at_start:.1f} at the start and '
                   f'{os.getloadavg()[0]:.1f} at the end',
        'seconds': time.perf_counter() - started, 'before': [
            {'start': row['start'], 'accuracy': float(row['accuracy']),
             'agreement_with_source': float(row['agreement_with_source']) if row['agreement_with_source'] else None}
            for row in before_rows],
        'records': records, 'summary': summarize(records), 'comparisons': compare_to_plain(records),
    }
    atomic_write(out_dir / 'study.json', lambda tmp: Path(tmp).write_text(strict_json(study)))
    atomic_write(out_dir / 'study.md', lambda tmp: Path(tmp).write_text(format_markdown(study)))
    if not plot_study(study, out_dir / 'study.png'):
        log('matplotlib is not installed: study.png skipped')
    return study


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum study`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    for name in ('seeds', 'train_limit', 'val_limit'):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    study = run_reporting_user_errors(lambda: run_study(args.out, args.seeds, args.quick,
                                                        task=getattr(args, 'task', 'digits'),
                                                        train_limit=getattr(args, 'train_limit', None),
                                                        val_limit=getattr(args, 'val_limit', None)))
    if study is None:
        return 2
    print(format_markdown(study))
    print(f'wrote study.json, study.md and study.png in {args.out}')
    return 0
