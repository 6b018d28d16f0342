"""Interleaved A/B of standard mode's training step (one-off measurement for issue 25; not a shipped command).

Three configurations with the same weights (``zero_init_last=False``), stepped in rotating order each round:
resnet{depth} plain; momentum_resnet{depth} in standard mode with the step of 2026-12-02 (``old``: f = block(x) - x
and v each a new tensor, ``forward_step`` out of place); and the same model with today's ``kernels._next``
(``new``: v updated in place, the subtraction folded into it). One step is ``model(x).sum().backward()`` at batch 4,
224². Prints, per configuration, the median CPU seconds (user + sys of this process) and wall seconds per step,
and each momentum configuration's ratio to plain: the ratio of the medians, and the median, quartiles and range of
the per-round ratios::

    PYTHONPATH=$PWD python benchmarks/speed/standard_ab.py --depth 101 --rounds 15 --threads 1
"""
import argparse
import resource
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--depth', type=int, default=101)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
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
