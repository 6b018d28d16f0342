"""Measure what a training step costs in memory, as described in benchmarks/MEASURE.md.

Two measures:
  * bytes saved for backward (unique storages, through saved-tensor hooks): deterministic;
  * peak memory of one training step: CUDA's max_memory_allocated, or on CPU the peak RSS of a
    fresh subprocess above what it held before the step.
A compiled model is warmed up until it stops recompiling before either is read.
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
           'MODES', 'AMP_DTYPES', 'check_mode', 'check_amp', 'autocast', 'compile_model', 'warm_up_compiled',
           'cuda_step_peak', 'vm_hwm_bytes', 'reset_peak_rss']

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


def autocast(device: str, amp: Optional[str]) -> contextlib.AbstractContextManager:
    """Autocast to ``amp``'s dtype on ``device``, or nothing when ``amp`` is None."""
    return torch.autocast(device, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor, parameters: bool = True) -> int:
    """Bytes autograd keeps for backward during one training forward of ``model`` on ``x``.

    Counts unique storages, so aliases count once; ``parameters=False`` leaves out the model's parameters,
    which autograd keeps by reference (activations only). Checkpointed regions hide their inputs from these
    hooks; compare checkpointing by peak memory instead.
    """
    seen: Dict[int, int] = {}
    if not parameters:
        skip = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).logsumexp(-1).sum()
    if not parameters:
        return sum(size for ptr, size in seen.items() if ptr not in skip)
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


def compile_model(model: nn.Module, backend: str = 'inductor') -> nn.Module:
    """``torch.compile`` for a training measurement: one static-shape graph per input shape.

    Compilation is lazy; errors surface at the first step (see ``warm_up_compiled``).
    """
    config = torch._dynamo.config
    # A bench compiles several models whose blocks share code objects; the default limit would
    # silently send later ones back to eager.
    if hasattr(config, 'recompile_limit'):
        config.recompile_limit = max(config.recompile_limit, 64)
    return torch.compile(model, backend=backend, dynamic=False)


def _compilations() -> int:
    from torch._dynamo.utils import counters

    return counters['frames']['total'] + counters['aot_autograd']['total']


def warm_up_compiled(model: nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer,
                     amp: Optional[str] = None, min_steps: int = 2, max_steps: int = 10) -> Dict[str, int]:
    """Train ``model`` on (x, target) until a step compiles nothing new (at least ``min_steps`` steps).

    Returns:
        ``warmup_steps`` taken, ``compilations`` (frames and autograd graphs compiled meanwhile) and
        ``graph_breaks`` seen meanwhile. Raises RuntimeError if compilation has not settled after
        ``max_steps``.
    """
    from torch._dynamo.utils import counters

    start_compilations = _compilations()
    start_breaks = sum(counters['graph_break'].values())
    steps, before = 0, -1
    while steps < min_steps or _compilations() != before:
        if steps == max_steps:
            raise RuntimeError(f'still recompiling after {max_steps} warm-up steps')
        before = _compilations()
        with autocast(x.device.type, amp):
            train_step(model, x, target, optimizer)
        steps += 1
    return {'warmup_steps': steps, 'compilations': _compilations() - start_compilations,
            'graph_breaks': sum(counters['graph_break'].values()) - start_breaks}


def cuda_step_peak(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer] = None, amp: Optional[str] = None) -> int:
    """Peak CUDA memory of one training step above what was allocated before it, in bytes.

    Allocator statistics count only this process's live tensors, so other models resident on the GPU
    do not change the figure.
    """
    device = x.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with autocast('cuda', amp):
        train_step(model, x, target, optimizer)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def vm_hwm_bytes() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('VmHWM not found in /proc/self/status; peak RSS needs Linux')




def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``), so a peak can be read after a warm-up."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError as e:
        raise RuntimeError(f'cannot reset the peak RSS after a warm-up ({e}); a compiled step\'s peak '
                           f'cannot be told apart from compilation\'s') from e


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
    after_warmup = spec.get('after_warmup') or spec.get('compile')
    if after_warmup and device.type == 'cpu':
        reset_peak_rss()  # fails here, before any work, where Linux cannot reset the peak
    if spec.get('compile'):
        model = compile_model(model, spec['compile'])
        warm_up_compiled(model, x, target, optimizer, amp)
    elif after_warmup:
        with autocast(device.type, amp):
            train_step(model, x, target, optimizer)
    if device.type == 'cuda':
        return {**spec, 'peak_bytes': cuda_step_peak(model, x, target, optimizer, amp)}
    if after_warmup:
        reset_peak_rss()
    before = vm_hwm_bytes()
    with autocast(device.type, amp):
        train_step(model, x, target, optimizer)
    return {**spec, 'peak_bytes': vm_hwm_bytes() - before}


def peak_step_memory(model: str, mode: str = 'plain', batch_size: int = 16, img_size: int = 224,
                     device: str = 'cpu', model_kwargs: Optional[Dict[str, Any]] = None,
                     amp: Optional[str] = None, timeout: float = 1800, compile_backend: Optional[str] = None,
                     after_warmup: bool = False) -> int:
    """Peak memory of one training step above what the process held before it, in bytes.

    Runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the
    OS and RSS follows live memory; ``VmHWM`` is read before and after the step (not ``ru_maxrss``,
    which Linux carries over from the parent). By default the step is the process's first, which also
    allocates one-off state. With ``after_warmup`` (always with ``compile_backend``, whose first steps
    compile) the model first trains until it is warm, the peak is reset, and the next step is measured.
    """
    check_amp(amp)
    check_mode(mode)
    spec = dict(model=model, mode=mode, batch_size=batch_size, img_size=img_size, device=device,
                model_kwargs=model_kwargs or {}, amp=amp, compile=compile_backend, after_warmup=after_warmup)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_momentum.tools.memory', json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'peak-memory subprocess for {model} ({mode}) failed:\n{proc.stderr[-4000:]}')
    return int(json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes'])


if __name__ == '__main__':
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
