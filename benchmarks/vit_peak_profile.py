"""Where a ViT training step's peak memory comes from, per configuration (issue 23's profile of a missed target).

    python benchmarks/vit_peak_profile.py [--model vit_base_patch16_224] [--img-size 224] [--batch-size 16]

For timm's ViT plain and with ``set_grad_checkpointing()`` and the Momentum ViT in memory-efficient mode with each
block function (drop-in: one chain step per block; split: attention and MLP as two steps), each in a fresh
subprocess on CPU (fp32) with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``timm-momentum bench`` measures, so freed
tensors leave the resident set): after one warm-up step, the peak resident memory above the state before the step
(``VmHWM``, reset after the warm-up) at the end of the forward and of the backward, next to the bytes of the
parameter gradients (which every configuration holds at the end of backward) and the bytes saved for backward.
For the momentum rows, the resident memory when the backward starts to recompute each of the chain's last two
steps (where the step peaks: nearly all parameter gradients are there) shows what the chain holds beside them.
"""
import argparse
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Dict

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2 ** 20
CONFIGS = (('vit', 'plain', None), ('vit+checkpointing', 'checkpoint', None),
           ('momentum drop-in memory-efficient', 'memory_efficient', 'dropin'),
           ('momentum split memory-efficient', 'memory_efficient', 'split'))


def _measure(spec: Dict[str, Any], queue: Any) -> None:
    import timm_momentum.core.chain as chain
    from timm_momentum.tools.memory import build_model, reset_peak_rss, saved_tensor_bytes, vm_hwm_bytes

    torch.manual_seed(0)
    momentum = spec['block_fn'] is not None
    kwargs = dict(block_fn=spec['block_fn']) if momentum else {}
    model = build_model('momentum_' + spec['model'] if momentum else spec['model'], spec['mode'],
                        img_size=spec['img_size'], **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(spec['batch_size'], 3, spec['img_size'], spec['img_size'])
    target = torch.randint(0, 1000, (spec['batch_size'],))
    at_recompute: Dict[int, int] = {}
    pull_back = chain._pull_back

    def traced(ctx, n, x_in, adjoint):  # the resident memory as the backward starts on chain step n
        at_recompute[n] = _rss_bytes()
        return pull_back(ctx, n, x_in, adjoint)

    chain._pull_back = traced
    for _ in range(2):  # warm-up, then the measured step
        optimizer.zero_grad(set_to_none=True)
        reset_peak_rss()
        before = vm_hwm_bytes()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        forward = vm_hwm_bytes() - before
        loss.backward()
        step = vm_hwm_bytes() - before
        optimizer.step()
    chain._pull_back = pull_back
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.zero_grad(set_to_none=True)
    saved = saved_tensor_bytes(model, x[:4], parameters=False)
    queue.put({'config': spec['label'], 'forward_peak_mib': forward / MiB, 'step_peak_mib': step / MiB,
               'param_grad_mib': grads / MiB, 'saved_mib_batch4': saved / MiB,
               'at_recompute_mib': {n: (at_recompute[n] - before) / MiB for n in sorted(at_recompute)[:2]}})


def _rss_bytes() -> int:
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmRSS'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='vit_base_patch16_224')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=16)
    args = parser.parse_args(argv)
    os.environ['MALLOC_MMAP_THRESHOLD_'] = '65536'  # read by each spawned process's allocator as it starts
    context = multiprocessing.get_context('spawn')
    rows = []
    print(f'{args.model} at {args.img_size}², batch {args.batch_size}, cpu fp32, {torch.get_num_threads()} threads, '
          f'load {os.getloadavg()[0]:.1f}')
    print(f'{"configuration":<36} {"forward peak":>12} {"step peak":>10} {"param grads":>11} {"saved (b4)":>10} '
          f'{"at step 1, 0 recompute":>22}  MiB')
    for label, mode, block_fn in CONFIGS:
        queue = context.Queue()
        spec = dict(vars(args), label=label, mode=mode, block_fn=block_fn)
        process = context.Process(target=_measure, args=(spec, queue))
        process.start()
        row = queue.get()
        process.join()
        rows.append(row)
        held = ', '.join(f'{mib:.0f}' for _, mib in sorted(row['at_recompute_mib'].items(), reverse=True))
        print(f'{label:<36} {row["forward_peak_mib"]:12.0f} {row["step_peak_mib"]:10.0f} '
              f'{row["param_grad_mib"]:11.0f} {row["saved_mib_batch4"]:10.1f} {held or "–":>22}', flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
