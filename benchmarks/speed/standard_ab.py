"""Interleaved A/B of a momentum mode's training step against its timm baseline (a measurement for issue 25, not a
shipped command).

Configurations with the same weights (``zero_init_last=False``), stepped in rotating order each round
(``timm_momentum.tools.timing``, as ``timm-momentum bench`` times them):

* ``plain``: timm's resnet{depth} (with ``--memory-efficient``: with ``set_grad_checkpointing()``);
* ``plain again``: a second, identical baseline, the control: its ratio to ``plain`` is what two equal
  configurations read on this machine, so the momentum ratio means something only outside that spread;
* ``momentum``: momentum_resnet{depth} in standard mode (with ``--memory-efficient``: memory-efficient mode), with
  this tree's core;
* ``momentum before`` (with ``--before DIR``): the same model run by an older core, ``DIR/timm_momentum/core`` of
  another checkout (``git worktree add /tmp/before <commit>``), loaded beside this one.

One step is SGD on the cross-entropy of a batch of 4 at 224². By default each configuration steps in a process of
its own, fresh for each repeat of ``--steps`` rounds; ``--one-process`` steps them all in this one (then they share
one heap). Prints per configuration the median wall seconds and minor page faults per step, and its ratio to
``plain``: the ratio of the medians, and the median, quartiles and range of the per-repeat ratios::

    PYTHONPATH=$PWD python benchmarks/speed/standard_ab.py --depth 101 --steps 10 --repeats 10 --threads 2
    PYTHONPATH=$PWD python benchmarks/speed/standard_ab.py --depth 101 --memory-efficient

``--alloc`` instead times ``a - b`` on a layer3-sized tensor (4×1024×14×14) into fresh memory that is kept, into
memory freed at once, and in place.
"""
import argparse
import functools
import importlib
import statistics
import sys
import time
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

import timm_momentum  # noqa: F401  (registers the models)
from timm_momentum.core.models import momentum_resnet
from timm_momentum.tools.memory import build_model
from timm_momentum.tools.timing import time_steps, time_steps_apart


def load_core(checkout: str):
    """The chain module of ``checkout``'s ``timm_momentum/core``, as a package of its own beside this tree's (its
    ``__init__``, which registers models with timm, is not run)."""
    package = types.ModuleType('core_before')
    package.__path__ = [str(Path(checkout) / 'timm_momentum' / 'core')]
    sys.modules['core_before'] = package
    return importlib.import_module('core_before.chain')


class Before(nn.Module):
    """A momentum model whose stages run an older core's ``momentum_chain``."""

    def __init__(self, model: nn.Module, checkout: str) -> None:
        super().__init__()
        self.model, self.chain = model, load_core(checkout).momentum_chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with mock.patch.object(momentum_resnet, 'momentum_chain', self.chain):
            return self.model(x)


def build(depth: int, momentum: bool, memory_efficient: bool, checkout: str = '') -> nn.Module:
    """resnet{depth}, or momentum_resnet{depth} with its weights (run by ``checkout``'s core, where given); with
    ``memory_efficient``, the one checkpointed and the other memory-efficient."""
    torch.manual_seed(0)
    plain = build_model(f'resnet{depth}', 'checkpoint' if memory_efficient else 'plain', zero_init_last=False)
    if not momentum:
        return plain
    model = build_model(f'momentum_resnet{depth}', 'memory_efficient' if memory_efficient else 'plain',
                        zero_init_last=False)
    model.load_state_dict(plain.state_dict())
    return (Before(model, checkout) if checkout else model).train()


def time_allocations(threads: int) -> None:
    torch.set_num_threads(threads)
    a = torch.randn(4, 1024, 14, 14)
    b = torch.randn_like(a)
    kept = []

    def per_call_ms(fn, calls=50):
        fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1000

    print(f'a - b on 4x1024x14x14, {threads} thread(s), ms per call:')
    print(f'  into fresh memory, kept: {per_call_ms(lambda: kept.append(a - b)):.3f}')
    kept.clear()
    print(f'  into memory freed at once: {per_call_ms(lambda: a - b):.3f}')
    print(f'  in place (a.sub_(b)): {per_call_ms(lambda: a.sub_(b)):.3f}')


def report(times, faults, args) -> None:
    where = 'one process' if args.one_process else 'fresh processes per configuration and repeat'
    mode = 'memory-efficient against checkpointing' if args.memory_efficient else 'standard against plain'
    print(f'resnet{args.depth}, {mode}, batch 4, 224², {args.threads} thread(s), {args.steps} interleaved rounds x '
          f'{args.repeats} repeats, {where}')
    plain = statistics.median(times['plain'])
    for name, seconds in times.items():
        wall = statistics.median(seconds)
        line = f'  {name:16s} wall {wall:.4f} s, {statistics.median(faults[name]):6.0f} page faults'
        if name != 'plain':
            ratios = sorted(mine / theirs for mine, theirs in zip(seconds, times['plain']))
            quartiles = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            line += (f'; / plain: ratio of medians {wall / plain:.4f}, '
                     f'per-repeat median {statistics.median(ratios):.4f}, IQR {quartiles[0]:.3f}-{quartiles[1]:.3f}, '
                     f'range {ratios[0]:.3f}-{ratios[-1]:.3f}')
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--depth', type=int, default=101)
    parser.add_argument('--steps', type=int, default=10, help='timed rounds per repeat')
    parser.add_argument('--repeats', type=int, default=6, help='blocks of --steps rounds, each with its own median')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--before', default='', help='a checkout whose core runs the "momentum before" configuration')
    parser.add_argument('--one-process', action='store_true', help='step every configuration in this process')
    parser.add_argument('--memory-efficient', action='store_true',
                        help='memory-efficient momentum against checkpointed resnet (default: standard against plain)')
    parser.add_argument('--alloc', action='store_true', help='time a - b into fresh, freed and its own memory')
    args = parser.parse_args()
    if args.alloc:
        time_allocations(args.threads)
        return
    torch.set_num_threads(args.threads)
    builders = {'plain': functools.partial(build, args.depth, False, args.memory_efficient),
                'plain again': functools.partial(build, args.depth, False, args.memory_efficient),
                'momentum': functools.partial(build, args.depth, True, args.memory_efficient)}
    if args.before:
        builders['momentum before'] = functools.partial(build, args.depth, True, args.memory_efficient, args.before)
    torch.manual_seed(1)
    x, target = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
    faults = {}
    if args.one_process:
        models = {name: make() for name, make in builders.items()}
        times = time_steps(models, x, target, None, 2, args.steps, repeats=args.repeats, faults=faults)
    else:
        times = time_steps_apart(builders, x, target, None, 2, args.steps, repeats=args.repeats, faults=faults)
    report(times, faults, args)


if __name__ == '__main__':
    main()
