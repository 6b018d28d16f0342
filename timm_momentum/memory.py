"""Measure what a training step costs in memory, as described in the project's MEASURE.md.

Two measures:
  * bytes saved for backward (unique storages, through saved-tensor hooks): deterministic;
  * peak memory of one training step: CUDA's max_memory_allocated, or on CPU the peak RSS of a
    fresh subprocess above what it held before the step.
"""
import contextlib
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

__all__ = ['saved_tensor_bytes', 'build_model', 'official_momentumnet', 'train_step', 'peak_step_memory', 'MiB',
           'MODES', 'AMP_DTYPES', 'check_mode', 'check_amp']

MODES = ('plain', 'checkpoint', 'memory_efficient', 'memory_efficient_stored_transitions', 'official')
# The autocast dtypes the measurements accept, by their command-line names.
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}

MiB = 2 ** 20


def check_mode(mode: str) -> None:
    """Raise ValueError naming ``mode`` unless it is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def check_amp(amp: Optional[str]) -> None:
    """Raise ValueError naming ``amp`` unless it is None or a key of AMP_DTYPES."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f'amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}')


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one training forward of ``model`` on ``x``.

    Counts unique storages, so aliases count once. Checkpointed regions hide their inputs from these
    hooks; compare checkpointing by peak memory instead.
    """
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logsumexp(-1).sum()
    return sum(seen.values())


def build_model(name: str, mode: str = 'plain', **kwargs: Any) -> nn.Module:
    """Build a model for a memory or speed measurement.

    Args:
        name: A timm model name (``resnet101``, ``momentum_resnet101``, ...).
        mode: ``plain`` (standard backprop), ``checkpoint`` (timm's ``set_grad_checkpointing``),
            ``memory_efficient`` (momentum models only), ``memory_efficient_stored_transitions`` (the same,
            but the stem and each stage's first block store their activations instead of recomputing
            them) or ``official`` (the momentumnet package).
        **kwargs: Passed to ``timm.create_model``.
    """
    import timm
    import timm_momentum  # noqa: F401  (registers the momentum models)

    check_mode(mode)
    if mode == 'memory_efficient':
        kwargs['memory_efficient'] = True
    elif mode == 'memory_efficient_stored_transitions':
        kwargs.update(memory_efficient=True, checkpoint_transitions=False)
    elif mode == 'official':
        return official_momentumnet(name, **kwargs).train()
    model = timm.create_model(name, **kwargs)
    if mode == 'checkpoint':
        model.set_grad_checkpointing(True)
    return model.train()


def official_momentumnet(name: str, gamma: float = 0.9, **kwargs: Any) -> nn.Module:
    """timm's resnet of ``name``'s depth turned into the official ``momentumnet`` 0.10 package's
    Momentum ResNet with its own invertible backward (``use_backprop=False``), for comparison."""
    import timm

    try:
        from momentumnet import transform_to_momentumnet
    except ImportError as e:
        raise RuntimeError('mode official needs the momentumnet package: pip install momentumnet==0.10') from e
    source = name.replace('momentum_', '')
    return transform_to_momentumnet(timm.create_model(source, **kwargs), gamma=gamma, use_backprop=False)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
               optimizer: Optional[torch.optim.Optimizer] = None) -> float:
    """One training step: forward, cross-entropy backward and, if given, an optimizer step."""
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _vm_hwm_bytes() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('VmHWM not found in /proc/self/status; peak RSS needs Linux')


def _measure_here(spec: Dict[str, Any]) -> Dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device(spec.get('device', 'cpu'))
    torch.set_num_threads(spec.get('threads', torch.get_num_threads()))
    model = build_model(spec['model'], spec.get('mode', 'plain'), **spec.get('model_kwargs', {})).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    size = spec['img_size']
    x = torch.randn(spec['batch_size'], 3, size, size, device=device)
    target = torch.randint(0, model.num_classes, (spec['batch_size'],), device=device)
    amp = spec.get('amp')
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with autocast:
            train_step(model, x, target, optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _vm_hwm_bytes()
        with autocast:
            train_step(model, x, target, optimizer)
        peak = _vm_hwm_bytes() - before
    return {**spec, 'peak_bytes': peak}


def peak_step_memory(model: str, mode: str = 'plain', batch_size: int = 16, img_size: int = 224,
                     device: str = 'cpu', model_kwargs: Optional[Dict[str, Any]] = None,
                     amp: Optional[str] = None, timeout: float = 1800) -> int:
    """Peak memory of one training step above what the process held before it, in bytes.

    Runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the
    OS and RSS follows live memory; ``VmHWM`` is read before and after the step (not ``ru_maxrss``,
    which Linux carries over from the parent).
    """
    check_amp(amp)
    check_mode(mode)
    spec = dict(model=model, mode=mode, batch_size=batch_size, img_size=img_size, device=device,
                model_kwargs=model_kwargs or {}, amp=amp)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_momentum.memory', json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'peak-memory subprocess for {model} ({mode}) failed:\n{proc.stderr[-4000:]}')
    return int(json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes'])


if __name__ == '__main__':
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
