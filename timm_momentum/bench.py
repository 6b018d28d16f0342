"""``timm-momentum bench``: memory, speed and gradient fidelity of Momentum ResNets against ResNet,
timm's gradient checkpointing and the official ``momentumnet`` package (measured as in MEASURE.md).
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .files import atomic_write
from .memory import AMP_DTYPES, MiB, build_model, check_amp, peak_step_memory, saved_tensor_bytes, train_step

__all__ = ['CONFIGS', 'run_benchmark', 'format_table', 'plot_results', 'check_targets']

# (label, model family, mode); the momentum family is the --models name, the resnet family its source.
CONFIGS = (
    ('resnet', 'resnet', 'plain'),
    ('resnet+checkpointing', 'resnet', 'checkpoint'),
    ('momentum', 'momentum', 'plain'),
    ('momentum memory-efficient', 'momentum', 'memory_efficient'),
    ('momentum memory-efficient, transitions stored', 'momentum', 'memory_efficient_stored_transitions'),
    ('official momentumnet', 'momentum', 'official'),
)
# Which configuration each one's gradients are compared with (same weights, same batch).
_GRAD_REFERENCE = {
    'resnet+checkpointing': 'resnet',
    'momentum memory-efficient': 'momentum',
    'momentum memory-efficient, transitions stored': 'momentum',
    'official momentumnet': 'momentum',
}


def _official_available() -> bool:
    try:
        import momentumnet  # noqa: F401
    except ImportError:
        return False
    return True


def _model_name(momentum_name: str, family: str) -> str:
    return momentum_name if family == 'momentum' else momentum_name.replace('momentum_', '')


def _validate(models: List[str], device: str, amp: Optional[str]) -> None:
    import timm

    for name in models:
        if not name.startswith('momentum_resnet') or name not in timm.list_models('momentum_*'):
            raise ValueError(f'unknown model {name!r}: bench takes drop-in momentum models such as '
                             f'momentum_resnet50,momentum_resnet101,momentum_resnet152')
    if device not in ('cpu', 'cuda'):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('device cuda requested but torch.cuda.is_available() is False')
    check_amp(amp)


def _autocast(device: str, amp: Optional[str]):
    return torch.autocast(device, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()


def _build_all(momentum_name: str, configs, device: str) -> Dict[str, nn.Module]:
    """Every configuration of one depth, all with the same weights."""
    torch.manual_seed(0)
    source = build_model(_model_name(momentum_name, 'resnet'), 'plain', zero_init_last=False)
    state = source.state_dict()
    models = {}
    for label, family, mode in configs:
        model = build_model(_model_name(momentum_name, family), mode)
        model_state = model.state_dict()
        if set(model_state) == set(state):
            model.load_state_dict(state)
        else:  # the official layout: layerK.1.0.network.{i} holds block i + 1
            model.load_state_dict(_to_official_keys(state, model_state))
        models[label] = model.to(device).train()
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


def _gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, device: str,
               amp: Optional[str]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with _autocast(device, amp):
        loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def _time_steps(models: Dict[str, nn.Module], x: torch.Tensor, target: torch.Tensor, device: str,
                amp: Optional[str], warmup: int, steps: int) -> Dict[str, float]:
    """Median step time of each configuration, interleaved A B A B after a warm-up."""
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: Dict[str, List[float]] = {k: [] for k in models}

    def step(label: str) -> float:
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(device, amp):
            train_step(models[label], x, target, optimizers[label])
        if device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        for label in models:
            step(label)
    for _ in range(steps):
        for label in models:
            times[label].append(step(label))
    return {k: statistics.median(v) for k, v in times.items()}


def _largest_batch(name: str, mode: str, img_size: int, amp: Optional[str], limit: int = 4096) -> Dict[str, Any]:
    """Largest batch whose training step fits on the GPU (doubling, then bisection), and its throughput."""
    model = build_model(name, mode).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def fits(batch: int) -> bool:
        try:
            x = torch.randn(batch, 3, img_size, img_size, device='cuda')
            t = torch.randint(0, model.num_classes, (batch,), device='cuda')
            with _autocast('cuda', amp):
                train_step(model, x, t, optimizer)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    low, high = 0, 8
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > max(1, low // 32):
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    if low == 0:
        return {'max_batch': 0, 'throughput_img_s': 0.0}
    x = torch.randn(low, 3, img_size, img_size, device='cuda')
    t = torch.randint(0, model.num_classes, (low,), device='cuda')
    seconds = _time_steps({'m': model}, x, t, 'cuda', amp, warmup=1, steps=3)['m']
    return {'max_batch': low, 'throughput_img_s': low / seconds}


def run_benchmark(models: List[str], batch_size: int = 16, img_size: int = 224, device: str = 'cpu',
                  amp: Optional[str] = None, time_batch_size: int = 4, warmup: int = 1, steps: int = 3,
                  max_batch: bool = True, measure_peak: bool = True) -> Dict[str, Any]:
    """Measure every configuration at every depth.

    Args:
        models: Momentum model names, e.g. ``['momentum_resnet50', 'momentum_resnet101']``.
        batch_size: Batch of the memory measurements.
        img_size: Input resolution.
        device: ``cpu`` or ``cuda``.
        amp: ``bf16``, ``fp16`` or None (fp32).
        time_batch_size: Batch of the timing and gradient measurements.
        warmup: Warm-up steps per configuration before timing.
        steps: Timed steps per configuration (the median is reported).
        max_batch: On CUDA, also search the largest batch that fits.
        measure_peak: Measure peak step memory (one fresh subprocess per configuration); 0 when False.

    Returns:
        A JSON-ready dict with the environment and one row per (model, configuration).
    """
    _validate(models, device, amp)
    import timm

    configs = [c for c in CONFIGS if c[2] != 'official' or (_official_available() and amp != 'fp16')]
    rows = []
    for name in models:
        instances = _build_all(name, configs, device)
        x_time = torch.randn(time_batch_size, 3, img_size, img_size, device=device)
        target = torch.randint(0, 1000, (time_batch_size,), device=device)
        grads = {label: _gradients(model, x_time, target, device, amp) for label, model in instances.items()}
        seconds = _time_steps(instances, x_time, target, device, amp, warmup, steps)
        for label, family, mode in configs:
            with _autocast(device, amp):  # at the timing batch: the official package's stores are huge
                saved = saved_tensor_bytes(instances[label], x_time)
            row = {
                'model': name, 'depth': int(name.split('resnet')[-1]), 'config': label,
                'arch': _model_name(name, family), 'mode': mode,
                'saved_bytes': saved,
                'peak_bytes': _peak(name, family, mode, batch_size, img_size, device, amp) if measure_peak else 0,
                'step_seconds': seconds[label],
                'time_ratio': seconds[label] / seconds['resnet'],
            }
            reference = _GRAD_REFERENCE.get(label)
            if reference:
                diff = (grads[label] - grads[reference]).norm() / grads[reference].norm()
                row['grad_rel_error'] = float(diff)
                row['grad_reference'] = reference
            if device == 'cuda' and max_batch and mode in ('plain', 'memory_efficient') and label != 'momentum':
                row.update(_largest_batch(_model_name(name, family), mode, img_size, amp))
            rows.append(row)
        del instances
    return {
        'command_args': dict(models=models, batch_size=batch_size, img_size=img_size, device=device, amp=amp,
                             time_batch_size=time_batch_size, warmup=warmup, steps=steps),
        'environment': {
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'machine': _machine(device), 'threads': torch.get_num_threads(),
        },
        'rows': rows,
        'targets': check_targets(rows, device),
    }


def _peak(name: str, family: str, mode: str, batch_size: int, img_size: int, device: str,
          amp: Optional[str]) -> int:
    kwargs = {} if mode == 'official' else {'zero_init_last': False}
    return peak_step_memory(_model_name(name, family), mode, batch_size, img_size, device,
                            model_kwargs=kwargs, amp=amp)


def _machine(device: str) -> str:
    if device == 'cuda':
        return torch.cuda.get_device_name()
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores'


def check_targets(rows: List[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """The project's targets (MEASURE.md), each with its measured value, limit and pass/fail."""
    by = {(r['depth'], r['config']): r for r in rows}
    efficient = 'momentum memory-efficient'
    targets = []

    def add(name: str, value: float, limit: float, smaller_is_better: bool = True) -> None:
        passed = value <= limit if smaller_is_better else value >= limit
        targets.append({'target': name, 'value': value, 'limit': limit, 'pass': bool(passed),
                        'margin': (limit - value) if smaller_is_better else (value - limit)})

    if (101, efficient) in by and by[101, 'resnet']['peak_bytes']:
        add('peak memory momentum_resnet101 / resnet101 (<= 0.4)',
            by[101, efficient]['peak_bytes'] / by[101, 'resnet']['peak_bytes'], 0.4)
    if (101, efficient) in by:
        add('step time momentum_resnet101 memory-efficient / resnet101 (<= 1.35)',
            by[101, efficient]['time_ratio'], 1.35)
    for depth in sorted({r['depth'] for r in rows}):
        if (depth, efficient) in by and by[depth, 'resnet+checkpointing']['peak_bytes']:
            add(f'peak memory depth {depth}: memory-efficient / timm checkpointing (< 1)',
                by[depth, efficient]['peak_bytes'] / by[depth, 'resnet+checkpointing']['peak_bytes'], 1.0)
    if (50, efficient) in by and (152, efficient) in by:
        if by[50, efficient]['peak_bytes']:
            add('peak memory growth depth 50 -> 152, memory-efficient (<= 1.10)',
                by[152, efficient]['peak_bytes'] / by[50, efficient]['peak_bytes'], 1.10)
        add('bytes saved for backward depth 152 / depth 50, memory-efficient (<= 1.10)',
            by[152, efficient]['saved_bytes'] / by[50, efficient]['saved_bytes'], 1.10)
    if device == 'cuda' and (101, efficient) in by and 'max_batch' in by[101, efficient]:
        plain, eff = by[101, 'resnet'], by[101, efficient]
        add('largest batch momentum_resnet101 / resnet101 (>= 5)', eff['max_batch'] / max(plain['max_batch'], 1),
            5.0, smaller_is_better=False)
        add('throughput at largest batch / resnet101 (>= 0.8)',
            eff['throughput_img_s'] / max(plain['throughput_img_s'], 1e-9), 0.8, smaller_is_better=False)
    return targets


def format_table(results: Dict[str, Any]) -> str:
    """A plain-text table of the results and the targets."""
    cuda = results['command_args']['device'] == 'cuda'
    header = f'{"depth":>5}  {"configuration":<46} {"saved MiB":>10} {"peak MiB":>9} {"time x":>7} {"grad err":>9}'
    if cuda:
        header += f' {"max batch":>9} {"img/s":>8}'
    lines = [header]
    for r in results['rows']:
        err = f'{r["grad_rel_error"]:.1e}' if 'grad_rel_error' in r else '-'
        line = (f'{r["depth"]:>5}  {r["config"]:<46} {r["saved_bytes"] / MiB:10.1f} {r["peak_bytes"] / MiB:9.0f} '
                f'{r["time_ratio"]:7.2f} {err:>9}')
        if cuda and 'max_batch' in r:
            line += f' {r["max_batch"]:>9} {r["throughput_img_s"]:8.1f}'
        lines.append(line)
    lines.append('')
    for t in results['targets']:
        lines.append(f'[{"PASS" if t["pass"] else "MISS"}] {t["target"]}: {t["value"]:.3f} '
                     f'(margin {t["margin"]:+.3f})')
    return '\n'.join(lines)


def plot_results(results: Dict[str, Any], path: str) -> None:
    """Draw peak memory against depth and the step-time ratios, one line/bar group per configuration."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = results['rows']
    labels = list(dict.fromkeys(r['config'] for r in rows))
    depths = sorted({r['depth'] for r in rows})
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(labels):
        points = [(r['depth'], r['peak_bytes'] / MiB, r['time_ratio']) for r in rows if r['config'] == label]
        ax_mem.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=label)
        width = 0.8 / len(labels)
        ax_time.bar([depths.index(p[0]) + i * width for p in points], [p[2] for p in points], width, label=label)
    args = results['command_args']
    ax_mem.set(xlabel='depth', ylabel='peak step memory (MiB)', xticks=depths,
               title=f'batch {args["batch_size"]}, {args["img_size"]}px, {args["device"]}')
    ax_time.set(xlabel='depth', ylabel='step time / plain resnet', title=f'batch {args["time_batch_size"]}')
    ax_time.set_xticks([i + 0.4 - 0.4 / len(labels) for i in range(len(depths))], [str(d) for d in depths])
    ax_time.axhline(1.0, color='gray', lw=0.5)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png'))
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    try:
        results = run_benchmark(
            [m.strip() for m in args.models.split(',') if m.strip()], args.batch_size, args.img_size,
            args.device, args.amp, args.time_batch_size, args.warmup, args.steps)
    except ValueError as e:
        print(f'error: {e}', file=os.sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    if args.plot:
        plot_results(results, args.plot)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser('bench', help='memory, speed and gradient error against ResNet and checkpointing')
    parser.add_argument('--models', default='momentum_resnet50,momentum_resnet101,momentum_resnet152')
    parser.add_argument('--batch-size', type=int, default=16, help='batch of the memory measurements')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--amp', default=None, choices=sorted(AMP_DTYPES))
    parser.add_argument('--time-batch-size', type=int, default=4, help='batch of the timing and gradient runs')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--out', default=None, help='write the results as JSON')
    parser.add_argument('--plot', default=None, help='draw memory and time ratios as PNG')
    parser.set_defaults(func=_run)
