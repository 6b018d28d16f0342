"""The fidelity table: what converting a pretrained ResNet into a Momentum ResNet keeps, on real data.

    python benchmarks/fidelity.py [--depths 18,50,101,152] [--out benchmarks/fidelity]

1. Upstreams. A plain timm ResNet per depth is trained on Fashion-MNIST (all 60000 training images, 32x32,
   3 channels) by ``timm_momentum.tools.finetune`` with one fixed recipe (below), and exported to
   ``OUT/upstream/resnetD/final``. Nothing is chosen on the test split: the epochs are fixed beforehand and the
   last epoch is kept. An upstream already there is reused.
2. Conversions. Each upstream goes through ``timm_momentum.tools.convert`` at gamma 0.9, at 0.5 and under the faithful
   policy 'auto', each unhealed, after BatchNorm recalibration and after distillation, and unhealed at the float64
   floor (the smallest gamma a float64 state inverts without extra states), and is loaded back from the folder
   with ``local-dir:``.
3. Measurements, each against the upstream on the same test images: top-1, top-1 agreement with the upstream,
   KL(upstream || converted), the per-stage gamma, the memory-efficient gradient error against standard backprop
   (input and worst parameter, relative, float32, and under bfloat16 autocast for the policy, on training images),
   the bytes saved for backward in memory-efficient mode (float32 and bfloat16 autocast), and a short
   memory-efficient fine-tune from the unhealed conversion: the largest reconstruction gap its backward saw.
4. Headroom. On every chain that inverts, gamma = B^(-1/N) for amplification budgets B from 2^4 to 2^24, the
   largest reconstruction gap during the same fine-tune: what the policy's budget (2^8) rests on.

Writes ``OUT/records/resnetD.json`` per depth (every record; a depth or part already there is not measured again,
unless ``--again`` names it)
and ``OUT/fidelity.md`` (the tables, from every depth measured). Run it on a quiet machine if
its times are to mean anything; the figures themselves do not depend on load.
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timm_momentum.tools.data import FASHION_MNIST  # noqa: E402
from timm_momentum.tools.files import atomic_write  # noqa: E402

# One recipe for every depth, fixed before any run: SGD with momentum, cosine, no warm-up (timm's
# zero-initialised last BatchNorm of each block keeps deep nets stable from the first step). Epochs by depth,
# for the CPU budget: 2 for resnet18/50, 1 for resnet101/152.
UPSTREAM_RECIPE: Dict[str, Any] = dict(
    dataset=FASHION_MNIST, img_size=32, in_chans=3, batch_size=128, opt='sgd', lr=0.05, momentum=0.9,
    weight_decay=5e-4, sched='cosine', warmup_epochs=0, device='cpu', amp='none', seed=0, progress=False,
    plots=False, checkpoints=False, workers=0)
UPSTREAM_EPOCHS = {18: 2, 50: 2, 101: 1, 152: 1}


def train_plain(model: str, folder: Path, epochs: int, described: Dict[str, Any], **overrides: Any) -> Dict[str, Any]:
    """Train (or reuse) the plain timm ``model`` upstream in ``folder`` with UPSTREAM_RECIPE (and ``overrides``);
    returns its summary: ``described``, its test top-1, and the wall and CPU seconds it took."""
    from timm_momentum.tools.finetune import DEFAULTS, train

    summary_path = folder / 'upstream.json'
    if (folder / 'final' / 'model.safetensors').is_file() and summary_path.is_file():
        return {**json.loads(summary_path.read_text()), **described}
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(dict(DEFAULTS, model=model, output=str(folder), epochs=epochs, **{**UPSTREAM_RECIPE, **overrides}))
    summary = {'model': model, **described, 'test_top1': result['metrics']['val_acc'], 'epochs': epochs,
               'wall_s': time.perf_counter() - started, 'cpu_s': time.process_time() - cpu_started,
               'threads': torch.get_num_threads()}
    atomic_write(summary_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(f"{model}: {summary['test_top1']:.2f} % test top-1, {summary['wall_s'] / 60:.1f} min "
          f"({summary['cpu_s'] / 60:.1f} CPU min)", flush=True)
    return summary


def train_upstream(depth: int, out: Path) -> Dict[str, Any]:
    """Train (or reuse) the plain resnet<depth> upstream; returns its metrics and the CPU seconds it took."""
    return train_plain(f'resnet{depth}', out / 'upstream' / f'resnet{depth}', UPSTREAM_EPOCHS.get(depth, 1),
                       {'depth': depth})


def against_reference(converted: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 of ``converted`` logits on ``labels``, and their top-1 agreement and KL(reference || converted)."""
    return {'top1': float((converted.argmax(-1) == labels).float().mean()),
            'agreement': float((converted.argmax(-1) == reference.argmax(-1)).float().mean()),
            'kl': float(torch.nn.functional.kl_div(converted.log_softmax(-1), reference.log_softmax(-1),
                                                   log_target=True, reduction='batchmean'))}


# 'float64 floor': per chain, 0 where it stores its inputs, else the smallest gamma whose inverse a float64 state
# carries without extra states (min_safe_gamma, 2^(-24/N)); the faithful policy's candidate before measurement
GAMMAS = (0.9, 0.5, 'auto', 'float64 floor')
HEALING = {'none': {}, 'bn': {'recalibrate_bn': True}, 'distill': {'distill_steps': 100}}
GRAD_IMAGES = 16  # training images for the gradient check and the saved bytes


def logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def grad_error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Relative error of memory-efficient gradients against standard backprop's (input and worst parameter)."""
    import copy
    import warnings

    grads = []
    for memory_efficient in (False, True):
        net = copy.deepcopy(model).train()
        net.set_momentum(memory_efficient=memory_efficient)
        x = images.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # a reconstruction warning shows in the figure itself
            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
        loss.backward()
        grads.append([x.grad] + [p.grad for p in net.parameters()])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    standard, efficient = grads
    return {'input': rel(efficient[0], standard[0]),
            'worst_param': max(rel(e, s) for e, s in zip(efficient[1:], standard[1:]) if s is not None)}


TRAIN_STEPS = 30  # memory-efficient SGD steps at the policy's gamma, to see the inverse hold as weights move


def fine_tune(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = TRAIN_STEPS
               ) -> Dict[int, List[float]]:
    """Fine-tune ``model`` in place, memory-efficiently, for ``steps`` SGD steps (lr 0.01, batch 32); the relative
    reconstruction gaps of every backward as the self-check measured them (recorded, not raised), by chain length."""
    from unittest import mock

    from timm_momentum.core import chain as invertible

    model.train().set_momentum(memory_efficient=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    gaps: Dict[int, List[float]] = {}

    def record(gap: float, work_dtype: torch.dtype, gamma: float, num_blocks: int) -> None:
        gaps.setdefault(num_blocks, []).append(gap)

    with mock.patch.object(invertible, '_check_reconstruction', record):
        for _ in range(steps):
            index = torch.randint(0, len(images), (32,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return gaps


def train_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    """Fine-tune a copy: the largest reconstruction gap (the self-check warns past 5e-6 and raises past 5e-5 for
    float32 work) and, where none raised, the gradient error against standard backprop afterwards."""
    import copy

    net = copy.deepcopy(model)
    gaps = fine_tune(net, images, labels)
    result: Dict[str, Any] = {'steps': TRAIN_STEPS, 'max_gap': max((g for by in gaps.values() for g in by), default=0.0)}
    if result['max_gap'] <= 5e-5:
        result['grad_error_after'] = grad_error(net, images[:GRAD_IMAGES], labels[:GRAD_IMAGES])
    return result


HEADROOM_BUDGETS = (6, 8, 10, 12, 16, 24)  # log2 of gamma^-N
# A rebuilt input's rounding flips are chaotic in gamma: each budget is tried at a few gammas a hair apart
HEADROOM_SAMPLES = (1.0, 1.0001, 1.0003, 1.001)
HEADROOM_STEPS = 10


def measure_headroom(depth: int, out: Path, budgets: Sequence[int] = HEADROOM_BUDGETS) -> List[Dict[str, Any]]:
    """How exactly each chain of the upstream that inverts rebuilds its input during memory-efficient fine-tuning,
    by how much gamma^-N amplifies rounding: gamma = 2^(-k/N) * s on that chain (the others at the policy) for each
    k in ``budgets`` and s in HEADROOM_SAMPLES, HEADROOM_STEPS SGD steps each, the largest relative reconstruction
    gap the backward's self-check saw on that chain."""
    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.core import chain as invertible
    from timm_momentum.tools.data import FashionMNIST

    source = timm.create_model(f'local-dir:{out / "upstream" / f"resnet{depth}" / "final"}', pretrained=True)
    train = FashionMNIST('train', img_size=32, limit=2048)
    images, labels = train.batch(slice(None)), train.targets
    records = []
    probe = timm.create_model(f'momentum_resnet{depth}', num_classes=10)
    chains = {name: len(stage) - 1 for name, stage in zip(('layer1', 'layer2', 'layer3', 'layer4'), probe.stages)}
    for stage, blocks in chains.items():
        if invertible.plan_chain(0.9, blocks).store_inputs:
            continue  # never inverts
        for budget in budgets:
            for sample in HEADROOM_SAMPLES:
                gamma = 2.0 ** (-budget / blocks) * sample * (1 + 1e-9)
                model = timm.create_model(f'momentum_resnet{depth}', num_classes=10, gamma='auto')
                model.load_state_dict(source.state_dict())
                model.set_momentum(gamma=[gamma if name == stage else g
                                          for name, g in zip(chains, model.momentum_cfg['gamma'])])
                gaps = fine_tune(model, images, labels, HEADROOM_STEPS)[blocks]
                record = {'depth': depth, 'stage': stage, 'blocks': blocks, 'budget_log2': budget, 'gamma': gamma,
                          'first_gap': gaps[0], 'max_gap': max(gaps)}
                records.append(record)
                print(json.dumps(record), flush=True)
    return records


def measure_bf16_gradients(depth: int, out: Path) -> List[Dict[str, Any]]:
    """Gradients under bfloat16 autocast, standard and memory-efficient, each against float32 standard backprop:
    all parameter gradients as one vector and the input gradient, relative errors, on GRAD_IMAGES training images,
    at gamma 0.9 and at the policy."""
    import copy

    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.tools.data import FashionMNIST

    source = timm.create_model(f'local-dir:{out / "upstream" / f"resnet{depth}" / "final"}', pretrained=True)
    train = FashionMNIST('train', img_size=32, limit=2048)
    images, labels = train.batch(slice(-GRAD_IMAGES, None)), train.targets[-GRAD_IMAGES:]

    def grads(model: torch.nn.Module, memory_efficient: bool, amp: bool) -> torch.Tensor:
        net = copy.deepcopy(model).train()
        net.set_momentum(memory_efficient=memory_efficient)
        x = images.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
        loss.backward()
        return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in net.parameters()]).double(), x.numel()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    records = []
    for gamma in (0.9, 'auto'):
        model = timm.create_model(f'momentum_resnet{depth}', num_classes=10, gamma=gamma)
        model.load_state_dict(source.state_dict())
        (reference, n), (standard, _), (efficient, _) = (grads(model, False, False), grads(model, False, True),
                                                         grads(model, True, True))
        record = {'depth': depth, 'gamma': gamma, 'stage_gamma': model.momentum_cfg['gamma'],
                  'standard_bf16': {'input': rel(standard[:n], reference[:n]), 'params': rel(standard[n:], reference[n:])},
                  'memory_efficient_bf16': {'input': rel(efficient[:n], reference[:n]),
                                            'params': rel(efficient[n:], reference[n:])}}
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def saved_mib(model: torch.nn.Module, images: torch.Tensor, amp: bool) -> float:
    import copy

    from timm_momentum.tools.memory import MiB, autocast, saved_tensor_bytes

    net = copy.deepcopy(model).train()
    net.set_momentum(memory_efficient=True)
    with autocast('cpu', 'bf16' if amp else None):
        return saved_tensor_bytes(net, images) / MiB


def measure_conversions(depth: int, out: Path, scratch: Path) -> List[Dict[str, Any]]:
    """Convert the upstream at every gamma and healing, load each back from its folder, measure against the upstream."""
    import shutil

    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.tools.convert import convert
    from timm_momentum.tools.data import FashionMNIST

    upstream_dir = out / 'upstream' / f'resnet{depth}' / 'final'
    test = FashionMNIST('test', img_size=32)
    test_images, test_labels = test.batch(slice(None)), test.targets
    train = FashionMNIST('train', img_size=32, limit=2048)
    grad_images, grad_labels = train.batch(slice(-GRAD_IMAGES, None)), train.targets[-GRAD_IMAGES:]
    source = timm.create_model(f'local-dir:{upstream_dir}', pretrained=True)
    reference = logits(source, test_images)
    source_top1 = float((reference.argmax(-1) == test_labels).float().mean())
    records = [{'depth': depth, 'gamma': 'source', 'healing': 'none', 'top1': source_top1, 'agreement': 1.0,
                'kl': 0.0, 'stage_gamma': None}]
    print(f'resnet{depth} upstream: {100 * source_top1:.2f} % on {len(test_labels)} test images', flush=True)
    for gamma in GAMMAS:
        for healing, heal_args in HEALING.items():
            started = time.perf_counter()
            folder = scratch / f'resnet{depth}-{gamma}-{healing}'
            if gamma == 'float64 floor' and healing != 'none':
                continue  # the floor is measured to show why it is not the policy
            result = convert(f'local-dir:{upstream_dir}', folder, gamma=_conversion_gamma(gamma, depth), force=True,
                             heal_images=FASHION_MNIST if heal_args else None, eval_images=FASHION_MNIST,
                             **heal_args)
            model = timm.create_model(f'local-dir:{folder}', pretrained=True)
            assert model.momentum_cfg['gamma'] == result.model_args['gamma'], 'gamma did not round-trip'
            converted = logits(model, test_images)
            record = {
                'depth': depth, 'gamma': gamma, 'healing': healing, 'stage_gamma': model.momentum_cfg['gamma'],
                **against_reference(converted, reference, test_labels),
                'verify_drift': result.verify['drift_at_gamma'],
            }
            if healing == 'none':
                record['grad_error_fp32'] = grad_error(model, grad_images, grad_labels)
                record['saved_mib_fp32'] = saved_mib(model, grad_images, amp=False)
                record['saved_mib_bf16'] = saved_mib(model, grad_images, amp=True)
                if gamma in ('auto', 'float64 floor', 0.9):
                    record['fine_tuning'] = train_steps(model, train.batch(slice(None)), train.targets)
            record['seconds'] = time.perf_counter() - started
            records.append(record)
            shutil.rmtree(folder)
            print(json.dumps({k: v for k, v in record.items() if k != 'verify_drift'}), flush=True)
    return records


def measure_saved_bytes(depth: int, out: Path, records: List[Dict[str, Any]]) -> None:
    """Measure again the bytes saved for backward of every unhealed record, at its per-stage gamma, with today's
    plan (what a plan change alters; the bytes depend on the shapes and the plan, not on the weights)."""
    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.tools.data import FashionMNIST

    source = timm.create_model(f'local-dir:{out / "upstream" / f"resnet{depth}" / "final"}', pretrained=True)
    train = FashionMNIST('train', img_size=32, limit=2048)
    images = train.batch(slice(-GRAD_IMAGES, None))
    for record in records:
        if 'saved_mib_fp32' in record:
            model = timm.create_model(f'momentum_resnet{depth}', num_classes=10, gamma=record['stage_gamma'])
            model.load_state_dict(source.state_dict())
            record['saved_mib_fp32'] = saved_mib(model, images, amp=False)
            record['saved_mib_bf16'] = saved_mib(model, images, amp=True)


def _conversion_gamma(gamma: Any, depth: int) -> Any:
    """The gamma convert gets for a row: the row's own, or the float64 floor per stage."""
    if gamma != 'float64 floor':
        return gamma
    import timm

    import timm_momentum  # noqa: F401
    from timm_momentum.core.chain import min_safe_gamma, plan_chain

    blocks = [len(stage) - 1 for stage in timm.create_model(f'momentum_resnet{depth}').stages]
    return [0.0 if plan_chain(0.0, n).store_inputs else float(f'{min_safe_gamma(n) * 1.0005:.3g}') for n in blocks]


def _pct(value: float) -> str:
    return f'{100 * value:.2f}'


def _gamma_text(gammas: Any) -> str:
    return '–' if gammas is None else '(' + ', '.join(f'{g:g}' for g in gammas) + ')'


def format_markdown(records: List[Dict[str, Any]], upstreams: Dict[int, Dict[str, Any]], settings: str) -> str:
    """The fidelity tables, one per depth, and the policy's targets checked."""
    lines = ['# Fidelity of converted Momentum ResNets on Fashion-MNIST', '', settings, '']
    for depth in sorted({r['depth'] for r in records}):
        up = upstreams[depth]
        lines += [f'## resnet{depth} (upstream: {up["test_top1"]:.2f} % test top-1 after {up["epochs"]} epochs, '
                  f'{up["cpu_s"] / 60:.0f} CPU min)', '',
                  '| γ | healing | γ per stage | top-1 % | agreement % | KL | grad err fp32 (input / worst param) '
                  '| saved MiB fp32 | saved MiB bf16 |', '|' + '---|' * 9]
        for r in (r for r in records if r['depth'] == depth):
            grads = r.get('grad_error_fp32')
            lines.append('| ' + ' | '.join([
                str(r['gamma']), r['healing'], _gamma_text(r['stage_gamma']), _pct(r['top1']), _pct(r['agreement']),
                f"{r['kl']:.4f}", f"{grads['input']:.1e} / {grads['worst_param']:.1e}" if grads else '',
                f"{r['saved_mib_fp32']:.2f}" if 'saved_mib_fp32' in r else '',
                f"{r['saved_mib_bf16']:.2f}" if 'saved_mib_bf16' in r else '']) + ' |')
        lines.append('')
        tuned = [r for r in records if r['depth'] == depth and 'fine_tuning' in r]
        if tuned:
            lines += [f'Memory-efficient fine-tuning from the unhealed conversion ({TRAIN_STEPS} SGD steps, lr 0.01, '
                      'batch 32, float32): the largest relative reconstruction gap the backward\'s self-check saw (it '
                      'warns past 5e-6 and raises past 5e-5), then the gradient error against standard backprop.', '',
                      '| γ | γ per stage | largest gap | grad err after (input / worst param) |', '|---|---|---|---|']
            for r in tuned:
                after = r['fine_tuning'].get('grad_error_after')
                lines.append(f"| {r['gamma']} | {_gamma_text(r['stage_gamma'])} | {r['fine_tuning']['max_gap']:.1e} | "
                             + (f"{after['input']:.1e} / {after['worst_param']:.1e} |" if after else
                                'raises: gradients would be wrong |'))
            lines.append('')
    lines += ['## Targets', '', '| depth | policy | agreement unhealed (target) | best agreement healed | '
              'grad err fp32 ≤ 1e-5 | saved bytes ≤ at 0.9 |', '|---|---|---|---|---|---|']
    for depth in sorted({r['depth'] for r in records}):
        rows = {(r['gamma'], r['healing']): r for r in records if r['depth'] == depth}
        target = 0.99 if depth <= 50 else 0.97
        for policy, key in (('auto', 'saved_mib_fp32'), ('auto', 'saved_mib_bf16')):
            if (policy, 'none') not in rows:
                continue
            plain = rows[(policy, 'none')]
            healed = max((rows[(policy, h)] for h in ('bn', 'distill') if (policy, h) in rows),
                         key=lambda r: r['agreement'], default=None)
            grads = plain['grad_error_fp32']
            saved_ok = plain[key] <= rows[(0.9, 'none')][key] * 1.05 if (0.9, 'none') in rows else None
            lines.append(
                f"| {depth} | {policy} | {_pct(plain['agreement'])} % ({_pct(target)} %: "
                f"{'met' if plain['agreement'] >= target else 'missed'}) | "
                + (f"{_pct(healed['agreement'])} % ({healed['healing']})" if healed else '–') + ' | '
                f"{'yes' if max(grads.values()) <= 1e-5 else 'no'} ({max(grads.values()):.1e}) | "
                f"{'yes' if saved_ok else 'no'} ({plain[key]:.2f} vs {rows[(0.9, 'none')][key]:.2f} MiB, "
                f"{'fp32' if key.endswith('fp32') else 'bf16'}) |")
    lines.append('')
    return '\n'.join(lines)


def format_bf16(records: List[Dict[str, Any]]) -> str:
    """The bfloat16 gradient table."""
    if not records:
        return ''
    lines = ['## Gradients under bfloat16 autocast', '',
             f'Relative error against float32 standard backprop, on {GRAD_IMAGES} training images (train mode): all '
             'parameter gradients as one vector, and the input gradient.', '',
             '| depth | γ | γ per stage | standard bf16: params / input | memory-efficient bf16: params / input |',
             '|---|---|---|---|---|']
    for r in records:
        std, eff = r['standard_bf16'], r['memory_efficient_bf16']
        lines.append(f"| {r['depth']} | {r['gamma']} | {_gamma_text(r['stage_gamma'])} | {std['params']:.2e} / "
                     f"{std['input']:.2e} | {eff['params']:.2e} / {eff['input']:.2e} |")
    return '\n'.join(lines + ['', ''])


def format_headroom(records: List[Dict[str, Any]]) -> str:
    """The headroom table: the largest reconstruction gap by chain and amplification budget, over the samples."""
    if not records:
        return ''
    budgets = sorted({r['budget_log2'] for r in records})
    lines = ['## Headroom of the inverse', '',
             f'Largest relative reconstruction gap on one chain at gamma = 2^(-k/N) (the others at the policy), over '
             f'{len(HEADROOM_SAMPLES)} gammas a hair apart (x {", ".join(f"{m:g}" for m in HEADROOM_SAMPLES)}) and '
             f'{HEADROOM_STEPS} memory-efficient SGD steps each (float32, batch 32, lr 0.01), and how many of those '
             'runs passed the self-check\'s warning (5e-6; it raises past 5e-5). A gap near 1e-16 means no rebuilt '
             'block input changed its float32 rounding.', '',
             '| chain | ' + ' | '.join(f'k = {k}' for k in budgets) + ' |', '|---|' + '---|' * len(budgets)]
    for key in sorted({(r['depth'], r['stage'], r['blocks']) for r in records}):
        cells = []
        for k in budgets:
            runs = [r for r in records if (r['depth'], r['stage'], r['blocks']) == key and r['budget_log2'] == k]
            if not runs:
                cells.append('')
                continue
            worst = max(r['max_gap'] for r in runs)
            warned = sum(r['max_gap'] > 5e-6 for r in runs)
            cells.append(f'{worst:.1e} (γ {runs[0]["gamma"]:.3f}; {warned}/{len(runs)} over 5e-6)')
        lines.append(f'| resnet{key[0]} {key[1]} ({key[2]} blocks) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + [''])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--depths', default='18,50,101,152', help='ResNet depths (default: 18,50,101,152)')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'fidelity'), help='output folder')
    parser.add_argument('--phase', choices=('upstream', 'all'), default='all',
                        help="'upstream' only trains the upstreams (default: all)")
    parser.add_argument('--scratch', default=None, help='where converted folders are written and removed '
                        '(default: OUT/scratch)')
    parser.add_argument('--parts', default='conversions,bf16,headroom',
                        help='what to measure of each depth not yet measured (default: %(default)s)')
    parser.add_argument('--again', default='', help="parts to measure again though measured: conversions, bf16, "
                        "bytes (the conversions' saved bytes alone, after a plan change), headroom")
    parser.add_argument('--budgets', default=','.join(map(str, HEADROOM_BUDGETS)),
                        help='headroom: log2 amplification budgets (default: %(default)s)')
    args = parser.parse_args(argv)
    out = Path(args.out)
    depths = [int(d) for d in args.depths.split(',')]
    settings = (f'torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, load average '
                f'at start {os.getloadavg()[0]:.1f}; test split: all 10000 Fashion-MNIST test images at 32x32; '
                f'gradients and saved bytes: {GRAD_IMAGES} training images, memory-efficient vs standard backprop, '
                f'train mode; healing: the converter\'s, on the first 1024 training images (distillation: 100 steps)')
    print(settings, flush=True)
    upstreams = {depth: train_upstream(depth, out) for depth in depths}
    if args.phase == 'upstream':
        return 0
    scratch = Path(args.scratch) if args.scratch else out / 'scratch'
    parts = set(args.parts.split(','))
    again = set(filter(None, args.again.split(',')))
    for depth in depths:
        path = out / 'records' / f'resnet{depth}.json'
        measured = json.loads(path.read_text()) if path.is_file() else {}
        for part in again & {'conversions', 'bf16', 'headroom'}:
            measured.pop('records' if part == 'conversions' else part, None)
        if 'bytes' in again and 'records' in measured:
            measure_saved_bytes(depth, out, measured['records'])
        if ('conversions' in parts or 'conversions' in again) and 'records' not in measured:
            measured.update(settings=settings, upstream=upstreams[depth],
                            records=measure_conversions(depth, out, scratch))
        if ('bf16' in parts or 'bf16' in again) and 'bf16' not in measured:
            measured['bf16'] = measure_bf16_gradients(depth, out)
        if ('headroom' in parts or 'headroom' in again) and 'headroom' not in measured:
            measured['headroom'] = measure_headroom(depth, out, [int(k) for k in args.budgets.split(',')])
        path.parent.mkdir(parents=True, exist_ok=True)
        # what another run of this command measured of the same depth meanwhile stays
        merged = {**(json.loads(path.read_text()) if path.is_file() else {}), **measured}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(merged, indent=1)))
    # the tables, from every depth measured so far (each depth's file says how it was measured)
    files = sorted((out / 'records').glob('resnet*.json'), key=lambda p: int(p.stem[len('resnet'):]))
    measured = [json.loads(p.read_text()) for p in files]
    records = [r for m in measured for r in m.get('records', [])]
    markdown = format_markdown(records, {m['upstream']['depth']: m['upstream'] for m in measured if 'upstream' in m},
                               settings) + format_bf16([r for m in measured for r in m.get('bf16', [])]) + \
        format_headroom([r for m in measured for r in m.get('headroom', [])])
    atomic_write(out / 'fidelity.md', lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    return 0


if __name__ == '__main__':
    sys.exit(main())
