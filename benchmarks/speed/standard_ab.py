"""Interleaved A/B of standard mode's training step (one-off measurement for issue 25; not a shipped command).

Three configurations with the same weights (``zero_init_last=False``), stepped in rotating order each round:
resnet{depth} plain; momentum_resnet{depth} in standard mode with the step of 2026-12-02 (``old``: f = block(x) - x
and v each a new tensor, ``forward_step`` out of place); and the same model with today's ``kernels._next``
(``new``: v updated in place, the subtraction folded into it). One step is ``model(x).sum().backward()`` at batch 4,
224². Prints, per configuration, the median CPU seconds (user + sys of this process) and wall seconds per step,
and each momentum configuration's ratio to plain: the ratio of the medians, and the median, quartiles and range of
the per-round ratios::

    PYTHONPATH=$PWD python benchmarks/speed/standard_ab.py --depth 101 --rounds 15 --threads 1

``--alloc`` instead times ``a - b`` on a layer3-sized tensor (4×1024×14×14) into fresh memory that is kept, into
memory freed at once, and in place. ``--profile N`` instead profiles N steps each of plain and the new momentum step
(``torch.profiler``) and prints the ops whose summed self CPU time differs most between the two.
"""
import argparse
import resource
import statistics
import time
from collections import defaultdict

import torch
import timm

import timm_momentum  # noqa: F401  (registers the models)
from timm_momentum.core import kernels


def old_next(x, v, out, block_input, gamma):
    """The standard step before 2026-12-03: f and v new tensors."""
    return kernels.forward_step(x, v, out if block_input is None else out - block_input, gamma, inplace=False)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def profile_steps(models, x, steps: int) -> None:
    from torch.profiler import profile

    totals = {name: defaultdict(float) for name in models}
    for _ in range(steps):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            with profile() as prof:
                model(x).sum().backward()
            for event in prof.key_averages():
                totals[name][event.key] += event.self_cpu_time_total / 1000 / steps
    plain, momentum = totals['plain'], totals['new']
    print(f'self CPU ms per step, mean of {steps} profiled steps: plain {sum(plain.values()):.1f}, '
          f'momentum {sum(momentum.values()):.1f}')
    for key in sorted(set(plain) | set(momentum), key=lambda k: -abs(momentum[k] - plain[k]))[:20]:
        print(f'  {key[:60]:60s} plain {plain[key]:8.1f}  momentum {momentum[key]:8.1f}  '
              f'{momentum[key] - plain[key]:+8.1f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--depth', type=int, default=101)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--alloc', action='store_true', help='time a - b into fresh, freed and its own memory')
    parser.add_argument('--profile', type=int, default=0, metavar='N', help='profile N steps of plain and new')
    args = parser.parse_args()
    if args.alloc:
        time_allocations(args.threads)
        return
    torch.set_num_threads(args.threads)
    new_next = kernels._next
    plain = timm.create_model(f'resnet{args.depth}', zero_init_last=False)
    momentum = timm.create_model(f'momentum_resnet{args.depth}', zero_init_last=False)
    momentum.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 224, 224)

    def step(model, name):
        kernels._next = old_next if name == 'old' else new_next
        model.zero_grad(set_to_none=True)
        cpu, wall = _cpu(), time.perf_counter()
        model(x).sum().backward()
        return _cpu() - cpu, time.perf_counter() - wall

    configs = [('plain', plain.train()), ('old', momentum.train()), ('new', momentum)]
    for name, model in configs:  # warm-up: two steps each
        step(model, name)
        step(model, name)
    if args.profile:
        kernels._next = new_next
        profile_steps({'plain': plain, 'new': momentum}, x, args.profile)
        return
    times = {name: [] for name, _ in configs}
    for round_ in range(args.rounds):
        shift = round_ % len(configs)
        for name, model in configs[shift:] + configs[:shift]:
            times[name].append(step(model, name))
    kernels._next = new_next
    print(f'resnet{args.depth}, batch 4, 224², {args.threads} thread(s), {args.rounds} interleaved rounds')
    for index, what in ((0, 'cpu s'), (1, 'wall s')):
        medians = {name: statistics.median(t[index] for t in ts) for name, ts in times.items()}
        print(what, {name: round(m, 4) for name, m in medians.items()})
        for name in ('old', 'new'):
            ratios = sorted(b[index] / a[index] for a, b in zip(times['plain'], times[name]))
            quartiles = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            print(f'  {what} {name}/plain: ratio of medians {medians[name] / medians["plain"]:.4f}; per-round median '
                  f'{statistics.median(ratios):.4f}, IQR {quartiles[0]:.3f}-{quartiles[1]:.3f}, '
                  f'range {ratios[0]:.3f}-{ratios[-1]:.3f}')
        ratios = [b[index] / a[index] for a, b in zip(times['old'], times['new'])]
        print(f'  {what} new/old per-round median {statistics.median(ratios):.4f}, '
              f'range {min(ratios):.3f}-{max(ratios):.3f}')


if __name__ == '__main__':
    main()
