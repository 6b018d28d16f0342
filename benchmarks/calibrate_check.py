"""One-off calibration of the memory-efficient backward's self-check (issue #10, item 4); not shipped.

For a randomly initialised momentum ResNet (zero_init_last=False, the bench's weights), records each
inverted chain's reconstruction gap (the sketch distance of the rebuilt chain input, and the stored-state
gaps) and the gradient error against standard backprop, with the shipped carrier and with a float32
carrier forced (the failure the check must catch)::

    PYTHONPATH=$PWD python benchmarks/calibrate_check.py --model momentum_resnet101 --img 112 --batch 4

``--float64 --seeds N`` also computes float64 standard backprop's gradients for N input seeds and gives each
mode's distance from them, which says whether a gap made the memory-efficient gradients worse than float32
standard backprop's own rounding (in random networks that is itself 0.5-1%).
"""
import argparse
import copy
import warnings
from unittest import mock

import timm
import torch
import torch.nn as nn

import timm_momentum  # noqa: F401
from timm_momentum.core import chain as invertible


def run(model_name: str, img: int, batch: int, gamma: float, force_float32: bool, seed: int = 0,
        float64: bool = False):
    torch.manual_seed(0)
    standard = timm.create_model(model_name, gamma=gamma, zero_init_last=False)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, img, img)
    target = torch.randint(0, 1000, (batch,))
    grads = []
    gaps = []
    real_plan = invertible.plan_chain

    def plan(*args, **kwargs):
        chain = real_plan(*args, **kwargs)
        if force_float32 and not chain.store_inputs:
            return invertible.ChainPlan(torch.float32, chain.span, False)
        return chain

    def record(gap, work_dtype, gamma, num_blocks):
        gaps.append((num_blocks, float(gap)))

    for model in (standard, efficient):
        torch.manual_seed(1)
        with mock.patch.object(invertible, 'plan_chain', plan), \
                mock.patch.object(invertible, '_report_reconstruction', record), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            nn.functional.cross_entropy(model(x), target).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    if not float64:
        return error, gaps, None
    reference = copy.deepcopy(standard).double()
    nn.functional.cross_entropy(reference(x.double()), target).backward()
    exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
    return error, gaps, [float((g - exact).norm() / exact.norm()) for g in grads]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='momentum_resnet101')
    parser.add_argument('--img', type=int, default=112)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--gammas', default='0.9')
    parser.add_argument('--seeds', type=int, default=1, help='input seeds (the weights stay those of seed 0)')
    parser.add_argument('--float64', action='store_true', help='also give each mode\'s distance from float64 backprop')
    args = parser.parse_args()
    for gamma in [float(g) for g in args.gammas.split(',')]:
        for seed in range(args.seeds):
            for force in (False, True):
                error, gaps, exact = run(args.model, args.img, args.batch, gamma, force, seed, args.float64)
                from_float64 = '' if exact is None else \
                    f'; from float64: standard {exact[0]:.2e}, memory-efficient {exact[1]:.2e}'
                print(f'{args.model} {args.img}px batch {args.batch} gamma {gamma} input seed {seed} '
                      f'{"float32 carrier forced" if force else "shipped carrier"}: gradient rel. error {error:.2e}; '
                      f'gaps (blocks, gap) {[(n, f"{g:.2e}") for n, g in gaps]}{from_float64}', flush=True)


if __name__ == '__main__':
    main()
