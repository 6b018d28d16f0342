"""``timm-momentum bench``: memory, speed and gradient fidelity of Momentum ResNets against ResNet,
timm's gradient checkpointing, the official ``momentumnet`` package and, optionally, ``torch.compile``d
models (measured as in benchmarks/MEASURE.md).
"""
import argparse
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .files import atomic_write
from .memory import (MiB, autocast, build_model, check_amp, compile_model, cuda_step_peak,
                     peak_step_memory, saved_tensor_bytes, train_step, warm_up_compiled)
from .timing import time_steps, time_steps_apart
from ..core.config import standard_matching_memory_efficient
from ..core.models import vit_family
from ..core.models.momentum_resnet import resnet_state_dict

__all__ = ['Config', 'CONFIGS', 'ARMS', 'COMPILED_CONFIGS', 'run_benchmark', 'format_table', 'plot_results',
           'check_targets', 'largest_batch', 'build_configuration']


class Config(NamedTuple):
    """One measured configuration: the momentum family is the --models name, the resnet family its source."""
    label: str
    family: str
    mode: str
    compiled: bool = False


CONFIGS = (
    Config('resnet', 'resnet', 'plain'),
    Config('resnet+checkpointing', 'resnet', 'checkpoint'),
    Config('momentum', 'momentum', 'plain'),
    Config('momentum memory-efficient', 'momentum', 'memory_efficient'),
    Config('momentum memory-efficient, transitions stored', 'momentum', 'memory_efficient_stored_transitions'),
    Config('official momentumnet', 'momentum', 'official'),
)
# The eager configurations measured beside plain resnet, by the names ``arms`` takes.
ARMS = {
    'checkpointing': 'resnet+checkpointing',
    'standard': 'momentum',
    'memory-efficient': 'momentum memory-efficient',
    'transitions-stored': 'momentum memory-efficient, transitions stored',
    'official': 'official momentumnet',
}
# torch.compile'd configurations, by the names --compile takes.
COMPILED_CONFIGS = {
    'checkpointing': Config('resnet+checkpointing, compiled', 'resnet', 'checkpoint', compiled=True),
    'standard': Config('momentum, compiled', 'momentum', 'plain', compiled=True),
    'memory-efficient': Config('momentum memory-efficient, compiled', 'momentum', 'memory_efficient', compiled=True),
}
# Which configuration each one's gradients are compared with (same weights, same batch).
_GRAD_REFERENCE = {
    'resnet+checkpointing': 'resnet',
    'momentum memory-efficient': 'momentum',
    'momentum memory-efficient, transitions stored': 'momentum',
    'official momentumnet': 'momentum',
    'resnet+checkpointing, compiled': 'resnet',
    'momentum, compiled': 'momentum',
    'momentum memory-efficient, compiled': 'momentum',
}
# The sizes the targets of benchmarks/MEASURE.md were set at.
MEMORY_TARGET_SIZE = {'batch_size': 16, 'img_size': 224}
TIME_TARGET_SIZE = {'time_batch_size': 4, 'img_size': 224}
TIME_TARGET_DEPTHS = (101, 152)
GPU_TARGET = {'img_size': 224, 'amp': 'bf16', 'depth': 101}


def _official_available() -> bool:
    try:
        import momentumnet  # noqa: F401
    except ImportError:
        return False
    return True


def _model_name(momentum_name: str, family: str) -> str:
    return momentum_name if family == 'momentum' else momentum_name.replace('momentum_', '')


def network_family(name: str) -> str:
    """'vit' for a Momentum ViT of timm's Block-based ViTs (momentum_vit_base_patch16_224, ...), else 'resnet'."""
    return 'vit' if name.startswith('momentum_') and name[len('momentum_'):] in vit_family.SOURCES else 'resnet'


def _model_kwargs(name: str, img_size: int) -> Dict[str, Any]:
    """What every configuration of ``name`` is built with: a ViT at the run's resolution (its position embedding
    is made for one), a ResNet with its last BatchNorm weights non-zero (so that gradients compare)."""
    return {'img_size': img_size} if network_family(name) == 'vit' else {'zero_init_last': False}


def _validate(models: List[str], device: str, amp: Optional[str], compiled: Sequence[str],
              arms: Optional[Sequence[str]] = None, repeats: int = 1, steps: int = 1) -> None:
    import timm

    if not models:
        raise ValueError('no models given: bench takes e.g. momentum_resnet50,momentum_resnet101')
    for name in models:
        if not re.fullmatch(r'momentum_resnet(18|34|50|101|152)', name) and network_family(name) != 'vit':
            known = name in timm.list_models('momentum_*')
            raise ValueError(f'{"" if known else "unknown model "}{name!r}: bench takes the plain-depth drop-in '
                             f'models, momentum_resnet18/34/50/101/152 (the official momentumnet package it '
                             f'compares with has only those depths), and the Momentum ViTs '
                             f'(momentum_vit_small_patch16_224, momentum_vit_base_patch16_224, ...)')
    if device not in ('cpu', 'cuda'):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda requested but torch.cuda.is_available() is False')
    check_amp(amp)
    for key in compiled:
        if key not in COMPILED_CONFIGS:
            raise ValueError(f'unknown compiled configuration {key!r}: choose from {", ".join(COMPILED_CONFIGS)}')
    for key in arms or ():
        if key not in ARMS:
            raise ValueError(f'unknown arm {key!r}: choose from {", ".join(ARMS)} (plain resnet is always measured)')
    if repeats < 1 or steps < 1:
        raise ValueError(f'steps and repeats must be at least 1, got steps {steps}, repeats {repeats}')


def _reason(error: BaseException) -> str:
    """One line saying why a configuration failed."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = f'{type(error).__name__}: {lines[0] if lines else ""}'
    return text if len(text) <= 240 else text[:237] + '...'


def build_configuration(momentum_name: str, config: Config, compile_backend: str, img_size: int) -> nn.Module:
    """One configuration of ``momentum_name`` on the CPU, with the weights ``_build_all`` gives every configuration:
    what a timing process builds."""
    return _build_all(momentum_name, [config], 'cpu', compile_backend, img_size)[config.label]


def _build_all(momentum_name: str, configs: Sequence[Config], device: str,
               compile_backend: str, img_size: int = 224) -> Dict[str, nn.Module]:
    """Every configuration of one model, all with the same weights (compiled ones wrapped, not yet compiled)."""
    torch.manual_seed(0)
    kwargs = _model_kwargs(momentum_name, img_size)
    source = build_model(_model_name(momentum_name, 'resnet'), 'plain', **kwargs)
    state = source.state_dict()
    models = {}
    for config in configs:
        model = build_model(_model_name(momentum_name, config.family), config.mode,
                            **(kwargs if 'img_size' in kwargs else {}))
        model_state = resnet_state_dict(model.state_dict())  # the record: the model's own settings, kept
        if set(model_state) == set(state):
            model.load_state_dict(state)
        else:  # the official layout: layerK.1.0.network.{i} holds block i + 1
            model.load_state_dict(_to_official_keys(state, model_state))
        model = model.to(device).train()
        models[config.label] = compile_model(model, compile_backend) if config.compiled else model
    return models


def _to_official_keys(state: Dict[str, torch.Tensor], official: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split('.')
        if parts[0].startswith('layer') and int(parts[1]) > 0:
            key = '.'.join([parts[0], '1', '0', 'network', str(int(parts[1]) - 1)] + parts[2:])
        out[key] = value
    missing = set(official) - set(out)
    if missing:
        raise RuntimeError(f'cannot map weights onto the official layout; missing {sorted(missing)[:3]}')
    return out


def _batch(batch_size: int, img_size: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    return x, torch.randint(0, 1000, (batch_size,), device=device)


def _gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, amp: Optional[str]) -> torch.Tensor:
    """The parameter gradients of one loss, flattened. Standard mode carries the chain's state as the
    memory-efficient mode does here, so the two compute the same forward and their gradients compare exactly."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with standard_matching_memory_efficient():
        with autocast(x.device.type, amp):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def largest_batch(name: str, mode: str, img_size: int, amp: Optional[str], limit: int = 8192,
                  seconds: float = 120.0) -> Dict[str, Any]:
    """Largest batch whose training step fits on the GPU, and the throughput at it.

    Doubles from 8, then bisects to within 1/32; stops at ``limit`` images or after ``seconds`` of
    searching, and says which in ``max_batch_search``.
    """
    model = build_model(name, mode).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    started = time.perf_counter()

    def fits(batch: int) -> bool:
        try:
            x, t = _batch(batch, img_size, 'cuda')
            with autocast('cuda', amp):
                train_step(model, x, t, optimizer)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    def out_of_time() -> bool:
        return time.perf_counter() - started > seconds

    low, high, search = 0, min(8, limit), 'converged'
    while fits(high):
        low = high
        if low >= limit:
            search = f'capped at {limit}'
            break
        if out_of_time():
            search = f'stopped after {seconds:.0f} s'
            break
        high = min(high * 2, limit)
    while search == 'converged' and high - low > max(1, low // 32):
        if out_of_time():
            search = f'stopped after {seconds:.0f} s'
            break
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    result = {'max_batch': low, 'max_batch_search': search, 'search_seconds': time.perf_counter() - started,
              'throughput_img_s': 0.0}
    for _ in range(3):  # a repeated step may not fit where one did (allocator fragmentation)
        if low == 0:
            break
        try:
            x, t = _batch(low, img_size, 'cuda')
            step_seconds = time_steps({'m': model}, x, t, amp, warmup=1, steps=3)['m'][0]
            result.update(throughput_batch=low, throughput_img_s=low / step_seconds)
            break
        except torch.cuda.OutOfMemoryError:
            x = t = None  # free this batch before the smaller one is drawn
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            low = int(low * 0.95)
    return result




def run_benchmark(models: List[str], batch_size: int = 16, img_size: int = 224, device: str = 'cpu',
                  amp: Optional[str] = None, time_batch_size: int = 4, warmup: int = 1, steps: int = 3,
                  max_batch: bool = True, measure_peak: bool = True, compiled: Sequence[str] = (),
                  compile_backend: str = 'inductor', max_batch_models: Optional[Sequence[str]] = None,
                  max_batch_limit: int = 8192, max_batch_seconds: float = 120.0,
                  log: Callable[[str], None] = lambda line: None, repeats: int = 1,
                  arms: Optional[Sequence[str]] = None, timing_processes: bool = True) -> Dict[str, Any]:
    """Measure every configuration at every depth.

    A configuration whose measurement raises becomes a row with ``failed`` (the stage and the error)
    instead of stopping the run; only plain resnet, the reference of every ratio, must succeed.

    Args:
        models: Momentum model names, e.g. ``['momentum_resnet50', 'momentum_resnet101']``.
        batch_size: Batch of the memory measurements.
        img_size: Input resolution.
        device: ``cpu`` or ``cuda``.
        amp: ``bf16``, ``fp16`` or None (fp32).
        time_batch_size: Batch of the timing, gradient and saved-bytes measurements.
        warmup: Warm-up steps per configuration before timing (compiled ones first warm up until they
            stop recompiling, at least 2 steps).
        steps: Timed steps per configuration in each repeat (its median is the repeat's step time).
        max_batch: On CUDA, also search the largest batch that fits.
        measure_peak: Measure peak step memory (CPU: one fresh subprocess per configuration); 0 when False.
        compiled: Keys of COMPILED_CONFIGS to measure as well.
        compile_backend: ``torch.compile`` backend of the compiled configurations.
        max_batch_models: Models whose largest batch is searched (default: all).
        max_batch_limit: The largest batch the search tries.
        max_batch_seconds: Search time per model and configuration before it stops.
        log: Called with a line of progress after each stage.
        repeats: Blocks of ``steps`` interleaved rounds; each gives every configuration a ratio to plain resnet,
            and rows report the median ratio and its range over the repeats.
        arms: Keys of ARMS, the eager configurations measured beside plain resnet (default: all).
        timing_processes: On CPU, time each configuration in a process of its own (``timing.time_steps_apart``:
            none then steps on heap another one's steps left mapped); False times them all in this process.

    Returns:
        A JSON-ready dict with the environment, one row per (model, configuration), the targets judged
        and the targets not judged (with why).
    """
    _validate(models, device, amp, compiled, arms, repeats, steps)
    unknown = set(max_batch_models or ()) - set(models)
    if unknown:
        raise ValueError(f'max_batch_models must be among the benched models; {sorted(unknown)} are not')
    configs = _configs(amp, compiled, arms)
    rows = []
    for name in models:
        # the official package and the stored transitions are the ResNets' alone
        mine = configs if network_family(name) == 'resnet' else \
            [c for c in configs if c.mode not in ('official', 'memory_efficient_stored_transitions')]
        depth_rows = _measure_depth(name, mine, batch_size, img_size, device, amp, time_batch_size, warmup,
                                    steps, measure_peak, compile_backend, log, repeats, timing_processes)
        if device == 'cuda' and max_batch and (max_batch_models is None or name in max_batch_models):
            _search_largest_batches(depth_rows, img_size, amp, max_batch_limit, max_batch_seconds, log)
        rows += depth_rows
    command_args = dict(models=models, batch_size=batch_size, img_size=img_size, device=device, amp=amp,
                        time_batch_size=time_batch_size, warmup=warmup, steps=steps, repeats=repeats,
                        arms=list(ARMS) if arms is None else list(arms), compiled=list(compiled),
                        compile_backend=compile_backend if compiled else None, measure_peak=measure_peak,
                        timing='fresh processes per configuration and repeat' if device == 'cpu' and timing_processes
                        else 'one process')
    targets, not_judged = check_targets(rows, command_args)
    return {'command_args': command_args, 'environment': _environment(device), 'rows': rows, 'targets': targets,
            'targets_not_judged': not_judged}


def _configs(amp: Optional[str], compiled: Sequence[str], arms: Optional[Sequence[str]]) -> List[Config]:
    """Plain resnet, the chosen eager arms (the official package's only where it is installed and not at fp16),
    then the compiled configurations."""
    chosen = None if arms is None else {'resnet'} | {ARMS[key] for key in arms}
    configs = [c for c in CONFIGS if (chosen is None or c.label in chosen)
               and (c.mode != 'official' or (_official_available() and amp != 'fp16'))]
    return configs + [COMPILED_CONFIGS[key] for key in compiled]


def _search_largest_batches(rows: List[Dict[str, Any]], img_size: int, amp: Optional[str], limit: int,
                            seconds: float, log: Callable[[str], None]) -> None:
    """Add the largest batch and its throughput to the plain resnet and memory-efficient rows of one depth."""
    for row in rows:
        if row['config'] in ('resnet', 'momentum memory-efficient') and 'failed' not in row:
            try:
                row.update(largest_batch(row['arch'], row['mode'], img_size, amp, limit, seconds))
            except Exception as e:  # keep what was measured; the search is the last stage
                row.update(max_batch=0, max_batch_search=f'failed: {_reason(e)}', throughput_img_s=0.0)
            log(f'{row["model"]} {row["config"]}: largest batch {row["max_batch"]} ({row["max_batch_search"]}), '
                f'{row["throughput_img_s"]:.0f} img/s')


def _environment(device: str) -> Dict[str, Any]:
    """The versions, machine, threads and date a run was measured with."""
    import timm

    return {'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'machine': _machine(device), 'threads': torch.get_num_threads(),
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}


def _measure_depth(name: str, configs: Sequence[Config], batch_size: int, img_size: int, device: str,
                   amp: Optional[str], time_batch_size: int, warmup: int, steps: int, measure_peak: bool,
                   compile_backend: str, log: Callable[[str], None], repeats: int = 1,
                   timing_processes: bool = True) -> List[Dict[str, Any]]:
    """The rows of one depth: gradients, interleaved timing (on CPU each configuration in a process of its own,
    unless ``timing_processes`` is False), saved bytes and peak memory of each configuration."""
    instances = _build_all(name, configs, device, compile_backend, img_size)
    failures: Dict[str, str] = {}
    compile_info: Dict[str, Dict[str, int]] = {}

    def attempt(label: str, stage: str, measure: Callable[[], Any]) -> Any:
        if label in failures:
            return None
        started = time.perf_counter()
        try:
            result = measure()
        except Exception as e:
            if label == 'resnet':  # every ratio is against it
                raise
            failures[label] = f'{stage}: {_reason(e)}'
            log(f'{name} {label}: {stage} failed: {failures[label]}')
            return None
        log(f'{name} {label}: {stage} {time.perf_counter() - started:.1f} s')
        return result

    x, target = _batch(time_batch_size, img_size, device)
    grads = {}
    for config in configs:
        model = instances[config.label]
        if config.compiled:  # without an optimizer: the weights stay those of the eager configurations
            compile_info[config.label] = attempt(config.label, 'compile',
                                                 lambda: warm_up_compiled(model, x, target, None, amp))
        grads[config.label] = attempt(config.label, 'gradients', lambda: _gradients(model, x, target, amp))
    started = time.perf_counter()
    timed = [c for c in configs if c.label not in failures]
    faults: Dict[str, List[int]] = {}
    if device == 'cpu' and timing_processes:
        builders = {c.label: functools.partial(build_configuration, name, c, compile_backend, img_size) for c in timed}
        seconds = time_steps_apart(builders, x, target, amp, warmup, steps, failures, repeats,
                                   faults=faults, reason=_reason)
    else:
        seconds = time_steps({c.label: instances[c.label] for c in timed}, x, target, amp, warmup, steps, failures,
                             repeats, reason=_reason, faults=faults)
    log(f'{name}: timing {time.perf_counter() - started:.1f} s')
    if 'resnet' in failures:  # every ratio is against it
        raise RuntimeError(f'plain resnet failed: {failures["resnet"]}')
    rows = []
    for config in configs:
        label, model = config.label, instances[config.label]
        family = network_family(name)
        depth = int(name.split('resnet')[-1]) if family == 'resnet' else len(instances['resnet'].blocks)
        row: Dict[str, Any] = {'model': name, 'family': family, 'depth': depth, 'config': label,
                               'arch': _model_name(name, config.family), 'mode': config.mode,
                               'compiled': compile_backend if config.compiled else None}
        with autocast(device, amp):  # at the timing batch: the official package's stores are huge
            saved = attempt(label, 'saved bytes', lambda: saved_tensor_bytes(model, x))
        peak = attempt(label, 'peak memory', lambda: _peak(name, config, model, batch_size, img_size, device, amp,
                                                           compile_backend)) if measure_peak else 0
        if label in failures:
            rows.append({**row, 'failed': failures[label]})
            continue
        row.update(saved_bytes=saved, peak_bytes=peak,
                   param_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                   **_timing(seconds[label], seconds['resnet']), **compile_info.get(label, {}))
        if device == 'cpu':  # minor page faults per timed step: the heap a step maps anew
            row.update(page_faults=statistics.median(faults[label]))
        reference = _GRAD_REFERENCE.get(label)
        if reference and grads.get(reference) is not None:
            diff = (grads[label] - grads[reference]).norm() / grads[reference].norm()
            row.update(grad_rel_error=float(diff), grad_reference=reference)
        rows.append(row)
    del instances
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()
    return rows


def _timing(seconds: List[float], plain: List[float]) -> Dict[str, Any]:
    """A row's step time (per repeat and their median) and its ratio to plain resnet (per repeat, median, min, max)."""
    ratios = [mine / reference for mine, reference in zip(seconds, plain)]
    return {'step_seconds': statistics.median(seconds), 'repeat_step_seconds': seconds,
            'time_ratio': statistics.median(ratios), 'time_ratios': ratios, 'time_ratio_min': min(ratios),
            'time_ratio_max': max(ratios)}


def _peak(name: str, config: Config, model: nn.Module, batch_size: int, img_size: int, device: str,
          amp: Optional[str], compile_backend: str) -> int:
    """Peak memory of a step after a warm-up (the steady state, and what compiled rows allow): on CPU in a
    fresh subprocess; on CUDA in this process, from the allocator's statistics."""
    if device == 'cuda':
        x, target = _batch(batch_size, img_size, device)
        if config.compiled:  # a new batch size compiles new graphs: not part of the step
            warm_up_compiled(model, x, target, None, amp)
        model.zero_grad(set_to_none=True)
        return cuda_step_peak(model, x, target, torch.optim.SGD(model.parameters(), lr=1e-3), amp)
    kwargs = {} if config.mode == 'official' else _model_kwargs(name, img_size)
    return peak_step_memory(_model_name(name, config.family), config.mode, batch_size, img_size, device,
                            model_kwargs=kwargs, amp=amp, compile_backend=compile_backend if config.compiled else None,
                            after_warmup=True)


def _machine(device: str) -> str:
    if device == 'cuda':
        return torch.cuda.get_device_name()
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores'


class _Judgement:
    """The targets judged so far over one run's successful rows, and the groups of targets not judged."""

    def __init__(self, rows: List[Dict[str, Any]]) -> None:
        resnets = [r for r in rows if r.get('family', 'resnet') == 'resnet']
        self.by = {(r['depth'], r['config']): r for r in resnets if 'failed' not in r}
        self.depths = sorted({r['depth'] for r in resnets})
        # the ViTs, by (model, configuration)
        self.vit = {(r['model'], r['config']): r for r in rows if r.get('family') == 'vit' and 'failed' not in r}
        self.vit_models = list(dict.fromkeys(r['model'] for r in rows if r.get('family') == 'vit'))
        self.targets: List[Dict[str, Any]] = []
        self.not_judged: List[str] = []

    def add(self, name: str, value: float, limit: float, smaller_is_better: bool = True,
            spread: Optional[List[float]] = None) -> None:
        """Judge ``value`` against ``limit``; ``spread`` is the per-repeat values' [min, max]."""
        passed = value <= limit if smaller_is_better else value >= limit
        target = {'target': name, 'value': value, 'limit': limit, 'pass': bool(passed),
                  'margin': (limit - value) if smaller_is_better else (value - limit)}
        self.targets.append({**target, 'spread': spread} if spread else target)

    def measured(self, *keys: Tuple[int, str]) -> bool:
        """Whether every (depth, configuration) in ``keys`` has a successful row."""
        return all(key in self.by for key in keys)


_EFFICIENT = 'momentum memory-efficient'


def check_targets(rows: List[Dict[str, Any]], command_args: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The targets of benchmarks/MEASURE.md, judged only at the sizes they were set for.

    Returns:
        The judged targets (measured value, limit, pass, margin; step-time targets also the range of their
        per-repeat ratios, ``spread``) and one line per group of targets this run could not judge, saying why.
    """
    judgement = _Judgement(rows)
    if judgement.depths:
        _judge_peak_memory(judgement, command_args)
        _judge_saved_bytes(judgement)
        _judge_step_time(judgement, command_args)
        if command_args['device'] == 'cuda':
            _judge_largest_batch(judgement, command_args)
    if judgement.vit_models:
        _judge_vit(judgement, command_args)
    return judgement.targets, judgement.not_judged


VIT_PEAK_TARGET = ('momentum_vit_base_patch16_224', 384)  # issue 23: ViT-B/16 at 384², peak <= 0.5x plain
VIT_TIME_SIZES = (224, 384)  # issue 23: ViT step time against checkpointing, at the sizes ViTs are trained at


def _judge_vit(judgement: _Judgement, args: Dict[str, Any]) -> None:
    """The ViT targets (issue 23): at every ViT and size, peak below timm checkpointing's; ViT-B/16 at 384² (the
    224 or 384 architecture), peak <= 0.5x plain; on cpu fp32, step time <= 1.05x checkpointing."""
    by, size = judgement.vit, args['img_size']
    for name in judgement.vit_models:
        short = name[len('momentum_'):]
        efficient, plain, ckpt = (by.get((name, c)) for c in (_EFFICIENT, 'resnet', 'resnet+checkpointing'))
        if efficient is None or plain is None:
            continue
        if args.get('measure_peak', True) and ckpt is not None:
            judgement.add(f'peak memory {short} at {size}²: memory-efficient / timm checkpointing (< 1)',
                          efficient['peak_bytes'] / ckpt['peak_bytes'], 1.0)
        if args.get('measure_peak', True) and size == VIT_PEAK_TARGET[1] and \
                name.rsplit('_', 1)[0] == VIT_PEAK_TARGET[0].rsplit('_', 1)[0]:
            judgement.add(f'peak memory {short} at {size}²: memory-efficient / plain (<= 0.5)',
                          efficient['peak_bytes'] / plain['peak_bytes'], 0.5)
        if ckpt is None:
            continue
        if args['device'] != 'cpu' or args['amp'] or size not in VIT_TIME_SIZES:
            judgement.not_judged.append(f'{short} step time: set for cpu fp32 at 224² and 384² (this run: '
                                        f'{args["device"]} {args["amp"] or "fp32"} at {size}²); ratios are '
                                        f'reported, not judged')
            continue
        ratios = _paired_ratios(efficient, ckpt)
        judgement.add(f'step time {short} at {size}²: memory-efficient / timm checkpointing (<= 1.05)',
                      statistics.median(ratios), 1.05, spread=[min(ratios), max(ratios)])


def _judge_peak_memory(judgement: _Judgement, args: Dict[str, Any]) -> None:
    """The peak-memory targets, at batch 16, 224² and only where peaks were measured."""
    by, add, measured = judgement.by, judgement.add, judgement.measured
    if not args.get('measure_peak', True):
        judgement.not_judged.append('peak memory targets: peaks were not measured')
        return
    if any(args[k] != v for k, v in MEMORY_TARGET_SIZE.items()):
        judgement.not_judged.append(f'peak memory targets: set for batch 16, 224² (this run: batch '
                                    f'{args["batch_size"]}, {args["img_size"]}²); peaks are reported, not judged')
        return
    if measured((101, _EFFICIENT), (101, 'resnet')):
        add('peak memory momentum_resnet101 memory-efficient / resnet101 (<= 0.4)',
            by[101, _EFFICIENT]['peak_bytes'] / by[101, 'resnet']['peak_bytes'], 0.4)
    for depth in judgement.depths:
        if measured((depth, _EFFICIENT), (depth, 'resnet+checkpointing')):
            add(f'peak memory depth {depth}: memory-efficient / timm checkpointing (< 1)',
                by[depth, _EFFICIENT]['peak_bytes'] / by[depth, 'resnet+checkpointing']['peak_bytes'], 1.0)
    if measured((50, _EFFICIENT), (152, _EFFICIENT)):
        activations = {d: by[d, _EFFICIENT]['peak_bytes'] - by[d, _EFFICIENT]['param_bytes'] for d in (50, 152)}
        add('peak memory less parameter gradients, depth 152 / depth 50, memory-efficient (<= 1.10)',
            activations[152] / activations[50], 1.10)
    else:
        judgement.not_judged.append('peak growth with depth: needs depths 50 and 152')


def _judge_saved_bytes(judgement: _Judgement) -> None:
    """The bytes-saved-for-backward target, which holds at any size."""
    by = judgement.by
    if judgement.measured((50, _EFFICIENT), (152, _EFFICIENT)):
        judgement.add('bytes saved for backward depth 152 / depth 50, memory-efficient (<= 1.10)',
                      by[152, _EFFICIENT]['saved_bytes'] / by[50, _EFFICIENT]['saved_bytes'], 1.10)
    else:
        judgement.not_judged.append('bytes saved, depth 152 / depth 50: needs depths 50 and 152')


def _judge_step_time(judgement: _Judgement, args: Dict[str, Any]) -> None:
    """The step-time targets, at cpu fp32, batch 4, 224² and depths 101 and 152, each the median over repeats."""
    time_size = f'{args["device"]} {args["amp"] or "fp32"}, batch {args["time_batch_size"]}, {args["img_size"]}²'
    if args['device'] != 'cpu' or args['amp'] or any(args[k] != v for k, v in TIME_TARGET_SIZE.items()):
        judgement.not_judged.append(f'step-time targets: set for cpu fp32, batch 4, 224² (this run: {time_size}); '
                                    f'ratios are reported, not judged')
        return
    time_depths = [d for d in judgement.depths if d in TIME_TARGET_DEPTHS]
    if not time_depths:
        judgement.not_judged.append('step-time targets: set for depths 101 and 152, neither in this run')
    for depth in time_depths:
        if judgement.measured((depth, _EFFICIENT), (depth, 'resnet+checkpointing')):
            ratios = _paired_ratios(judgement.by[depth, _EFFICIENT], judgement.by[depth, 'resnet+checkpointing'])
            judgement.add(f'step time depth {depth}: memory-efficient / timm checkpointing (<= 1.03)',
                          statistics.median(ratios), 1.03, spread=[min(ratios), max(ratios)])
        if judgement.measured((depth, 'momentum'), (depth, 'resnet')):
            ratios = _paired_ratios(judgement.by[depth, 'momentum'], judgement.by[depth, 'resnet'])
            judgement.add(f'step time depth {depth}: momentum standard / resnet (<= 1.05)',
                          statistics.median(ratios), 1.05, spread=[min(ratios), max(ratios)])


def _paired_ratios(row: Dict[str, Any], reference: Dict[str, Any]) -> List[float]:
    """Per repeat, ``row``'s step time over ``reference``'s (rows without per-repeat ratios count as one repeat)."""
    return [mine / theirs for mine, theirs in zip(row.get('time_ratios', [row['time_ratio']]),
                                                  reference.get('time_ratios', [reference['time_ratio']]))]


def _judge_largest_batch(judgement: _Judgement, args: Dict[str, Any]) -> None:
    """The GPU targets: depth 101's largest batch and throughput there, at bf16 and 224²."""
    plain, eff = judgement.by.get((101, 'resnet'), {}), judgement.by.get((101, _EFFICIENT), {})
    if args['img_size'] != GPU_TARGET['img_size'] or args['amp'] != GPU_TARGET['amp']:
        judgement.not_judged.append(f'largest-batch targets: set for bf16 at 224² (this run: {args["amp"] or "fp32"} '
                                    f'at {args["img_size"]}²)')
        return
    if not plain.get('max_batch') or 'max_batch' not in eff:
        judgement.not_judged.append('largest-batch targets: set for depth 101, whose largest batches were not found')
        return
    ratio = eff['max_batch'] / plain['max_batch']
    if ratio < 5 and eff['max_batch_search'] != 'converged':
        judgement.not_judged.append(f'largest batch ratio: the momentum search {eff["max_batch_search"]} at '
                                    f'{ratio:.2f}x, before reaching 5x')
    else:
        judgement.add('largest batch momentum_resnet101 memory-efficient / resnet101 (>= 5)', ratio, 5.0,
                      smaller_is_better=False)
    judgement.add('throughput at largest batch, momentum_resnet101 memory-efficient / resnet101 (>= 0.8)',
                  eff['throughput_img_s'] / max(plain['throughput_img_s'], 1e-9), 0.8, smaller_is_better=False)


def describe_run(results: Dict[str, Any]) -> str:
    """One line naming a bench run: models, device and precision, sizes, versions and date."""
    args, env = results['command_args'], results['environment']
    depths = '/'.join(m.replace('momentum_resnet', 'r') if network_family(m) == 'resnet' else m[len('momentum_'):]
                      for m in args['models'])
    return (f'bench {depths}, {args["device"]} {args["amp"] or "fp32"}, peak at batch {args["batch_size"]}, '
            f'time at batch {args["time_batch_size"]}, {args["img_size"]}² ({args["steps"]} steps x '
            f'{args.get("repeats", 1)} repeats, {args.get("timing", "one process")}); torch {env["torch"]}, '
            f'{env["date"]}')


def format_table(results: Dict[str, Any]) -> str:
    """A plain-text table of the results and the targets."""
    cuda = results['command_args']['device'] == 'cuda'
    label = {id(r): str(r['depth']) if r.get('family', 'resnet') == 'resnet' else r['model'][len('momentum_'):]
             for r in results['rows']}
    width = max([5] + [len(v) for v in label.values()])
    # a ViT's plain and checkpointed configurations are timm's ViT, not a ResNet
    config = {id(r): r['config'].replace('resnet', 'vit', 1) if r.get('family') == 'vit' else r['config']
              for r in results['rows']}
    header = (f'{"depth" if width == 5 else "model":>{width}}  {"configuration":<46} {"saved MiB":>10} {"peak MiB":>9} {"time x":>7} '
              f'{"range":>11} {"grad err":>9}')
    if cuda:
        header += f' {"max batch":>9} {"img/s":>8}'
    elif any('page_faults' in r for r in results['rows']):
        header += f' {"faults":>7}'
    lines = [describe_run(results), header]
    notes = []
    for r in results['rows']:
        if 'failed' in r:
            lines.append(f'{label[id(r)]:>{width}}  {config[id(r)]:<46} failed: {r["failed"]}')
            continue
        err = f'{r["grad_rel_error"]:.1e}' if 'grad_rel_error' in r else '-'
        line = (f'{label[id(r)]:>{width}}  {config[id(r)]:<46} {r["saved_bytes"] / MiB:10.1f} {r["peak_bytes"] / MiB:9.0f} '
                f'{r["time_ratio"]:7.2f} {r["time_ratio_min"]:5.2f}-{r["time_ratio_max"]:<5.2f} {err:>9}')
        if 'page_faults' in r:
            line += f' {r["page_faults"]:7.0f}'
        if cuda and 'max_batch' in r:
            line += f' {r["max_batch"]:>9} {r["throughput_img_s"]:8.1f}'
            if r['max_batch_search'] != 'converged':
                notes.append(f'depth {r["depth"]} {r["config"]}: largest-batch search {r["max_batch_search"]}')
        if r['compiled']:
            notes.append(f'depth {r["depth"]} {r["config"]}: {r["compiled"]}, warmed up {r["warmup_steps"]} steps, '
                         f'{r["compilations"]} compilations, {r["graph_breaks"]} graph breaks')
        lines.append(line)
    lines += notes + ['']
    for t in results['targets']:
        spread = f', repeats {t["spread"][0]:.3f}-{t["spread"][1]:.3f}' if t.get('spread') else ''
        lines.append(f'[{"PASS" if t["pass"] else "MISS"}] {t["target"]}: {t["value"]:.3f} '
                     f'(margin {t["margin"]:+.3f}{spread})')
    lines += [f'[not judged] {line}' for line in results['targets_not_judged']]
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """Draw peak memory and step time against depth, and step time against peak memory, per configuration."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [r for r in results['rows'] if 'failed' not in r and r.get('family', 'resnet') == 'resnet']
    if not rows:
        raise ValueError('--plot draws the ResNet depths against each other; this run measured none (the table '
                         'and the JSON have the ViT rows)')
    labels = list(dict.fromkeys(r['config'] for r in rows))
    depths = sorted({r['depth'] for r in rows})
    colors = {label: plt.get_cmap('tab10')(i % 10) for i, label in enumerate(labels)}
    markers = dict(zip(depths, 'os^Dvp<>'))
    gap = min((b - a for a, b in zip(depths, depths[1:])), default=10)
    dodge = {label: (i - (len(labels) - 1) / 2) * 0.02 * gap for i, label in enumerate(labels)}  # bars side by side
    peaks_measured = any(r['peak_bytes'] for r in rows)
    args = results['command_args']
    fig, (ax_mem, ax_time, ax_trade) = plt.subplots(1, 3, figsize=(18, 5.5))
    for label in labels:
        mine = sorted((r for r in rows if r['config'] == label), key=lambda r: r['depth'])
        style = dict(color=colors[label], marker='o', linestyle='--' if mine[0]['compiled'] else '-', label=label)
        ax_time.errorbar([r['depth'] + dodge[label] for r in mine], [r['time_ratio'] for r in mine], capsize=3,
                         yerr=[[r['time_ratio'] - r['time_ratio_min'] for r in mine],
                               [r['time_ratio_max'] - r['time_ratio'] for r in mine]], **style)
        if peaks_measured:
            ax_mem.plot([r['depth'] for r in mine], [r['peak_bytes'] / MiB for r in mine], **style)
            ax_trade.plot([r['peak_bytes'] / MiB for r in mine], [r['time_ratio'] for r in mine],
                          color=colors[label], linestyle=style['linestyle'], lw=0.8)
            for r in mine:
                ax_trade.scatter(r['peak_bytes'] / MiB, r['time_ratio'], color=colors[label],
                                 marker=markers[r['depth']], s=45, zorder=3)
    ax_time.set(xlabel='depth', ylabel='step time / plain resnet of the same depth', xticks=depths,
                title=f'step time at batch {args["time_batch_size"]}: median of {args.get("repeats", 1)} '
                      f'repeats (bars: their range)')
    ax_time.axhline(1.0, color='gray', lw=0.5)
    # legends below the axes, where they cover no data point
    handles, names = ax_time.get_legend_handles_labels()
    fig.legend(handles, names, loc='upper center', bbox_to_anchor=(0.4, 0.0), ncol=2, fontsize=8,
               title='configuration (dashed: compiled)', title_fontsize=8)
    if peaks_measured:
        ax_mem.set(xlabel='depth', ylabel='peak step memory above the model (MiB)', xticks=depths,
                   title=f'peak memory of a step after warm-up, batch {args["batch_size"]}')
        ax_trade.set(xlabel=f'peak step memory at batch {args["batch_size"]} (MiB)',
                     ylabel='step time / plain resnet',
                     title='time against memory: lower left is better')
        ax_trade.axhline(1.0, color='gray', lw=0.5)
        fig.legend(handles=[plt.Line2D([], [], color='black', marker=markers[d], linestyle='', label=f'depth {d}')
                            for d in depths], loc='upper center', bbox_to_anchor=(0.85, 0.0), ncol=len(depths),
                   fontsize=8, title='right: marker (colour: as left)', title_fontsize=8)
    else:
        for ax in (ax_mem, ax_trade):
            ax.text(0.5, 0.5, 'peak memory not measured in this run', ha='center', va='center',
                    transform=ax.transAxes)
            ax.set_axis_off()
    fig.suptitle(describe_run(results), fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png', bbox_inches='tight'))
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum bench`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    models = [m.strip() for m in args.models.split(',') if m.strip()]
    if args.plot and models and all(network_family(m) == 'vit' for m in models):
        print('error: --plot draws the ResNet depths against each other; these are all ViTs (the table and --out '
              'have their rows)', file=sys.stderr)
        return 2
    if args.plot:  # before the measurements, which take minutes
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('error: --plot needs matplotlib, which is not installed: pip install "timm-momentum[train]"',
                  file=sys.stderr)
            return 2
    try:
        results = run_benchmark(
            models, args.batch_size, args.img_size,
            args.device, args.amp, args.time_batch_size, args.warmup, args.steps,
            max_batch=not args.no_max_batch, measure_peak=not args.no_peak,
            compiled=[k.strip() for k in (args.compile or '').split(',') if k.strip()],
            compile_backend=args.compile_backend,
            repeats=args.repeats,
            arms=[k.strip() for k in args.arms.split(',') if k.strip()] if args.arms else None,
            max_batch_models=[m.strip() for m in args.max_batch_models.split(',')] if args.max_batch_models else None,
            max_batch_limit=args.max_batch_limit, max_batch_seconds=args.max_batch_seconds,
            log=lambda line: print(line, file=sys.stderr, flush=True), timing_processes=not args.one_process)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    if args.plot:
        plot_results(results, args.plot)
    return 0
