"""One-off measurements for issue #10 (speed of the momentum arithmetic); not a shipped command.

Three parts:

* ``passes``: deterministic. Runs one training step of a momentum chain of 1x1 convolutions (so that a
  block's own work is one ``convolution`` forward and one ``convolution_backward``) and counts, per block,
  every other aten kernel that touches an activation-sized tensor, with the bytes it reads and writes per
  activation element. That is the momentum arithmetic's memory traffic, in both modes::

      PYTHONPATH=$PWD python benchmarks/speed_ab.py passes

* ``time``: interleaved A/B of training steps (forward, backward, SGD step) of resnet{depth} plain, with
  timm's ``set_grad_checkpointing``, momentum standard and momentum memory-efficient, all with the same
  weights (``zero_init_last=False``), median of ``--steps`` after a warm-up, each as a ratio to plain;
  then one ``torch.profiler`` step of each, top ops by self CPU time::

      PYTHONPATH=$PWD python benchmarks/speed_ab.py time --depths 101,152 --steps 5 --threads 2

  ``--fused`` adds both momentum modes again with compiled fused element-wise steps (``kernels.set_fused``).
  ``--before path/to/old/invertible.py`` adds two configurations that run the standard and the
  memory-efficient chains with that file's ``momentum_chain`` (same weights, same process, interleaved),
  for before/after ratios under the same load. ``--cpu-time --threads 1`` times steps by the process's
  CPU seconds, which other jobs on a shared machine barely move.

* ``kernels``: milliseconds per training step spent in each element-wise step of ``timm_momentum.core.kernels``,
  eager and compiled (``set_fused``), in alternating steps of one memory-efficient model::

      PYTHONPATH=$PWD python benchmarks/speed_ab.py kernels --depth 101 --threads 2
"""
import argparse
import os
import resource
import statistics
import time
from collections import defaultdict
from typing import Dict, List

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

IGNORED = {'aten.convolution.default', 'aten.convolution_backward.default', 'aten.detach.default',
           'aten.view.default', 'aten._to_copy.default', 'aten.empty_like.default', 'aten.empty.memory_format',
           'aten.empty_strided.default', 'aten.alias.default', 'aten.t.default', 'aten.ones_like.default',
           'aten.zeros_like.default', 'aten.as_strided.default', 'aten.slice.Tensor', 'aten._unsafe_view.default',
           'aten.expand.default', 'aten.new_zeros.default'}  # views and 0-dim tensors move no activation bytes


class PassCounter(TorchDispatchMode):
    """Counts aten kernels that read or write a tensor of ``numel`` elements, and their bytes."""

    def __init__(self, numel: int, param_numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.param_numel = param_numel
        self.kernels: Dict[str, int] = defaultdict(int)
        self.param_kernels: Dict[str, int] = defaultdict(int)
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name == 'aten._to_copy.default':
            name = 'aten.copy_ (dtype conversion)'
        elif name in IGNORED:
            return out
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if any(t.numel() == self.param_numel for t in inputs + outs):
            self.param_kernels[name] += 1
        if not any(t.numel() == self.numel for t in inputs + outs):
            return out
        self.kernels[name] += 1
        # bytes per element: each activation-sized storage read once and written once (an in-place or
        # out= op's output is also one of its inputs)
        read = {t.untyped_storage().data_ptr(): t.element_size() for t in inputs if t.numel() == self.numel}
        written = {t.untyped_storage().data_ptr(): t.element_size() for t in outs if t.numel() == self.numel}
        self.bytes += sum(read.values()) + sum(written.values())
        return out


def count_passes(memory_efficient: bool, blocks: int = 12, gamma: float = 0.9) -> Dict[str, float]:
    """Kernels and bytes per activation element, per block, of one training step of a 1x1-conv chain."""
    from timm_momentum.core.chain import momentum_chain

    torch.manual_seed(0)
    chain = [nn.Conv2d(16, 16, 1, bias=False) for _ in range(blocks)]
    x = torch.randn(2, 16, 10, 10, requires_grad=True)  # 3200 elements; a block has 256 parameters
    counter = PassCounter(x.numel(), chain[0].weight.numel())
    results = {}
    with counter:
        out = momentum_chain(x, chain, gamma, memory_efficient=memory_efficient)
    results['forward kernels'] = sum(counter.kernels.values()) / blocks
    results['forward bytes/elem'] = counter.bytes / blocks
    forward = dict(counter.kernels)
    counter.kernels.clear()
    counter.param_kernels.clear()
    counter.bytes = 0
    with counter:
        out.backward(torch.ones_like(out))
    results['backward kernels'] = sum(counter.kernels.values()) / blocks
    results['backward bytes/elem'] = counter.bytes / blocks
    results['backward parameter-sized kernels'] = sum(counter.param_kernels.values()) / blocks
    results['forward ops'] = {k: round(v / blocks, 2) for k, v in sorted(forward.items())}
    results['backward ops'] = {k: round(v / blocks, 2) for k, v in sorted(counter.kernels.items())}
    return results


class _WithChain(nn.Module):
    """Runs ``model`` with another implementation's ``momentum_chain`` in its stages."""

    def __init__(self, model: nn.Module, momentum_chain) -> None:
        super().__init__()
        self.model = model
        self.momentum_chain = momentum_chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from unittest import mock

        from timm_momentum.core.models import momentum_resnet

        with mock.patch.object(momentum_resnet, 'momentum_chain', self.momentum_chain):
            return self.model(x)


def _load_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location('invertible_before', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_steps(depths: List[int], steps: int, warmup: int, batch: int, img: int, top: int,
               before: str = '', cpu_time: bool = False, fused: bool = False) -> None:
    """Interleaved step times as ratios to plain, then a profiler table per configuration.

    ``cpu_time`` times each step by this process's CPU seconds instead of the wall clock: with one torch
    thread that is nearly blind to other processes on a shared machine (their cache and memory traffic
    still show), where wall-clock ratios swing by tens of percent. ``fused`` adds both momentum modes again
    with ``kernels.set_fused(True)`` (compiled fused element-wise steps), same models, interleaved.
    """
    clock = _cpu_seconds if cpu_time else time.perf_counter
    from torch.profiler import ProfilerActivity, profile

    import timm
    import timm_momentum
    from timm_momentum.core import kernels
    from timm_momentum.tools.memory import build_model, train_step

    print(f'timm_momentum from {timm_momentum.__file__}; torch {torch.__version__}, timm {timm.__version__}')

    configs = {'plain': ('resnet', 'plain'), 'checkpointing': ('resnet', 'checkpoint'),
               'momentum standard': ('momentum_resnet', 'plain'),
               'momentum memory-efficient': ('momentum_resnet', 'memory_efficient')}
    for depth in depths:
        torch.manual_seed(0)
        state = build_model(f'resnet{depth}', 'plain', zero_init_last=False).state_dict()
        models = {}
        for label, (family, mode) in configs.items():
            models[label] = build_model(f'{family}{depth}', mode)
            models[label].load_state_dict(state)
        if before:
            old_chain = _load_module(before).momentum_chain
            for label, mode in (('momentum standard, before', 'plain'), ('memory-efficient, before', 'memory_efficient')):
                old = build_model(f'momentum_resnet{depth}', mode)
                old.load_state_dict(state)
                models[label] = _WithChain(old, old_chain)
        if fused:
            models['momentum standard, fused'] = models['momentum standard']
            models['momentum memory-efficient, fused'] = models['momentum memory-efficient']
        x = torch.randn(batch, 3, img, img)
        target = torch.randint(0, 1000, (batch,))
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
        times: Dict[str, List[float]] = {k: [] for k in models}
        for step in range(warmup + steps):
            for label, model in models.items():
                kernels.set_fused(label.endswith(', fused'))
                start = clock()
                train_step(model, x, target, optimizers[label])
                if step >= warmup:
                    times[label].append(clock() - start)
        plain = statistics.median(times['plain'])
        print(f'\n== resnet{depth}, batch {batch}, {img}px, {torch.get_num_threads()} threads, '
              f'median of {steps} interleaved steps, {"CPU" if cpu_time else "wall"} time, '
              f'load average {os.getloadavg()[0]:.1f}')
        for label, values in times.items():
            ratios = [v / plain for v in values]
            print(f'{label:<28} {statistics.median(values) / plain:6.3f}x plain   '
                  f'(per-step ratios {min(ratios):.2f}..{max(ratios):.2f}, median {statistics.median(values):.3f} s)')
        me, ck = statistics.median(times['momentum memory-efficient']), statistics.median(times['checkpointing'])
        print(f'memory-efficient / checkpointing: {me / ck:.3f}x')
        if before:
            old = statistics.median(times['memory-efficient, before'])
            print(f'memory-efficient before / checkpointing: {old / ck:.3f}x; after / before: {me / old:.3f}x')
            std, old_std = (statistics.median(times[k]) for k in ('momentum standard', 'momentum standard, before'))
            print(f'momentum standard after / before: {std / old_std:.3f}x')
        if fused:
            for label in ('momentum standard', 'momentum memory-efficient'):
                ratio = statistics.median(times[label + ', fused']) / statistics.median(times[label])
                print(f'{label}, fused / eager kernels: {ratio:.3f}x')
        kernels.set_fused(False)
        for label, model in models.items() if top else ():
            kernels.set_fused(label.endswith(', fused'))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(model, x, target, optimizers[label])
            print(f'\n-- profile: resnet{depth} {label}')
            print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=top))


def kernel_times(depth: int, steps: int, batch: int, img: int) -> None:
    """Milliseconds per training step spent in each element-wise step of ``timm_momentum.core.kernels``, eager and
    compiled, steps alternating in one process (memory-efficient momentum_resnet{depth})."""
    from timm_momentum.core import kernels
    from timm_momentum.tools.memory import build_model, train_step

    spent: Dict[tuple, float] = defaultdict(float)
    call = kernels._call

    def timed(kernel, *args):
        start = time.perf_counter()
        result = call(kernel, *args)
        spent[kernels.fused_enabled(), kernel.__name__] += time.perf_counter() - start
        return result

    model = build_model(f'momentum_resnet{depth}', 'memory_efficient')
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, target = torch.randn(batch, 3, img, img), torch.randint(0, 1000, (batch,))
    step_times: Dict[bool, List[float]] = {False: [], True: []}
    kernels._call = timed
    try:
        for step in range(steps + 1):  # the first of each is a warm-up (and the compile)
            for fused in (False, True):
                kernels.set_fused(fused)
                start = time.perf_counter()
                train_step(model, x, target, optimizer)
                if step:
                    step_times[fused].append(time.perf_counter() - start)
            if not step:
                spent.clear()
    finally:
        kernels._call = call
        kernels.set_fused(False)
    print(f'momentum_resnet{depth}, memory-efficient, batch {batch}, {img}px, {torch.get_num_threads()} threads, '
          f'{steps} steps each, load average {os.getloadavg()[0]:.1f}: ms per step')
    names = sorted({name for _, name in spent})
    for name in names:
        print(f'  {name:<34} eager {spent[False, name] / steps * 1e3:6.1f}   compiled {spent[True, name] / steps * 1e3:6.1f}')
    print(f'  {"all steps":<34} eager {sum(spent[False, n] for n in names) / steps * 1e3:6.1f}   '
          f'compiled {sum(spent[True, n] for n in names) / steps * 1e3:6.1f}')
    print(f'  training step median: eager {statistics.median(step_times[False]):.3f} s, '
          f'compiled {statistics.median(step_times[True]):.3f} s')
    # the same forward update alone, on a layer3-sized state that stays warm in cache between repeats
    shape = (batch, 1024, img // 16, img // 16)
    x, velocity = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    out, block_input = torch.randn(shape), torch.randn(shape)
    alone = {}
    for fused in (False, True):
        kernels.set_fused(fused)
        kernels.forward_update(x, velocity, out, block_input, 0.9, torch.float32)  # compiles once
        repeats = []
        for _ in range(40):
            start = time.perf_counter()
            kernels.forward_update(x, velocity, out, block_input, 0.9, torch.float32)
            repeats.append(time.perf_counter() - start)
        alone[fused] = statistics.median(repeats)
    kernels.set_fused(False)
    print(f'  forward update alone on {tuple(shape)}, median of 40: eager {alone[False] * 1e3:.2f} ms, '
          f'compiled {alone[True] * 1e3:.2f} ms')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='what', required=True)
    sub.add_parser('passes')
    per_kernel = sub.add_parser('kernels', help='time each element-wise step in a training step, eager and compiled')
    per_kernel.add_argument('--depth', type=int, default=101)
    per_kernel.add_argument('--steps', type=int, default=6)
    per_kernel.add_argument('--batch', type=int, default=4)
    per_kernel.add_argument('--img', type=int, default=224)
    per_kernel.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    timing = sub.add_parser('time')
    timing.add_argument('--depths', default='101,152')
    timing.add_argument('--steps', type=int, default=5)
    timing.add_argument('--warmup', type=int, default=1)
    timing.add_argument('--batch', type=int, default=4)
    timing.add_argument('--img', type=int, default=224)
    timing.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    timing.add_argument('--top', type=int, default=15)
    timing.add_argument('--before', default='', help='an older invertible.py to time alongside')
    timing.add_argument('--no-profile', action='store_true')
    timing.add_argument('--cpu-time', action='store_true', help='time steps by process CPU seconds (use --threads 1)')
    timing.add_argument('--fused', action='store_true', help='also time both momentum modes with compiled fused kernels')
    args = parser.parse_args()
    if args.what == 'kernels':
        if args.threads:
            torch.set_num_threads(args.threads)
        kernel_times(args.depth, args.steps, args.batch, args.img)
    elif args.what == 'passes':
        for memory_efficient in (False, True):
            result = count_passes(memory_efficient)
            print(f"{'memory-efficient' if memory_efficient else 'standard'}: per block")
            for key, value in result.items():
                print(f'  {key}: {value}')
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        time_steps([int(d) for d in args.depths.split(',')], args.steps, args.warmup, args.batch, args.img,
                   0 if args.no_profile else args.top, args.before, args.cpu_time, args.fused)


if __name__ == '__main__':
    main()
