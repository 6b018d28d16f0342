"""Fine-tune Momentum ResNets on image classification: GPU first, runs on CPU, scales out with torchrun.

``timm-momentum finetune --config configs/NAME.yaml [--key value ...]``, ``python -m timm_momentum.tools.finetune``
or ``torchrun --nproc_per_node=N -m timm_momentum.tools.finetune ...``. Config keys follow timm's train.py names.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import hashlib
import io
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from .. import __version__
from .convert import write_model_folder
from .data import FASHION_MNIST, build_datasets, build_loader, data_config_of, label_names
from .errors import ConfigError, first_line, load_failure, run_reporting_user_errors
from .files import FolderInUseError, atomic_write, file_in_the_way, folder_lock, remove_folders, write_csv
from .loading import folder_architecture
from .loop import Distillation, Teacher, evaluate, train_one_epoch, validate
from .loop import is_distributed as _is_distributed
from .loop import rank as _rank
from .memory import vm_hwm_bytes
from ..core.models import vit_family
from ..core.models.momentum_model import RECORD_KEYS, MomentumModel, parse_gamma, source_state_dict

__all__ = ['DEFAULTS', 'RESUME_FIXED', 'load_config', 'validate_config', 'describe_config', 'describe_result',
           'load_initial_checkpoint', 'load_resume_state', 'resume_run', 'compare_resume_config', 'checkpoint_checksum',
           'check_output', 'train', 'find_batch_size']

DEFAULTS: Dict[str, Any] = {
    # model (timm train.py names, plus gamma and memory_efficient)
    'model': 'momentum_resnet50', 'pretrained': False, 'initial_checkpoint': None, 'num_classes': None,
    # gamma: a number, one per stage, or 'auto' (the faithful policy); None keeps the model's own (a folder's
    # recorded values, 'auto' for a pretrained drop-in model, 0.9 from scratch)
    'in_chans': 3, 'img_size': None, 'gamma': None, 'memory_efficient': True, 'drop_path': 0.0, 'drop': 0.0,
    'grad_checkpointing': False,  # timm's set_grad_checkpointing(): recompute each block in backward
    # data
    'dataset': 'sklearn/digits', 'data_dir': None, 'train_split': 'train', 'val_split': 'validation',
    'classes': None, 'download': False, 'workers': 2, 'pin_mem': True, 'hflip': 0.5, 'scale': None,
    'crop_padding': None,  # the CIFAR recipe: random crop of img_size with this padding, then hflip
    'train_per_class': None,  # few-shot: this many training images per class, drawn by seed
    # the first N images of the training / validation split, after the class subset (smoke runs)
    'train_limit': None, 'val_limit': None,  # (train_per_class, train_limit, val_limit: digits and Fashion-MNIST)
    # optimisation
    'batch_size': 64, 'grad_accum_steps': 1, 'epochs': 10, 'opt': 'sgd', 'lr': 0.01, 'momentum': 0.9,
    'weight_decay': 5e-4, 'sched': 'cosine', 'warmup_epochs': 0, 'min_lr': 0.0,
    'decay_milestones': [90, 180, 270], 'decay_rate': 0.1, 'smoothing': 0.0, 'mixup': 0.0, 'cutmix': 0.0,
    'model_ema': False, 'model_ema_decay': 0.999, 'clip_grad': None,
    # distillation (healing): the loss is (1 - distill_weight) * label loss + distill_weight * KL to a teacher's
    # logits. distill_weight 0: no teacher; 1: the KL alone, the labels unused (unlabeled image folders work).
    # distill_from: the teacher; None is the run's starting weights at gamma 0 (for a converted model, its source
    # ResNet), else a timm name, a checkpoint file of the model's architecture, or a local-dir:/hf-hub: folder.
    # distill_eval_norms: the student's BatchNorm layers stay in eval mode (keep their statistics) while it trains.
    'distill_weight': 0.0, 'distill_from': None, 'distill_temperature': 1.0, 'distill_eval_norms': False,
    # hardware
    'device': 'auto', 'amp': 'auto', 'channels_last': False, 'compile': False, 'cudnn_benchmark': True,
    # run
    'seed': 42, 'output': None,  # None: a new folder for each run, output/finetune/<YYYYmmdd-HHMMSS>-<model>
    'resume': False, 'log_interval': 10, 'progress': True,
    'plots': True,  # loss/accuracy plots, redrawn every epoch
    'checkpoints': True,  # last.pth.tar and best/ every epoch; without them only metrics.csv and final/ are written
}


_MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; this bounds what a wrong path can make us read


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases. A config never needs ``*name``, and aliases nested in aliases expand
    exponentially: a 569-byte file ran 73 s and took 3.6 GB before a MemoryError."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f'aliases (*{_clipped(event.anchor, 40, quote=False)}) are not allowed '
                                              f'in configs; write the value out', event.start_mark)
        return super().compose_node(parent, index)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (no aliases), else a ConfigError saying where, in a few hundred characters."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        reason = ' '.join(str(e).split()).replace('in "<unicode string>", ', 'at ')
        raise ConfigError(f'{where} is not valid YAML: {_clipped(reason, 300, quote=False)}') from None


def _clipped(value: Any, limit: int = 80, quote: bool = True) -> str:
    """``repr(value)`` (or ``str`` without ``quote``), cut to ``limit`` characters: error messages stay short."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """DEFAULTS, updated by a YAML file and then by ``--key value`` overrides (values parsed as YAML), checked."""
    config = dict(DEFAULTS)
    if path:
        if not Path(path).is_file():
            raise ConfigError(f'config file {path} does not exist')
        if Path(path).stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f'{path} is {Path(path).stat().st_size} bytes, too large for a config '
                              f'(at most {_MAX_CONFIG_BYTES})')
        try:
            text = Path(path).read_bytes().decode('utf-8')
        except UnicodeDecodeError as e:
            raise ConfigError(f'{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); '
                              f'save it as UTF-8') from None
        loaded = _parse_yaml(text, path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f'{path}: a config is a mapping of keys to values')
        _update(config, loaded, path)
    pairs = list(overrides)
    updates = {}
    while pairs:
        key = pairs.pop(0)
        if not key.startswith('--') or len(key) == 2:
            raise ConfigError(f'expected --key value, got {_clipped(key)}')
        key = key[2:].replace('-', '_')
        if not pairs or pairs[0].startswith('--'):
            updates[key] = True
        else:
            text = pairs.pop(0)
            if not text.strip():  # --dataset '': the empty string (timm's folder dataset), not YAML's null
                updates[key] = text
                continue
            try:
                updates[key] = yaml.load(text, Loader=_ConfigLoader)
            except yaml.YAMLError as e:
                reason = f' ({e.problem})' if getattr(e, 'problem', None) and 'alias' in e.problem else ''
                raise ConfigError(f'--{key}: cannot parse {_clipped(text)} as a YAML value{reason}') from None
    _update(config, updates, 'command line')
    return validate_config(config)


def _update(config: Dict[str, Any], updates: Dict[str, Any], where: str) -> None:
    for key, value in updates.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key)[:100], DEFAULTS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise ConfigError(f"unknown config key '{_clipped(key, 60, quote=False)}' in {where}{hint}")
        config[key] = value


# Keys whose default (None, or one of two forms) does not tell their type; every other key takes its default's.
_OPTIONAL_TYPES: Dict[str, type] = {
    'initial_checkpoint': str, 'num_classes': int, 'img_size': int, 'data_dir': str, 'classes': list,
    'scale': list, 'crop_padding': int, 'clip_grad': float, 'batch_size': int, 'train_per_class': int, 'output': str,
    'train_limit': int, 'val_limit': int,
    'distill_from': str,
}
# Inclusive bounds of numeric keys.
_RANGES: Dict[str, Tuple[float, float]] = {
    'num_classes': (1, math.inf), 'in_chans': (1, math.inf), 'img_size': (1, math.inf), 'workers': (0, math.inf),
    'crop_padding': (0, math.inf), 'batch_size': (1, math.inf), 'grad_accum_steps': (1, math.inf),
    'epochs': (1, math.inf), 'lr': (0, math.inf), 'momentum': (0, math.inf), 'weight_decay': (0, math.inf),
    'warmup_epochs': (0, math.inf), 'min_lr': (0, math.inf), 'decay_rate': (0, math.inf), 'log_interval': (1, math.inf),
    'drop_path': (0, 1), 'drop': (0, 1), 'hflip': (0, 1), 'smoothing': (0, 1), 'mixup': (0, math.inf),
    'cutmix': (0, math.inf), 'model_ema_decay': (0, 1), 'clip_grad': (0, math.inf), 'train_per_class': (1, math.inf),
    'train_limit': (1, math.inf), 'val_limit': (1, math.inf),
    'distill_weight': (0, 1), 'distill_temperature': (0, math.inf),
    'seed': (0, 2 ** 32 - 1),  # numpy's seed range; torch's overflowed past 2^63 (and seed * 1000 + epoch sooner)
}
_AMP = ('auto', 'bf16', 'fp16', 'none')


def _as_type(key: str, value: Any, kind: type) -> Any:
    """VALUE as KIND where that is unambiguous ('1e-3' -> 0.001, 3.0 -> 3), else a ConfigError naming KEY."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f'{key} must be true or false, got {_clipped(value)}')
    if kind in (int, float) and not isinstance(value, bool):
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and math.isfinite(number):
            if kind is float:
                return float(number)
            if float(number).is_integer():
                return int(number)
        noun = 'an integer' if kind is int else 'a number'
        raise ConfigError(f'{key} must be {noun}, got {_clipped(value)}')
    if kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f'{key} must be a string, got {_clipped(value)}')
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f'{key} must be a {kind.__name__}, got {_clipped(value)}')


def validate_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A checked copy of ``cfg``: every key has the type of its default and a usable value, else ConfigError."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f'unknown config key(s) {unknown}')
    out = {key: _checked_value(key, cfg.get(key, default), default) for key, default in DEFAULTS.items()}
    for key in ('model', 'opt', 'sched', 'device', 'train_split', 'val_split'):
        if not out[key]:
            raise ConfigError(f'{key} must not be empty')
    try:
        out['gamma'] = None if cfg.get('gamma') is None else parse_gamma(cfg['gamma'])
    except ValueError as e:
        raise ConfigError(f'gamma: {e}') from None
    _check_lists(out, cfg)
    _check_names(out)
    _check_device(out['device'])
    if out['initial_checkpoint'] and not Path(out['initial_checkpoint']).is_file():
        raise ConfigError(f"initial_checkpoint: {out['initial_checkpoint']} is not a file")
    _check_distillation(out)
    if out['resume'] and not out['checkpoints']:
        raise ConfigError('resume needs checkpoints: true (without them there is no last.pth.tar to resume from)')
    out['output'] = _output_folder(out)
    return out


def _check_distillation(out: Dict[str, Any]) -> None:
    """The distillation keys must describe one teacher that is used."""
    if out['distill_temperature'] == 0:
        raise ConfigError('distill_temperature must be > 0, got 0')
    if out['distill_from'] is not None and out['distill_weight'] == 0:
        raise ConfigError(f"distill_from names a teacher ({_clipped(out['distill_from'])}), but distill_weight is 0, "
                          f"so it would not be used: set distill_weight (1 for the KL alone, 0.5 for half of each)")
    if out['distill_from'] is not None and not out['distill_from'].strip():
        raise ConfigError('distill_from must not be empty (leave it out for the starting weights at gamma 0)')


def _checked_value(key: str, value: Any, default: Any) -> Any:
    """``value`` of config ``key`` as its default's type and within its range, else a ConfigError naming the key."""
    if (key == 'batch_size' and value == 'auto') or key == 'gamma':  # gamma: checked by parse_gamma
        return value
    if key == 'amp':
        return _checked_amp(value)
    kind = _OPTIONAL_TYPES.get(key, type(default))
    checked = None if value is None and default is None else _as_type(key, value, kind)
    low, high = _RANGES.get(key, (-math.inf, math.inf))
    if isinstance(checked, (int, float)) and not isinstance(checked, bool) and not low <= checked <= high:
        bounds = f'>= {low}' if high == math.inf else f'in [{low}, {high}]'
        raise ConfigError(f'{key} must be {bounds}, got {_clipped(value)}')
    return checked


def _checked_amp(value: Any) -> str:
    """The ``amp`` setting as one of _AMP (true is bf16; false, null and fp32 are none), else a ConfigError."""
    amp = 'bf16' if value is True else 'none' if value is False or value is None or value == 'fp32' else value
    if not isinstance(amp, str) or amp not in _AMP:
        raise ConfigError(f'amp must be one of {list(_AMP)}, got {_clipped(value)}')
    return amp


def _check_lists(out: Dict[str, Any], given: Dict[str, Any]) -> None:
    """Check, in place, the list-valued keys (classes, decay_milestones, scale) and the few-shot setting; messages
    quote the ``given`` config."""
    for key in ('classes', 'decay_milestones'):
        if out[key] is not None:
            out[key] = [_as_type(f'{key} entry', v, int) for v in out[key]]
    if out['scale'] is not None:
        out['scale'] = [_as_type('scale entry', v, float) for v in out['scale']]
        if len(out['scale']) != 2 or not 0 < out['scale'][0] <= out['scale'][1] <= 1:
            raise ConfigError(f"scale must be [min, max] with 0 < min <= max <= 1, got {_clipped(given['scale'])}")
    classes = out['classes']
    if out['dataset'] in ('sklearn/digits', FASHION_MNIST) and classes is not None:
        if len(set(classes)) != len(classes) or not set(classes) <= set(range(10)) or len(classes) < 2:
            raise ConfigError(f"classes must be two or more different class indices 0-9, "
                              f"got {_clipped(given['classes'])}")
    for key in ('train_per_class', 'train_limit', 'val_limit'):
        if out[key] is not None and out['dataset'] not in ('sklearn/digits', FASHION_MNIST):
            raise ConfigError(f"{key} is supported for sklearn/digits and {FASHION_MNIST} only, not "
                              f"{_clipped(out['dataset'])}")


# The names timm.scheduler.create_scheduler_v2 builds a scheduler for ('none' builds none, and each epoch steps one).
_SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt')


def _check_names(out: Dict[str, Any]) -> None:
    """Check that timm knows the model, optimizer and scheduler names, suggesting the closest on a typo."""
    import timm
    from timm.optim import list_optimizers

    def unknown(key: str, what: str, name: str, known: Sequence[str]) -> ConfigError:
        close = difflib.get_close_matches(name[:100], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        return ConfigError(f"{key}: unknown {what} {_clipped(out[key])}{hint}")

    if ':' not in out['model'] and not timm.is_model(out['model'].split('.')[0]):
        raise unknown('model', 'model', out['model'], timm.list_models())
    optimizers = list_optimizers()
    if out['opt'].lower().split('_')[-1] not in optimizers:
        raise unknown('opt', 'optimizer', out['opt'].lower(), optimizers)
    if out['sched'] not in _SCHEDULERS:
        raise unknown('sched', 'scheduler', out['sched'], _SCHEDULERS)


def _check_local_model(model: str) -> None:
    """A ``local-dir:`` model must name a folder whose config.json names a model timm knows (timm raised
    FileNotFoundError or 'Unknown model'). Checked when a run starts, not when its config loads: a config may
    name the folder an earlier step is to write."""
    if not model.startswith('local-dir:'):
        return
    try:
        folder_architecture(model[len('local-dir:'):], _clipped(model, quote=False))
    except ConfigError as e:
        raise ConfigError(f'model: {e}') from None


def _output_folder(cfg: Dict[str, Any]) -> str:
    """The run's folder: ``output``, or without one a new folder ``output/finetune/<YYYYmmdd-HHMMSS>-<model>``, as
    timm's train.py names its runs (``-1``, ``-2``... when that name is taken)."""
    if cfg['output'] is None:
        if cfg['resume']:
            raise ConfigError('resume: true continues the run in output, so output must name that run\'s folder '
                              '(without output, each run gets a new folder)')
        name = cfg['model'].split(':', 1)[-1].rstrip('/').split('/')[-1]
        name = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)[:64]
        base = Path('output') / 'finetune' / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        output, count = base, 0
        while output.exists():
            count += 1
            output = base.with_name(f'{base.name}-{count}')
        return str(output)
    if not cfg['output']:
        raise ConfigError('output must not be empty')
    if Path(os.path.realpath(cfg['output'])).parent == Path(os.path.realpath(cfg['output'])):
        raise ConfigError(f"output must be a run's folder, not the root folder {cfg['output']}")
    blocking = file_in_the_way(cfg['output'])
    if blocking is not None:
        raise ConfigError(f"output: {blocking} is a file, so {_clipped(cfg['output'], quote=False)} cannot be a "
                          f"folder")
    return cfg['output']


def describe_config(cfg: Dict[str, Any]) -> str:
    """What a run will do, in two lines: the main settings, then every key that differs from DEFAULTS."""
    classes = f" classes {cfg['classes']}" if cfg['classes'] is not None else ''
    # output is on the first line; without one given it is a new folder, which would always differ from None
    changed = ', '.join(f'{k}={_clipped(v)}' for k, v in cfg.items()
                        if k in DEFAULTS and k != 'output' and v != DEFAULTS[k])
    return (f"finetune {cfg['model']} on {cfg['dataset']}{classes} for {_count(cfg['epochs'], 'epoch')}, batch "
            f"{cfg['batch_size']}, {cfg['opt']} lr {cfg['lr']}, gamma {_describe_gamma(cfg['gamma'])}, memory_efficient "
            f"{cfg['memory_efficient']}{_describe_distillation(cfg)}, output {cfg['output']} (all keys: "
            f"{Path(cfg['output']) / 'args.yaml'})\n"
            f"changed from the defaults: {changed or 'nothing'}")


def _describe_distillation(cfg: Dict[str, Any]) -> str:
    if not cfg['distill_weight']:
        return ''
    teacher = cfg['distill_from'] or 'the starting weights at gamma 0'
    return f", distilling from {teacher} (weight {cfg['distill_weight']:g})"


def describe_result(result: Dict[str, Any]) -> str:
    """What a finished ``train`` did, in one line: epochs and time, validation top-1 (last and best), the exports."""
    rows, cfg = result['rows'], result['cfg']
    resumed = f" (resumed at epoch {result['start_epoch']})" if result['start_epoch'] else ''
    text = (f"trained {cfg['model']} on {cfg['dataset']} for {_count(result['epochs_trained'], 'epoch')}{resumed} "
            f"in {_duration(result['seconds'])}")
    if rows:
        last, best = rows[-1], max(rows, key=_score)  # the first best, as best/ holds
        if math.isnan(last['val_acc']):  # distilled without labels: closeness to the teacher is the measure
            text += (f": val top-1 agreement with the teacher {last['val_agreement']:.2f}% (best "
                     f"{best['val_agreement']:.2f}% at epoch {best['epoch']}), val KL {last['val_kl']:.4f}")
        else:
            text += (f": val top-1 {last['val_acc']:.2f}% (best {best['val_acc']:.2f}% at epoch {best['epoch']}), "
                     f"val loss {last['val_loss']:.4f}")
            if 'val_agreement' in last:
                text += f", agreement with the teacher {last['val_agreement']:.2f}%"
    exported = ' and '.join(str(folder) for folder in result['exported'])
    return text + (f'; exported to {exported}' if exported else '')


def _count(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural unless the number is one: '1 epoch', '2 epochs'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _duration(seconds: float) -> str:
    """``seconds`` as '12 s', '3 min 05 s' or '2 h 04 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds // 3600} h {seconds // 60 % 60:02d} min'


def _describe_gamma(gamma: Any) -> str:
    if gamma is None:
        return "the model's own"
    return ', '.join(f'{g:g}' for g in gamma) if isinstance(gamma, list) else str(gamma)


def _check_device(name: str) -> None:
    if name == 'auto':
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {_clipped(name)}") from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'device: {name} asked for, but no CUDA GPU is available (use device: cpu or auto)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f'device: {name} asked for, but only {torch.cuda.device_count()} GPU(s) are visible')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f'device: {name} asked for, but MPS is not available')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {_clipped(name)}")


def _device_name(cfg: Dict[str, Any]) -> str:
    """The device ``cfg`` asks for, with auto resolved to cuda or cpu."""
    if cfg['device'] == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return cfg['device']


def _device(cfg: Dict[str, Any]) -> torch.device:
    if cfg['device'] == 'auto':
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if torch.cuda.is_available() else torch.device('cpu')
    return torch.device(cfg['device'])


def _amp_dtype(cfg: Dict[str, Any], device: torch.device) -> Optional[torch.dtype]:
    amp = cfg['amp']
    if amp == 'none' or (amp == 'auto' and device.type != 'cuda'):
        return None
    if amp == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if amp == 'fp16' else torch.bfloat16


def _is_vit_name(name: str) -> bool:
    """Whether a timm name (tag aside) is a ViT of the momentum family or its timm source."""
    arch = name.split('.')[0]
    return arch in vit_family.SOURCES or (arch.startswith('momentum_') and arch[len('momentum_'):] in vit_family.SOURCES)


def _build_model(cfg: Dict[str, Any], num_classes: int) -> nn.Module:
    """The model ``cfg`` names, with its gamma and memory mode set."""
    import timm

    kwargs: Dict[str, Any] = dict(num_classes=num_classes, in_chans=cfg['in_chans'], drop_rate=cfg['drop'],
                                  drop_path_rate=cfg['drop_path'])
    if cfg['img_size'] and _is_vit_name(cfg['model']):  # a ViT's position embedding is made for one resolution
        kwargs['img_size'] = cfg['img_size']  # (timm resamples pretrained position embeddings to it)
    try:
        model = timm.create_model(cfg['model'], pretrained=cfg['pretrained'] and not cfg['initial_checkpoint'], **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot build {cfg['model']}: {e}") from None
    # Asked of the model, not its name: local-dir: and hf-hub: names do not say they hold a momentum net.
    if isinstance(model, MomentumModel):
        try:
            model.set_momentum(gamma=cfg['gamma'], memory_efficient=cfg['memory_efficient'])
        except ValueError as e:
            raise ConfigError(f'gamma: {e}') from None
    if cfg['initial_checkpoint']:
        load_initial_checkpoint(model, cfg['initial_checkpoint'])
    if cfg['grad_checkpointing']:
        model.set_grad_checkpointing(True)
    return model


def _read_weights_only(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint file's state dict through timm's ``load_state_dict``, unpickled weights-only."""
    from timm.models import load_state_dict

    # timm's train.py saves its arguments as an argparse.Namespace: that class, and no other, is allowed
    # (recent timm's load_state_dict allows it itself; the versions this package supports from do not)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_state_dict(path, use_ema=False, weights_only=True)


def load_initial_checkpoint(model: nn.Module, path: str) -> None:
    """Load weights strictly; only the classifier may be left out, and only when its number of classes differs."""
    try:
        state = _read_weights_only(path)
    except Exception as e:
        raise ConfigError(f'initial_checkpoint {path}: cannot read it as a weights-only checkpoint '
                          f'(corrupt, truncated, or it holds code): {load_failure(e)}') from None
    expected = source_state_dict(model.state_dict())  # a plain network's checkpoint records no momentum settings
    classifier = model.pretrained_cfg.get('classifier') or 'fc'
    head = [k for k in expected if k.startswith(f'{classifier}.')]
    head_differs = any(k in state and state[k].shape != expected[k].shape for k in head)
    if head_differs:  # a new head for other classes: keep the freshly initialised one
        state = {k: v for k, v in state.items() if k not in head}
    missing = sorted(set(expected) - set(state) - (set(head) if head_differs else set()))
    unexpected = sorted(set(state) - set(expected) - set(RECORD_KEYS))
    mismatched = sorted(f'{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}'
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        problems = [f'{name} {len(keys)} keys {keys[:5]}' for name, keys in
                    (('missing', missing), ('unexpected', unexpected), ('shape mismatch in', mismatched)) if keys]
        raise ConfigError(f'initial_checkpoint {path} does not match {type(model).__name__} '
                          f'({model.pretrained_cfg.get("architecture")}): ' + '; '.join(problems))
    try:  # a momentum checkpoint's recorded gamma is taken where the config gives none
        model.load_state_dict(state, strict=not head_differs)
    except RuntimeError as e:
        raise ConfigError(f'initial_checkpoint {path}: {first_line(e)} {str(e).splitlines()[-1].strip()}') from None


def _peak_memory(device: torch.device) -> int:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return vm_hwm_bytes()


def _can_plot() -> bool:
    """Whether matplotlib is installed (the ``train`` extra); without it, say once that there will be no plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('matplotlib is not installed: no loss and accuracy plots (pip install "timm-momentum[train]")',
              file=sys.stderr, flush=True)
        return False
    return True


def _draw_loss(ax: Any, rows: List[Dict[str, Any]]) -> None:
    """Train and validation loss per epoch on ``ax``, on a log scale where every loss is positive."""
    epochs = [r['epoch'] for r in rows]
    ax.plot(epochs, [r['train_loss'] for r in rows], marker='o', label='train')
    ax.plot(epochs, [r['val_loss'] for r in rows], marker='o', label='val')  # as the epoch lines say
    if 'val_kl' in rows[0]:  # distillation: the KL to the teacher beside the objective
        ax.plot(epochs, [r['train_kl'] for r in rows], marker='^', linestyle='--', label='train KL to teacher')
        ax.plot(epochs, [r['val_kl'] for r in rows], marker='^', linestyle='--', label='val KL to teacher')
    ax.set(xlabel='epoch', ylabel='loss')
    if all(r[k] > 0 for r in rows for k in ('train_loss', 'val_loss', 'train_kl', 'val_kl') if k in r):  # late epochs are lost on a linear scale
        ax.set(yscale='log', ylabel='loss (log scale)')


def _draw_accuracy(ax: Any, rows: List[Dict[str, Any]]) -> None:
    """Train and validation top-1 accuracy (%) per epoch on ``ax``."""
    epochs = [r['epoch'] for r in rows]
    ax.plot(epochs, [r['train_acc'] for r in rows], marker='o', label='train')
    ax.plot(epochs, [r['val_acc'] for r in rows], marker='o', label='val')
    if 'val_agreement' in rows[0]:  # distillation: how often the student's top-1 is the teacher's
        ax.plot(epochs, [r['val_agreement'] for r in rows], marker='^', linestyle='--', label='val agreement with teacher')
    ax.set(xlabel='epoch', ylabel='accuracy (%)')


_PANELS = {'loss': _draw_loss, 'accuracy': _draw_accuracy}
_PLOTS = {'curves.png': ('loss', 'accuracy'), 'loss.png': ('loss',), 'accuracy.png': ('accuracy',)}


def _curves_figure(rows: List[Dict[str, Any]], run: str, panels: Sequence[str] = ('loss', 'accuracy')) -> Any:
    """A figure of the named panels side by side, each titled with what it shows and, wrapped to fit, ``run``."""
    import textwrap

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout='constrained')
    for ax, name in zip(axes[0], panels):
        _PANELS[name](ax, rows)
        # about 60 characters of 8-point text fit over a 5-inch panel; a path without spaces is cut anywhere
        ax.set_title(textwrap.fill(f'{name}: {run}', 60, break_on_hyphens=False), fontsize=8)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _plot(rows: List[Dict[str, Any]], out: Path, run: str) -> None:
    """Write curves.png (loss and accuracy side by side), loss.png and accuracy.png, each a figure of its own."""
    import matplotlib.pyplot as plt

    for name, panels in _PLOTS.items():
        fig = _curves_figure(rows, run, panels)
        try:
            atomic_write(out / name, lambda tmp: fig.savefig(tmp, format='png', bbox_inches='tight'))
        finally:
            plt.close(fig)


def _rng_states() -> Dict[str, Any]:
    """The generators' states as tensors and plain types, so that a weights-only load can read them."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'python': [version, list(internal), gauss], 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def _set_rng_states(states: Dict[str, Any]) -> None:
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])
    name, keys, pos, has_gauss, cached = states['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# Keys a resumed run must share with the run it continues: what the weights are (model, classes, input, gamma),
# how they started, what they are trained on and in what order (data, seed), and the optimiser whose state is
# loaded. Every other key may change and takes effect. memory_efficient is not fixed: both modes compute the same
# function and, to rounding, the same gradients (the invertible backward is exact), so switching it mid-run trades
# memory for time, as grad_checkpointing does.
RESUME_FIXED = ('model', 'pretrained', 'initial_checkpoint', 'num_classes', 'in_chans', 'img_size', 'gamma',
                'dataset', 'data_dir', 'train_split', 'val_split', 'classes', 'train_per_class', 'train_limit',
                'val_limit', 'seed', 'opt',
                'distill_from')
# What the optimiser's and the scheduler's saved states hold too: a change to one rebuilds the schedule from it.
_SCHEDULE_KEYS = ('epochs', 'lr', 'momentum', 'weight_decay', 'sched', 'warmup_epochs', 'min_lr', 'decay_milestones',
                  'decay_rate')
_NOT_COMPARED = ('resume', 'output')  # how a run was started, not what it trains


def compare_resume_config(saved: Dict[str, Any], cfg: Dict[str, Any], path: Path) -> Dict[str, Tuple[Any, Any]]:
    """The keys whose values differ between a checkpoint's config and ``cfg``, as (saved, new). A ConfigError
    naming them when any is in RESUME_FIXED."""
    changed = {key: (saved.get(key, DEFAULTS[key]), cfg[key]) for key in DEFAULTS
               if key not in _NOT_COMPARED and not _same_value(key, saved.get(key, DEFAULTS[key]), cfg[key])}
    fixed = [key for key in changed if key in RESUME_FIXED]
    if fixed:
        values = '; '.join(f'{key} {_clipped(changed[key][0])} in the checkpoint, {_clipped(changed[key][1])} now'
                           for key in fixed)
        raise ConfigError(f"cannot resume from {path} with another {', '.join(fixed)} ({values}): these cannot "
                          f"change mid-run. Resume with the checkpoint's values, or start a new run in another output")
    return changed


def _same_value(key: str, saved: Any, new: Any) -> bool:
    """Whether a config value is unchanged. A run records the per-stage gamma it trained at; a gamma that only the
    model resolves (None, a policy) is compared once the model is built, in ``resume_run``."""
    if key != 'gamma':
        return saved == new
    if saved is None or new is None or isinstance(saved, str) or isinstance(new, str):
        return True
    stages = len(saved) if isinstance(saved, list) else len(new) if isinstance(new, list) else 1

    def per_stage(value: Any) -> List[Any]:
        return value if isinstance(value, list) else [value] * stages

    return per_stage(saved) == per_stage(new)


def checkpoint_checksum(state: Dict[str, Any]) -> str:
    """SHA-256 of everything a checkpoint holds but its ``checksum``: each tensor's dtype, shape and bytes, every
    other value's repr, in a fixed order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f'tensor {tensor.dtype} {tuple(tensor.shape)};'.encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f'dict {len(value)};'.encode())
            for key in sorted(value, key=repr):
                digest.update(f'{key!r}:'.encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f'{type(value).__name__} {len(value)};'.encode())
            for item in value:
                feed(item)
        else:
            digest.update(f'{value!r};'.encode())

    feed({key: value for key, value in state.items() if key != 'checksum'})
    return digest.hexdigest()


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to the CPU (the checkpoint is hashed and saved from these)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def load_resume_state(path: Path) -> Dict[str, Any]:
    """Read ``last.pth.tar`` with ``weights_only=True`` (a checkpoint that holds code is refused, not run) and check
    its tensors against the checksum written with them."""
    try:
        # on the CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the model's device
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ConfigError(f'cannot resume from {path}: not a weights-only checkpoint written by timm-momentum '
                          f'finetune (corrupt, truncated, or it holds code): {load_failure(e)}') from None
    needed = {'model', 'optimizer', 'scheduler', 'epoch', 'best_acc', 'rows', 'rng', 'config'}
    if not isinstance(state, dict) or not needed <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f'cannot resume from {path}: expected the keys {sorted(needed)}, found {_clipped(keys)}')
    if 'checksum' not in state:
        raise ConfigError(f'cannot resume from {path}: it carries no checksum (an earlier timm-momentum wrote it), so '
                          f'it cannot be checked for corruption. Start a new run in another output; '
                          f'initial_checkpoint: {path} starts one from its weights')
    if checkpoint_checksum(state) != state['checksum']:
        raise ConfigError(f'cannot resume from {path}: it is corrupt, its contents do not match the checksum written '
                          f'with them. Resume from a copy of the run, or start a new run in another output')
    return state


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    ema: Any, epoch: int, best_acc: float, rows: List[Dict[str, Any]], cfg: Dict[str, Any]) -> None:
    """Write the resume checkpoint atomically: weights, optimiser, scheduler, scaler, EMA, metrics, RNG states, the
    config, and a checksum of all of them."""
    state = _on_cpu({
        'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler else None, 'ema': ema.state_dict() if ema else None,
        'epoch': epoch, 'best_acc': best_acc, 'rows': rows, 'config': cfg, 'rng': _rng_states()})
    state['checksum'] = checkpoint_checksum(state)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def resume_run(state: Dict[str, Any], path: Path, cfg: Dict[str, Any], model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               ema: Any) -> Tuple[int, float, List[Dict[str, Any]]]:
    """Restore what ``save_checkpoint`` wrote (``state``, read by ``load_resume_state``) under ``cfg``; returns the
    epoch to start from, the best accuracy and the metrics.

    The optimiser's and scheduler's states carry the checkpoint's lr, schedule and weight decay. When ``cfg``
    changes any of them, the optimiser keeps its saved moments but takes this config's hyperparameters, and the
    schedule is this config's, at the epoch resumed.
    """
    changed = compare_resume_config(state['config'], cfg, path)
    fresh_groups = [{key: value for key, value in group.items() if key != 'params'} for group in optimizer.param_groups]
    fresh_schedule = copy.deepcopy(scheduler.state_dict())
    try:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if ema and state.get('ema'):
            ema.load_state_dict(state['ema'])
        _set_rng_states(state['rng'])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f'cannot resume from {path}: it does not fit this config ({first_line(e)}); '
                          f'use another output folder or resume: false') from None
    start_epoch = state['epoch'] + 1
    if any(key in changed for key in _SCHEDULE_KEYS):
        for group, fresh in zip(optimizer.param_groups, fresh_groups):
            group.update(fresh)
        scheduler.load_state_dict(fresh_schedule)
        scheduler.step(start_epoch)
    return start_epoch, state['best_acc'], state['rows']


def check_output(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Refuse an output this run must not write into, before anything is written. Returns the checkpoint to resume
    from (its checksum checked, its config one this run may continue), or None for a new run.

    A new run needs an absent or empty folder. ``resume: true`` needs the folder's last.pth.tar; where there is
    none, it starts a new run there (and says so) only when the folder holds nothing but an earlier args.yaml.
    """
    out = Path(cfg['output'])
    last = out / 'last.pth.tar'
    held = sorted(p.name for p in out.iterdir() if not _is_temp(p.name)) if out.is_dir() else []
    listed = ', '.join(held[:5]) + (f' and {len(held) - 5} more' if len(held) > 5 else '')
    if cfg['resume'] and last.is_file():
        state = load_resume_state(last)
        changed = compare_resume_config(state['config'], cfg, last)
        if changed and _rank() == 0:
            print('resume: applying the changed keys ' + ', '.join(
                f'{key} {_clipped(saved)} -> {_clipped(new)}' for key, (saved, new) in changed.items()), flush=True)
        return state
    if cfg['resume']:
        if set(held) - {'args.yaml'}:
            raise ConfigError(f'resume: {out} holds no checkpoint (last.pth.tar) to resume from, and is not empty '
                              f'({listed}); choose another output for a new run')
        if _rank() == 0:
            print(f'resume: no checkpoint (last.pth.tar) in {out}, so this is a new run', flush=True)
        return None
    if held:
        raise ConfigError(f'output {out} is not empty ({listed}); a new run there would overwrite it. Pass '
                          f'--resume true to continue the run it holds, or choose a new --output (without one, each '
                          f'run gets a new folder under output/finetune)')
    return None


def _is_temp(name: str) -> bool:
    """Whether ``name`` is a temp file or folder that a write killed midway left (removed when the run starts)."""
    return name.startswith('.') and ('.tmp-' in name or '.old-' in name)


def _stop_together(failure: Optional[Exception]) -> None:
    """Raise ``failure`` on the rank it happened on and a ConfigError on every other rank, so that no rank waits in a
    collective for one that stopped."""
    if _is_distributed():
        device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else None
        stopped = torch.tensor([int(failure is not None)], device=device)
        dist.all_reduce(stopped)
        if stopped.item() and failure is None:
            failure = ConfigError('another rank refused the output folder; its message says why')
    if failure is not None:
        raise failure


def _snapshot(out: Path) -> Dict[str, Any]:
    """Whether ``out`` exists, and its args.yaml and metrics.csv as bytes (None where absent)."""
    files = {name: (out / name).read_bytes() if (out / name).is_file() else None for name in ('args.yaml', 'metrics.csv')}
    return {'exists': out.exists(), **files}


def _undo_unfinished_run(out: Path, before: Dict[str, Any]) -> None:
    """After a run stopped on bad input before finishing an epoch (metrics.csv as it was), put ``out`` back as it was:
    its args.yaml restored or removed, and the folder removed again if this run made it."""
    if not before['exists'] and not out.exists():
        return
    if _snapshot(out)['metrics.csv'] != before['metrics.csv']:
        return  # an epoch finished: what it wrote is the run's record
    if before['args.yaml'] is None:
        (out / 'args.yaml').unlink(missing_ok=True)
    else:
        atomic_write(out / 'args.yaml', lambda tmp: Path(tmp).write_bytes(before['args.yaml']))
    if not before['exists']:
        remove_folders([out])


def train(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Fine-tune as ``cfg`` says; returns the final metrics, the output folder and the model.

    The output folder is checked before anything is written (``check_output``) and locked while the run writes it;
    a run stopped by bad input before its first epoch ends leaves it as it was.
    """
    cfg = validate_config(cfg)
    _check_local_model(cfg['model'])
    out = Path(cfg['output'])
    with contextlib.ExitStack() as stack:
        failure = None
        try:
            if _rank() == 0:
                stack.enter_context(folder_lock(out, 'timm-momentum finetune'))
            resume_state = check_output(cfg)
        except (ConfigError, FolderInUseError) as e:
            failure = e if isinstance(e, ConfigError) else ConfigError(str(e))
        _stop_together(failure)
        before = _snapshot(out)
        try:
            return _train(cfg, resume_state)
        except ConfigError:
            if _rank() == 0:
                _undo_unfinished_run(out, before)
            raise


@dataclasses.dataclass
class _Run:
    """What a run trains with, and what it has recorded so far."""
    cfg: Dict[str, Any]
    device: torch.device
    amp: Optional[torch.dtype]
    train_set: Any
    val_set: Any
    num_classes: int
    export_data: Dict[str, Any]
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: Any
    mixup: Any
    criterion: nn.Module
    distillation: Optional[Distillation] = None
    labeled: bool = True  # whether the data's labels are the model's classes (accuracy is measured)
    plots: bool = False
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    best_acc: float = -1.0
    start_epoch: int = 0
    steps_per_epoch: Optional[int] = None

    @property
    def out(self) -> Path:
        """The run's folder."""
        return Path(self.cfg['output'])

    @property
    def last(self) -> Path:
        """The resume checkpoint."""
        return self.out / 'last.pth.tar'

    @property
    def eval_model(self) -> nn.Module:
        """The model validated and exported: the EMA weights when there are any."""
        return self.ema.module if self.ema is not None else self.model


def _train(cfg: Dict[str, Any], resume_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``train`` once its output is checked: build, resume from ``resume_state`` (when not None), run the epochs."""
    started = time.perf_counter()
    run = _build_run(cfg)
    _prepare_output(run)
    if resume_state is not None:
        _resume(run, resume_state)
    for epoch in range(run.start_epoch, run.cfg['epochs']):
        _record_epoch(run, _train_epoch(run, epoch))
    exported = []
    if _rank() == 0 and run.rows:
        _export(run.eval_model, run.out / 'final', run.cfg, run.rows[-1], run.export_data, _healing(run))
        exported = [folder for folder in (run.out / 'best', run.out / 'final') if folder.is_dir()]
    return {'metrics': run.rows[-1] if run.rows else {}, 'rows': run.rows, 'output': run.out, 'model': run.model,
            'steps_per_epoch': run.steps_per_epoch, 'cfg': run.cfg, 'start_epoch': run.start_epoch,
            'epochs_trained': max(run.cfg['epochs'] - run.start_epoch, 0), 'exported': exported,
            'seconds': time.perf_counter() - started}


def _build_run(cfg: Dict[str, Any]) -> _Run:
    """Everything the run ``cfg`` describes trains with: device, data, model, optimiser, schedule and loss."""
    from timm.utils import random_seed

    device = _device(cfg)
    amp = _amp_dtype(cfg, device)
    random_seed(cfg['seed'])  # every rank alike: the model starts from the same weights on each
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = cfg['cudnn_benchmark']
    if cfg['batch_size'] == 'auto':
        cfg = dict(cfg, batch_size=find_batch_size(cfg))
    train_set, val_set, num_classes, export_data, labeled = _build_data(cfg)
    random_seed(cfg['seed'])
    cfg, model = _build_model_to_train(cfg, num_classes, device)
    distillation = _distillation(cfg, model, num_classes, device)
    return _Run(cfg, device, amp, train_set, val_set, num_classes, export_data, model,
                **_training_parts(cfg, model, num_classes, device, amp), distillation=distillation, labeled=labeled)


def _build_data(cfg: Dict[str, Any]) -> Tuple[Any, Any, int, Dict[str, Any], bool]:
    """The training and validation sets, the number of classes, what the exports record of the data, and whether
    the data's labels are the model's classes.

    Distilling with the KL alone (distill_weight 1) uses no labels: then the data may have other classes than the
    model (an unlabeled folder is one class), and accuracy is not measured.
    """
    # timm's datasets take their transforms' input size, mean and std from the model; in-memory ones need none
    probe = None if cfg['dataset'] in ('sklearn/digits', FASHION_MNIST) else _build_model(cfg, cfg['num_classes'] or 2)
    train_set, val_set, data_classes = build_datasets(cfg, probe)
    num_classes = cfg['num_classes'] or data_classes
    labeled = not data_classes or num_classes == data_classes
    if not labeled and cfg['distill_weight'] < 1:
        raise ConfigError(f"num_classes={num_classes} but the dataset has {data_classes} classes (only distillation "
                          f"with the KL alone, distill_weight 1, trains on images whose labels are not the model's)")
    if cfg['distill_weight'] == 1 and num_classes == 1:
        raise ConfigError('the data has one class (an unlabeled folder?) and so would the model, whose KL to a teacher '
                          "is then 0: set num_classes to the teacher's number of classes")
    export_data = {'data_config': data_config_of(cfg, train_set, probe),
                   'label_names': label_names(train_set) if labeled else None}
    return train_set, val_set, num_classes, export_data, labeled


def _build_model_to_train(cfg: Dict[str, Any], num_classes: int,
                          device: torch.device) -> Tuple[Dict[str, Any], nn.Module]:
    """The model on ``device``, and ``cfg`` with the per-stage gamma it trains at (a momentum model's)."""
    model = _build_model(cfg, num_classes).to(device)
    if isinstance(model, MomentumModel):  # args.yaml and checkpoints record the gamma the run trains at
        cfg = dict(cfg, gamma=list(model.momentum_cfg['gamma']))
        if _rank() == 0:
            policy = f' (policy {model.gamma_policy})' if model.gamma_policy else ''
            print(f"gamma per stage: {_describe_gamma(cfg['gamma'])}{policy}", flush=True)
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model


def _training_parts(cfg: Dict[str, Any], model: nn.Module, num_classes: int, device: torch.device,
                    amp: Optional[torch.dtype]) -> Dict[str, Any]:
    """timm's optimiser, schedule, loss scaler, EMA, mixup and loss for ``model``, and the module batches run through."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    optimizer = create_optimizer_v2(model, opt=cfg['opt'], lr=cfg['lr'], weight_decay=cfg['weight_decay'],
                                    **({'momentum': cfg['momentum']} if cfg['opt'] in ('sgd', 'momentum') else {}))
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg['sched'], num_epochs=cfg['epochs'],
                                           warmup_epochs=cfg['warmup_epochs'], min_lr=cfg['min_lr'],
                                           decay_milestones=cfg['decay_milestones'], decay_rate=cfg['decay_rate'])
    except ValueError as e:  # a known name with settings it cannot schedule (wsd's decay phase shorter than an epoch)
        raise ConfigError(f'sched: {e}') from None
    mixup = Mixup(mixup_alpha=cfg['mixup'], cutmix_alpha=cfg['cutmix'], label_smoothing=cfg['smoothing'],
                  num_classes=num_classes) if cfg['mixup'] or cfg['cutmix'] else None
    criterion = SoftTargetCrossEntropy() if mixup else (
        LabelSmoothingCrossEntropy(cfg['smoothing']) if cfg['smoothing'] else nn.CrossEntropyLoss())
    parts = dict(optimizer=optimizer, scheduler=scheduler, mixup=mixup, criterion=criterion,
                 scaler=NativeScaler(device=device.type) if amp == torch.float16 else None,
                 ema=ModelEmaV3(model, decay=cfg['model_ema_decay']) if cfg['model_ema'] else None)
    train_model = nn.parallel.DistributedDataParallel(model) if _is_distributed() else model
    parts['train_model'] = torch.compile(train_model) if cfg['compile'] else train_model
    return parts


def _distillation(cfg: Dict[str, Any], model: nn.Module, num_classes: int,
                  device: torch.device) -> Optional[Distillation]:
    """The teacher and loss mix ``cfg`` distills with (None when distill_weight is 0), the teacher built before
    the student trains (and before a resume loads its weights), so that the starting weights are the source's."""
    if cfg['distill_weight'] == 0:
        return None
    teacher, description = _build_teacher(cfg, model, num_classes)
    if getattr(teacher, 'num_classes', num_classes) != num_classes:
        raise ConfigError(f"distill_from: the teacher {_clipped(cfg['distill_from'])} predicts {teacher.num_classes} "
                          f"classes and the model {num_classes}; a KL between them needs the same classes")
    if cfg['channels_last']:
        teacher = teacher.to(memory_format=torch.channels_last)
    if _rank() == 0:
        print(f"distilling from {description}: weight {cfg['distill_weight']:g} on the KL, temperature "
              f"{cfg['distill_temperature']:g}", flush=True)
    return Distillation(Teacher(teacher, device, description), cfg['distill_weight'], cfg['distill_temperature'],
                        cfg['distill_eval_norms'])


def _build_teacher(cfg: Dict[str, Any], model: nn.Module, num_classes: int) -> Tuple[nn.Module, str]:
    """The network ``distill_from`` names, and a description of it for logs, cards and verify.json."""
    import timm

    name = cfg['distill_from']
    if name is None:  # the starting weights, at gamma 0: for a converted drop-in model, its source ResNet
        if not (cfg['pretrained'] or cfg['initial_checkpoint'] or ':' in cfg['model']):
            raise ConfigError('distill_weight > 0 without distill_from distills from the starting weights at gamma 0, '
                              'but the model starts from random weights (pretrained: false, no initial_checkpoint): '
                              'name a teacher with distill_from')
        teacher = copy.deepcopy(model)
        if isinstance(teacher, MomentumModel):  # no gradients flow through a teacher: nothing to store
            teacher.set_momentum(gamma=0.0, memory_efficient=False)
        return teacher, f"{cfg['model']}'s starting weights at gamma 0" + (
            ' (its source ResNet)' if getattr(teacher, 'momentum_cfg', {}).get('block_fn') == 'dropin' else '')
    if Path(name).is_file():  # a checkpoint of the model's own architecture
        teacher = _build_model(dict(cfg, pretrained=False, initial_checkpoint=None, gamma=None, memory_efficient=False,
                                    grad_checkpointing=False, drop=0.0, drop_path=0.0), num_classes)
        _load_teacher_weights(teacher, name)
        return teacher, name
    try:
        teacher = timm.create_model(name, pretrained=True)
    except Exception as e:  # an unknown name, a folder that is not a model, weights that cannot be found offline
        raise ConfigError(f'distill_from: cannot load the teacher {_clipped(name)} as a checkpoint file or a timm '
                          f'model with pretrained weights: {first_line(e)}') from None
    if isinstance(teacher, MomentumModel):
        teacher.set_momentum(memory_efficient=False)
    return teacher, name


def _load_teacher_weights(teacher: nn.Module, path: str) -> None:
    """Load a teacher checkpoint strictly, head included; a momentum teacher whose file records no gamma is the
    ResNet the file holds (gamma 0)."""
    try:
        state = _read_weights_only(path)
        teacher.load_state_dict(state, strict=True)
    except Exception as e:
        raise ConfigError(f'distill_from {path}: cannot load it into {type(teacher).__name__} '
                          f'({teacher.pretrained_cfg.get("architecture")}): {load_failure(e)}') from None
    if isinstance(teacher, MomentumModel) and not set(RECORD_KEYS) & set(state):
        teacher.set_momentum(gamma=0.0)


def _score(row: Dict[str, Any]) -> float:
    """What best/ is chosen by: validation accuracy, or without labels the agreement with the teacher."""
    return row['val_agreement'] if math.isnan(row['val_acc']) and 'val_agreement' in row else row['val_acc']


def _healing(run: '_Run') -> Optional[Dict[str, Any]]:
    """What distillation did, for the exports' verify.json and card (None without a teacher)."""
    if run.distillation is None:
        return None
    cfg = run.cfg
    return {'method': 'distillation', 'teacher': run.distillation.teacher.description,
            'distill_weight': cfg['distill_weight'], 'distill_temperature': cfg['distill_temperature'],
            'distill_eval_norms': cfg['distill_eval_norms'], 'images': cfg['dataset'], 'split': cfg['train_split'],
            'labels_used': run.distillation.uses_labels, 'epochs': len(run.rows),
            'steps': len(run.rows) * (run.steps_per_epoch or 0), 'validation': {
                'split': cfg['val_split'], 'images': len(run.val_set)}}


def _prepare_output(run: _Run) -> None:
    """On the primary rank: make the run's folder, clear what killed runs left in it, write args.yaml."""
    from .files import remove_stale_temps

    if _rank() != 0:
        return
    run.out.mkdir(parents=True, exist_ok=True)  # its parents exist already: train's folder_lock made them
    for name in ('last.pth.tar', 'metrics.csv', 'best', 'final', *_PLOTS):  # what runs killed mid-write left
        remove_stale_temps(run.out, name)
    atomic_write(run.out / 'args.yaml', lambda tmp: Path(tmp).write_text(
        yaml.safe_dump({**run.cfg, 'num_classes': run.num_classes}, sort_keys=True)))
    run.plots = run.cfg['plots'] and _can_plot()


def _resume(run: _Run, state: Dict[str, Any]) -> None:
    """Continue ``run`` from a checked checkpoint: restore its state, and cut metrics.csv back to its epochs."""
    run.start_epoch, run.best_acc, run.rows = resume_run(state, run.last, run.cfg, run.model, run.optimizer,
                                                         run.scheduler, run.scaler, run.ema)
    state.clear()  # loaded: let the checkpoint's copies go (train's frame still holds this dict)
    if _rank() == 0:
        _rewrite_metrics(run.out / 'metrics.csv', run.rows)
        print(f'resuming from {run.last} at epoch {run.start_epoch}', flush=True)


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``, below 2**31 so that numpy takes it plus any rank."""
    return (seed * 1000 + epoch) % 2 ** 31


def _train_epoch(run: _Run, epoch: int) -> Dict[str, Any]:
    """Train ``run`` for one epoch and validate it; returns the epoch's metrics row."""
    from timm.utils import distribute_bn, random_seed

    cfg = run.cfg
    random_seed(_epoch_seed(cfg['seed'], epoch), _rank())  # resume replays the same draws as an unbroken run
    loader = build_loader(run.train_set, cfg, True, run.device, cfg['seed'] + epoch, _is_distributed())
    if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    run.steps_per_epoch = len(loader)
    epoch_lr = run.optimizer.param_groups[0]['lr']
    started = time.perf_counter()
    trained = train_one_epoch(epoch, run.model, run.train_model, loader, run.optimizer, run.criterion, cfg,
                              run.device, run.amp, run.scaler, run.ema, run.mixup, _last_good(run.last, run.rows),
                              run.distillation, run.labeled)
    run.scheduler.step(epoch + 1)
    if _is_distributed():  # each rank tracked BatchNorm statistics on its own shard: average them
        distribute_bn(run.model, dist.get_world_size(), reduce=True)
    seconds = time.perf_counter() - started
    teacher = run.distillation.teacher if run.distillation else None
    val = evaluate(run.eval_model, build_loader(run.val_set, cfg, False, run.device, 0, _is_distributed()),
                   run.device, run.amp, cfg, teacher, cfg['distill_temperature'], run.labeled)
    row = {'epoch': epoch, 'train_loss': trained['loss'], 'train_acc': trained['acc'],
           'val_loss': val['loss'] if run.labeled else val['kl'], 'val_acc': val['acc'], 'lr': epoch_lr,
           'images_per_s': trained['images'] / seconds, 'peak_memory_mib': _peak_memory(run.device) / 2 ** 20}
    if teacher is not None:  # both losses, and how close the student is to its teacher on the validation split
        row.update(train_label_loss=trained['label_loss'], train_kl=trained['kl'],
                   train_agreement=trained['agreement'], val_kl=val['kl'], val_agreement=val['agreement'])
    return row


def _record_epoch(run: _Run, row: Dict[str, Any]) -> None:
    """Log an epoch and append it to metrics.csv; unless it diverged, plot it and save best/ and last.pth.tar."""
    epoch = row['epoch']
    diverged = _diverged(run, row['val_loss'])
    if _rank() == 0:
        teacher = (f" | to teacher: KL {row['val_kl']:.4f} agreement {row['val_agreement']:.2f}"
                   if 'val_kl' in row else '')
        print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} | "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}{teacher} | {row['images_per_s']:.1f} img/s | "
              f"peak memory {row['peak_memory_mib']:.0f} MiB", flush=True)
        _append_metrics(run.out / 'metrics.csv', row)
    if diverged:  # neither best/ nor last.pth.tar may hold a diverged model
        raise FloatingPointError(f"the model diverged in epoch {epoch} (validation loss {row['val_loss']}, or weights "
                                 f'that are not finite); stopping, nothing of epoch {epoch} saved. '
                                 f'{_last_good(run.last, run.rows)}; lower lr or enable clip_grad.')
    run.rows.append(row)
    if run.plots:
        _plot(run.rows, run.out, f"{run.cfg['model']} on {run.cfg['dataset']}, {run.out}")
    if _rank() == 0 and run.cfg['checkpoints']:
        if _score(row) > run.best_acc:
            run.best_acc = _score(row)
            _export(run.eval_model, run.out / 'best', run.cfg, row, run.export_data, _healing(run))
        save_checkpoint(run.last, run.model, run.optimizer, run.scheduler, run.scaler, run.ema, epoch, run.best_acc,
                        run.rows, run.cfg)


def _diverged(run: _Run, val_loss: float) -> bool:
    """Whether the validation loss, or any floating-point weight of the model or its EMA, is not finite."""
    return not math.isfinite(val_loss) or not all(
        bool(torch.isfinite(t).all()) for m in (run.model, run.eval_model) for t in m.state_dict().values()
        if t.is_floating_point())


def _append_metrics(path: Path, row: Dict[str, Any]) -> None:
    """Append one epoch's row to metrics.csv in a single write, after the header when the file is new or empty.

    timm's ``update_summary`` appends too, but names every column ``train_*`` or ``eval_*`` (or ``lr``), and
    metrics.csv keeps its ``val_*``, ``images_per_s`` and ``peak_memory_mib`` columns.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row))
    if not path.is_file() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow(row)
    with open(path, 'a', newline='') as f:
        f.write(text.getvalue())


def _rewrite_metrics(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically to hold just ``rows``: on resume, the checkpoint's epochs, so that an epoch
    logged after the checkpoint was written (or a diverged one) is not listed twice."""
    write_csv(path, rows)


def _last_good(last: Path, rows: List[Dict[str, Any]]) -> str:
    """Where the newest finite checkpoint is: last.pth.tar is only ever written after a finite epoch."""
    if rows and last.exists():
        return f'The last good checkpoint is {last} (epoch {rows[-1]["epoch"]})'
    return 'No epoch finished with finite weights, so there is no checkpoint to resume from'


def _export(model: nn.Module, folder: Path, cfg: Dict[str, Any], row: Dict[str, Any], data: Dict[str, Any],
            healing: Optional[Dict[str, Any]] = None) -> None:
    """Write ``model`` as a model folder: the momentum settings it trained at, the preprocessing training used
    (``data['data_config']``) and the class names (``data['label_names']``), so that timm and transformers
    preprocess and label as training did. After distillation (``healing``, from ``_healing``) the card says how it
    was healed, and verify.json, as the converter writes it, records the healing and the drift from the teacher."""
    momentum_cfg = getattr(model, 'momentum_cfg', {})
    model_args = {'num_classes': model.num_classes, **({'in_chans': cfg['in_chans']} if cfg['in_chans'] != 3 else {}),
                  **{k: v for k, v in momentum_cfg.items() if k in ('gamma', 'block_fn')}}
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k in ('first_conv', 'classifier', 'license')}
    pretrained_cfg['notes'] = (f"Fine-tuned by timm-momentum {__version__} from {cfg['model']} on {cfg['dataset']}"
                               + (f" at gamma {_describe_gamma(momentum_cfg['gamma'])} per stage" if momentum_cfg
                                  else '') + '.')
    card = (f"---\nlibrary_name: timm\npipeline_tag: image-classification\ntags:\n  - image-classification\n"
            f"  - timm\n  - timm-momentum\n---\n\n# {cfg['model']} fine-tuned on {cfg['dataset']}\n\n"
            f"Fine-tuned by `timm-momentum finetune` (gamma per stage {_describe_gamma(momentum_cfg.get('gamma'))}, "
            f"memory_efficient={cfg['memory_efficient']}). Epoch {row['epoch']}: "
            + (f"validation accuracy {row['val_acc']:.2f}%." if not math.isnan(row['val_acc'])
               else 'no validation accuracy (distilled without labels).')
            + _healing_sentence(healing, row) + "\n\n"
            f"```python\nimport timm, timm_momentum  # the import registers the momentum_* models with timm\n"
            f"model = timm.create_model('local-dir:PATH', pretrained=True)  # or 'hf-hub:ORG/NAME'\n```\n")
    reports = None
    if healing is not None:
        reports = {'verify.json': {
            'gamma': momentum_cfg.get('gamma'), 'gamma_policy': getattr(model, 'gamma_policy', None),
            'healing': healing, 'drift_at_gamma': {
                'against': healing['teacher'], 'after_healing': True,
                'input': f"{cfg['dataset']} split {cfg['val_split']}", 'images': healing['validation']['images'],
                'top1_agreement': row['val_agreement'] / 100, 'kl_source_to_converted': row['val_kl'],
                'kl_temperature': cfg['distill_temperature']}}}
    write_model_folder(folder, model, model_args, pretrained_cfg, {'metrics': row}, card, reports=reports,
                       data_config=data['data_config'], label_names=data['label_names'])


def _healing_sentence(healing: Optional[Dict[str, Any]], row: Dict[str, Any]) -> str:
    """The card's account of distillation ('' without it)."""
    if healing is None:
        return ''
    norms = ', BatchNorm in eval mode' if healing['distill_eval_norms'] else ''
    labels = (f"{1 - healing['distill_weight']:g} × label loss + {healing['distill_weight']:g} × KL"
              if healing['labels_used'] else 'the KL alone, no labels')
    return (f"\n\nHealed by distillation: trained for {_count(healing['epochs'], 'epoch')} "
            f"({healing['steps']} steps) on {healing['images']} split {healing['split']} toward the logits of "
            f"{healing['teacher']} ({labels}, temperature {healing['distill_temperature']:g}{norms}). On the "
            f"validation split ({healing['validation']['images']} images) its top-1 agrees with the teacher's on "
            f"{row['val_agreement']:.2f}% of the images, KL {row['val_kl']:.4f} (verify.json).")


def find_batch_size(cfg: Dict[str, Any], limit: int = 4096) -> int:
    """The largest batch whose training step fits on the GPU (CUDA only)."""
    if _device(cfg).type != 'cuda':
        raise ConfigError('batch_size: auto searches GPU memory and needs a CUDA device; give a number on CPU')
    from .bench import largest_batch

    mode = 'memory_efficient' if cfg['memory_efficient'] else 'plain'
    found = largest_batch(cfg['model'], mode, cfg['img_size'] or 224, 'bf16' if _amp_dtype(cfg, _device(cfg)) else None,
                           limit)['max_batch']
    print(f'batch_size auto: {found} fits', flush=True)
    return max(found, 1)


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum finetune`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    try:
        result = run_reporting_user_errors(lambda: _configure_and_train(args))
    finally:
        if _is_distributed():
            dist.destroy_process_group()
    if result is None:
        return 2
    print(describe_result(result))
    return 0


def _configure_and_train(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not _is_distributed():  # started by torchrun
        from timm.utils import init_distributed_device  # nccl for CUDA, gloo for the CPU; each rank its own GPU
        init_distributed_device(argparse.Namespace(device=_device_name(cfg)))
    if _rank() == 0:
        print(describe_config(cfg), flush=True)
    return train(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m timm_momentum.tools.finetune --config ... [--key value]``."""
    parser = argparse.ArgumentParser(prog='python -m timm_momentum.tools.finetune')
    parser.add_argument('--config', default=None, help='YAML config; any other --key value overrides that key')
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return run_cli(args)


if __name__ == '__main__':
    sys.exit(main())
