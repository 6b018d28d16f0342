"""Which state should a memory-efficient chain carry under half-precision autocast?

For each upstream ResNet trained by ``benchmarks/fidelity.py`` (its ``upstream/resnetD/final`` folders), at
gamma 0.9 and at the faithful policy, under bfloat16 and float16 CPU autocast, on 16 Fashion-MNIST training
images (train mode, one step): the relative error of the input gradient and of all parameter gradients (as
one vector) against float32 standard backprop, for standard backprop under autocast and for memory-efficient
backprop with the float64 state ``plan_chain`` carries under autocast and with a float32 state instead (what
it carried before, with its 2^8 amplification bound); the largest reconstruction gaps the backward's
self-check reported (none: at most its warning level) and the MiB saved for backward.

The float32 state is forced by patching ``timm_momentum.core.chain._carrier`` and ``_AMPLIFICATION_LIMIT``,
private names: this is an experiment on the plan, not an API.

    OMP_NUM_THREADS=1 python benchmarks/half_carrier.py --upstream benchmarks/fidelity/upstream \
        --out benchmarks/fidelity/half_carrier
"""
import argparse
import contextlib
import copy
import json
import re
import warnings
from pathlib import Path
from unittest import mock

import timm
import torch

import timm_momentum  # noqa: F401
import timm_momentum.core.chain as invertible
from timm_momentum.tools.data import FashionMNIST
from timm_momentum.tools.memory import MiB, saved_tensor_bytes

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def _run(model, images, labels, memory_efficient, dtype):
    net = copy.deepcopy(model).train()
    net.set_momentum(memory_efficient=memory_efficient)
    x = images.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
        loss.backward()
    gaps = [float(m.group(1)) for w in caught if (m := re.search(r'relative error (\S+) \(', str(w.message)))]
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in net.parameters()]).double()
    return grads, x.numel(), gaps


def _saved_mib(model, images, dtype):
    net = copy.deepcopy(model).train()
    net.set_momentum(memory_efficient=True)
    with torch.autocast('cpu', dtype=dtype):
        return saved_tensor_bytes(net, images) / MiB


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--upstream', required=True, help='folder of upstream/resnetD/final folders')
    parser.add_argument('--depths', default='50,101,152')
    parser.add_argument('--out', required=True, help='writes OUT.jsonl and OUT.md')
    args = parser.parse_args(argv)
    train = FashionMNIST('train', img_size=32, limit=2048)
    images, labels = train.batch(slice(-16, None)), train.targets[-16:]
    lines = []
    for depth in map(int, args.depths.split(',')):
        source = timm.create_model(f'local-dir:{Path(args.upstream) / f"resnet{depth}" / "final"}', pretrained=True)
        for gamma in (0.9, 'auto'):
            model = timm.create_model(f'momentum_resnet{depth}', num_classes=10, gamma=gamma)
            model.load_state_dict(source.state_dict())
            reference, n, _ = _run(model, images, labels, False, None)
            for name, dtype in DTYPES.items():
                standard, _, _ = _run(model, images, labels, False, dtype)
                record = {'depth': depth, 'gamma': gamma, 'stage_gamma': model.momentum_cfg['gamma'],
                          'autocast': name,
                          'standard': {'input': _rel(standard[:n], reference[:n]),
                                       'params': _rel(standard[n:], reference[n:])}}
                for state in ('float64', 'float32'):
                    with _state(state):
                        efficient, _, gaps = _run(model, images, labels, True, dtype)
                        mib = _saved_mib(model, images, dtype)
                    record[f'{state}_state'] = {'input': _rel(efficient[:n], reference[:n]),
                                                'params': _rel(efficient[n:], reference[n:]),
                                                'gaps': gaps, 'saved_mib': round(mib, 3)}
                print(json.dumps(record), flush=True)
                lines.append(record)
    out = Path(args.out)
    for suffix, text in (('.jsonl', ''.join(json.dumps(r) + '\n' for r in lines)), ('.md', format_markdown(lines))):
        tmp = out.with_name(out.name + suffix + '.tmp')
        tmp.write_text(text)
        tmp.replace(out.with_name(out.name + suffix))
    print(format_markdown(lines))
    return 0


def format_markdown(records):
    rows = ['# Which state under half-precision autocast', '',
            'Relative gradient errors against float32 standard backprop (parameters / input), 16 Fashion-MNIST '
            'training images, upstream ResNets of `benchmarks/fidelity.py`; gaps: what the self-check reported '
            'past its warning level; MiB saved for backward. Command: `benchmarks/half_carrier.py`.', '',
            '| depth | γ | autocast | standard | float64 state | gaps | MiB | float32 state | gaps | MiB |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for r in records:
        cells = [str(r['depth']), str(r['gamma']), r['autocast'], _pair(r['standard'])]
        for state in ('float64', 'float32'):
            s = r[f'{state}_state']
            cells += [_pair(s), ', '.join(f'{g:.3g}' for g in s['gaps']) or 'none', f"{s['saved_mib']:.2f}"]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows) + '\n'


def _pair(errors):
    return f"{errors['params']:.3f} / {errors['input']:.3f}"


def _state(state):
    """The plan's own float64 state, or the float32 state (with its 2^8 bound) forced in its place."""
    if state == 'float64':
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(invertible, '_carrier', lambda work_dtype: (
        torch.float32 if work_dtype in (torch.bfloat16, torch.float16) else torch.float64)))
    stack.enter_context(mock.patch.dict(invertible._AMPLIFICATION_LIMIT, {torch.float32: 2.0 ** 8}))
    return stack


if __name__ == '__main__':
    raise SystemExit(main())
