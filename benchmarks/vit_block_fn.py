"""Step time of the Momentum ViT's two block functions, against timm's ViT plain and checkpointed (issue 23's
choice of the default block function).

    python benchmarks/vit_block_fn.py [--model vit_base_patch16_224] [--img-size 224] [--batch-size 4]

On CPU (fp32), in one process: timm's ViT plain and with ``set_grad_checkpointing()``, and the Momentum ViT in
memory-efficient mode with the drop-in block function (f(x) = block(x) - x, one chain step per block) and the split
one (attention and MLP as two steps), all from the same weights. Rounds time one SGD step of each (A B C D, then
B C D A, ...; ``timm_momentum.tools.timing.time_steps``), after a warm-up round; each repeat's median per
configuration, then its ratio to plain and to checkpointing in the same repeat. The peak memory of the same
configurations is ``vit_peak_profile.py``'s.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='vit_base_patch16_224')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--steps', type=int, default=5, help='timed rounds per repeat')
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args(argv)
    from timm_momentum.tools.memory import build_model
    from timm_momentum.tools.timing import time_steps

    torch.manual_seed(0)
    models = {'vit': build_model(args.model, 'plain', img_size=args.img_size),
              'vit+checkpointing': build_model(args.model, 'checkpoint', img_size=args.img_size)}
    for block_fn in ('dropin', 'split'):
        momentum = build_model('momentum_' + args.model, 'memory_efficient', img_size=args.img_size,
                               block_fn=block_fn)
        momentum.load_state_dict(models['vit'].state_dict())
        models[f'momentum {block_fn}'] = momentum
    models['vit+checkpointing'].load_state_dict(models['vit'].state_dict())
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(0, 1000, (args.batch_size,))
    labels = list(models)
    print(f'{args.model} at {args.img_size}², batch {args.batch_size}, cpu fp32, {torch.get_num_threads()} threads, '
          f'load {os.getloadavg()[0]:.1f}', flush=True)
    medians = time_steps(models, x, target, None, warmup=1, steps=args.steps, repeats=args.repeats)
    rows = []
    print(f'{"configuration":<20} {"step s":>7} {"× plain":>8} {"× checkpointing":>16}   (per repeat)')
    for label in labels:
        plain = [a / b for a, b in zip(medians[label], medians['vit'])]
        ckpt = [a / b for a, b in zip(medians[label], medians['vit+checkpointing'])]
        rows.append({'config': label, 'step_seconds': medians[label], 'x_plain': plain, 'x_checkpointing': ckpt})
        print(f'{label:<20} {statistics.median(medians[label]):7.2f} {statistics.median(plain):8.3f} '
              f'{statistics.median(ckpt):16.3f}   ({", ".join(f"{r:.3f}" for r in ckpt)})')
    print(f'load at end {os.getloadavg()[0]:.1f}')
    print(json.dumps(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
