"""Self CPU time per op of a few training steps of one configuration (``torch.profiler``), to see where a step's
time goes (benchmarks/MEASURE.md); a measurement for issue 25, not a shipped command::

    PYTHONPATH=$PWD python benchmarks/speed/profile_step.py --model momentum_resnet101 --mode memory_efficient
    PYTHONPATH=$PWD python benchmarks/speed/profile_step.py --model resnet101 --mode checkpoint

One SGD step on the cross-entropy of a batch of 4 at 224², ``zero_init_last=False``, after 2 warm-up steps; the
table sums ``--steps`` profiled steps. Run the configurations one after another on an idle machine.
"""
import argparse

import torch

from timm_momentum.tools.memory import build_model, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='momentum_resnet101')
    parser.add_argument('--mode', default='memory_efficient', help="tools.memory.build_model's mode")
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rows', type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, args.mode, zero_init_last=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, target = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
    for _ in range(2):
        train_step(model, x, target, optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(args.steps):
            train_step(model, x, target, optimizer)
    print(profile.key_averages().table(sort_by='self_cpu_time_total', row_limit=args.rows))


if __name__ == '__main__':
    main()
