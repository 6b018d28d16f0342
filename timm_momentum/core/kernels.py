"""The momentum rule, written once, and the element-wise steps of a chain built on it, eager or compiled.

The rule (Sander et al., ICML 2021, eq. 3), its inverse and its adjoint are the functions ``forward_step`` (its
halves ``velocity_step`` and ``position_step``), ``inverse_position``, ``inverse_velocity`` and ``adjoint_step``;
``position_form_step`` is ``forward_step`` with the velocity left implicit (v_{n-1} = x_{n-1} - x_{n-2}), for a
chain that keeps its positions anyway and never inverts. Every path of the package computes with them: the standard
and memory-efficient chains (``chain``), eager or compiled, and the models' plain forward.

The steps below apply them to a chain's state, in place where the state is the chain's own, so a chain allocates
nothing per block but the next block's input (and, in the memory-efficient chain, f). Eagerly a step is a few
kernels, one per operation. ``set_fused(True)`` (or ``TIMM_MOMENTUM_FUSED=1``) runs each step as one compiled kernel
instead (inductor, dynamic shapes, built once per process and cached on disk by torch), fewer bytes moved. It is off
by default (``benchmarks/RESULTS.md`` has the timings; ``benchmarks/gpu_check.sh`` times it on CUDA). Compiled steps
may round the last bit differently from the eager ones. Where compiling fails, a warning says so once and the eager
steps run; ``compiled_kernels()`` names the steps that did run compiled.
"""
import contextlib
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch

from .config import fused_enabled, set_fused

__all__ = ['forward_step', 'velocity_step', 'position_step', 'position_form_step', 'inverse_position',
           'inverse_velocity', 'adjoint_step', 'set_fused', 'fused_enabled', 'compiled_kernels', 'forward_update',
           'next_position', 'previous_position', 'previous_velocity', 'previous_velocity_and_position',
           'adjoint_update', 'standard_adjoint']

_COMPILED: Dict[Callable, Callable] = {}
_RAN_COMPILED: Set[str] = set()
_WEIGHTS: Dict[Tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def forward_step(x: torch.Tensor, v: Optional[torch.Tensor], f: torch.Tensor, gamma: float,
                 inplace: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The momentum rule: v <- gamma v + (1 - gamma) f;  x <- x + v, where v = None stands for v = 0.

    Returns (x, v). With ``inplace`` x and v are updated in their own storage (and f becomes the first v).
    The two halves are ``velocity_step`` and ``position_step``.
    """
    velocity = velocity_step(v, f, gamma, inplace, None)
    return position_step(x, velocity, inplace), velocity


def velocity_step(v: Optional[torch.Tensor], f: torch.Tensor, gamma: float, inplace: bool,
                  subtract: Optional[torch.Tensor]) -> torch.Tensor:
    """The rule's first half: v <- gamma v + (1 - gamma) (f - subtract), where v = None stands for v = 0 and
    ``subtract`` None for 0.

    ``subtract`` is the drop-in f = block(x) - x's x, with block(x) passed as ``f``: the subtraction is folded into
    the velocity's update, so no tensor is made for f itself. With ``inplace`` v is updated in its own storage
    (and f becomes the first v); otherwise the velocity is a new tensor.
    """
    weight = 1.0 - gamma
    if v is None:
        if subtract is not None:
            branch = f.sub_(subtract) if inplace else f - subtract
            return branch.mul_(weight)
        return f.mul_(weight) if inplace else f * weight
    velocity = v.lerp_(f, weight) if inplace else torch.lerp(v, f, weight)  # v + (1 - gamma) (f - v), one pass
    if subtract is not None:
        velocity = velocity.sub_(subtract, alpha=weight)
    return velocity


def position_step(x: torch.Tensor, v: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The rule's second half: x <- x + v, in x's storage with ``inplace``, else a new tensor."""
    return x.add_(v) if inplace else x + v


def position_form_step(x: torch.Tensor, previous: Optional[torch.Tensor], f: torch.Tensor, gamma: float,
                       dropin: bool) -> torch.Tensor:
    """``forward_step`` on positions alone, with the velocity left implicit: v_{n-1} = x_{n-1} - x_{n-2}, so

        x_n = x_{n-1} + gamma (x_{n-1} - x_{n-2}) + (1 - gamma) f_n = lerp(x_{n-2}, x_{n-1}, 1 + gamma) + (1 - gamma) f_n

    and for the drop-in f_n = block(x_{n-1}) - x_{n-1}, passed as ``f`` = block(x_{n-1}) with ``dropin``,
    x_n = lerp(lerp(x_{n-2}, x_{n-1}, 2), block(x_{n-1}), 1 - gamma). ``previous`` = x_{n-2}, None before the
    first block (v = 0: x_1 = x_0 + (1 - gamma) f_1). Returns x_n in a new tensor: two passes, one new tensor, for a
    chain whose positions are kept anyway (standard backprop saves each as the next block's input) and which never
    inverts. Equal to ``forward_step`` but for rounding.
    """
    weight = 1.0 - gamma
    f = f.to(x.dtype)
    if previous is None:
        return torch.lerp(x, f, weight) if dropin else torch.add(x, f, alpha=weight)
    if dropin:
        return torch.lerp(previous, x, 2.0).lerp_(f, weight)
    return torch.lerp(previous, x, 1.0 + gamma).add_(f, alpha=weight)


def inverse_position(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The rule's inverse, first half, in place: x_{n-1} = x_n - v_n."""
    return x.sub_(v)


def inverse_velocity(v: torch.Tensor, f: torch.Tensor, gamma: float) -> torch.Tensor:
    """The rule's inverse, second half, in place, with f = f_n(x_{n-1}): v_{n-1} = (v_n - (1 - gamma) f) / gamma.

    Computed as lerp(f, v, 1 / gamma) = v + (1 / gamma - 1) (v - f): a small correction to v (lerp's formula
    for weights >= 0.5), which rounds better than the division.
    """
    return torch.lerp(f, v, 1.0 / gamma, out=v)


def adjoint_step(grad_x: torch.Tensor, block_grad: torch.Tensor, gamma: float, inplace: bool) -> torch.Tensor:
    """The rule's adjoint for the velocity, carried scaled by (1 - gamma):
    (1 - gamma) g_n = (1 - gamma) dL/dx_n + gamma (1 - gamma) g_{n+1}, from ``grad_x`` = dL/dx_n and
    ``block_grad`` = (1 - gamma) g_{n+1}; (1 - gamma) g_n is the gradient of block n's output f_n."""
    weight = 1.0 - gamma
    return block_grad.lerp_(grad_x, weight) if inplace else torch.lerp(block_grad, grad_x, weight)


def compiled_kernels() -> Set[str]:
    """The names of the element-wise steps that have run as compiled kernels in this process."""
    return set(_RAN_COMPILED)


def _as_tensor(value: object, like: torch.Tensor) -> object:
    """A float argument as a 0-dim tensor of ``like``'s dtype for a compiled kernel, which would otherwise bake
    it in and be rebuilt for every gamma; anything else as it is."""
    if not isinstance(value, float):
        return value
    key = (value, like.dtype, like.device)
    weight = _WEIGHTS.get(key)
    if weight is None:
        weight = _WEIGHTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return weight


def _compilable(tensors: Tuple[torch.Tensor, ...]) -> bool:
    if not fused_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # a double backward records these ops; compiled kernels run without autograd
    return all(t.device.type in ('cpu', 'cuda') for t in tensors)


def _flat(tensors: Tuple[torch.Tensor, ...]) -> Optional[Tuple[torch.Size, Tuple[int, ...]]]:
    """The common shape and strides of the activation-sized tensors when all are laid out alike and densely
    (then the kernel sees them as 1-d, one compiled kernel for every shape and memory format), else None."""
    big = [t for t in tensors if t.dim() > 0]
    shape, stride = big[0].shape, big[0].stride()
    if any(t.shape != shape or t.stride() != stride for t in big):
        return None
    dense = big[0].is_contiguous() or big[0].is_contiguous(memory_format=torch.channels_last) or \
        (big[0].dim() == 5 and big[0].is_contiguous(memory_format=torch.channels_last_3d))
    return (shape, stride) if dense else None


def _call(kernel: Callable, *args: object):
    """Run ``kernel`` compiled where it can be, else eagerly; the two agree but for rounding in the last bits."""
    if not fused_enabled():  # the default: nothing to inspect on the hot path
        return kernel(*args)
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    if not _compilable(tensors):
        return kernel(*args)
    layout = _flat(tensors)
    flat_args = tuple(_as_tensor(a, tensors[0]) for a in args)
    if layout is not None:
        flat_args = tuple(a.as_strided((a.numel(),), (1,)) if isinstance(a, torch.Tensor) and a.dim() else a
                          for a in flat_args)
    compiled = _COMPILED.get(kernel)
    if compiled is None:
        # dynamic shapes: one kernel for every size; threads decided at run time (inductor would otherwise size
        # them from the first call's example); half-precision steps rounded where the eager ops round them
        compiled = _COMPILED[kernel] = torch.compile(
            kernel, dynamic=True, options={'cpp.dynamic_threads': True, 'emulate_precision_casts': True})
    device_type = tensors[0].device.type
    try:
        # autocast off: the steps round as written, and a compiled kernel would be rebuilt for each autocast state
        with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
                else contextlib.nullcontext():
            result = compiled(*flat_args)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # no compiler, no Python headers, an inductor bug: run eagerly
        _give_up_compiling(error)
        return kernel(*args)
    _RAN_COMPILED.add(kernel.__name__)
    return result if layout is None else _unflatten(result, *layout)


def _unflatten(result, shape: torch.Size, stride: Tuple[int, ...]):
    if isinstance(result, tuple):
        return tuple(_unflatten(r, shape, stride) for r in result)
    if isinstance(result, torch.Tensor) and result.dim() == 1:
        return result.as_strided(shape, stride)
    return result


def _give_up_compiling(error: Exception) -> None:
    set_fused(False)
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    warnings.warn(f'timm_momentum could not compile its fused momentum kernels ({type(error).__name__}: {reason}); '
                  'it runs the same steps eagerly from now on (the default; results agree but for the last bits). '
                  'set_fused(False), or TIMM_MOMENTUM_FUSED unset, skips the attempt.', RuntimeWarning, stacklevel=3)


def _branch(out: torch.Tensor, block_input: Optional[torch.Tensor], carrier: torch.dtype) -> torch.Tensor:
    """f in the carrier dtype, in a new tensor: the block's output, less its input for the drop-in f.

    The subtraction is rounded in the block's dtype, so f is a function of the block's input alone and the
    backward recomputes it bitwise from the rebuilt input.
    """
    return out.to(carrier, copy=True) if block_input is None else (out - block_input).to(carrier)


def _forward(x: torch.Tensor, velocity: Optional[torch.Tensor], out: torch.Tensor,
             block_input: Optional[torch.Tensor], gamma: float, next_dtype: torch.dtype
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    x, velocity = forward_step(x, velocity, _branch(out, block_input, x.dtype), gamma, inplace=True)
    return velocity, x.to(next_dtype, copy=True)


def forward_update(x: torch.Tensor, velocity: Optional[torch.Tensor], out: torch.Tensor,
                   block_input: Optional[torch.Tensor], gamma: float, next_dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``forward_step`` in place on the state (x, v), from a block's output.

    Args:
        x: The position, updated in place.
        velocity: The velocity, updated in place; None before the first block (v = 0).
        out: The block's output: f itself, or block(x) for the drop-in f.
        block_input: The block's input for the drop-in f = block(x) - x; None when ``out`` is f.
        gamma: The momentum.
        next_dtype: The dtype of the next block's input.

    Returns:
        The velocity, and x rounded to ``next_dtype`` in a new tensor (the next block's input).
    """
    return _call(_forward, x, velocity, out, block_input, gamma, next_dtype)


def next_position(x: torch.Tensor, previous: Optional[torch.Tensor], out: torch.Tensor, gamma: float,
                  dropin: bool) -> torch.Tensor:
    """``position_form_step`` from a block's output (block(x) for the drop-in f): x_n in a new tensor, x and
    ``previous`` untouched."""
    return _call(position_form_step, x, previous, out, gamma, dropin)


def _position(x: torch.Tensor, velocity: torch.Tensor, next_dtype: torch.dtype) -> torch.Tensor:
    return inverse_position(x, velocity).to(next_dtype, copy=True)


def previous_position(x: torch.Tensor, velocity: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``inverse_position`` in place; returns x_{n-1} rounded to ``dtype`` in a new tensor (the block's input)."""
    return _call(_position, x, velocity, dtype)


def _velocity(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor, block_input: Optional[torch.Tensor],
              gamma: float) -> None:
    inverse_velocity(velocity, _branch(out, block_input, x.dtype), gamma)


def previous_velocity(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor,
                      block_input: Optional[torch.Tensor], gamma: float) -> None:
    """``inverse_velocity`` in place on v, from the recomputed block's output (as in ``forward_update``)."""
    _call(_velocity, x, velocity, out, block_input, gamma)


def _velocity_and_position(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor,
                           block_input: Optional[torch.Tensor], gamma: float, next_dtype: torch.dtype
                           ) -> torch.Tensor:
    inverse_velocity(velocity, _branch(out, block_input, x.dtype), gamma)
    return inverse_position(x, velocity).to(next_dtype, copy=True)


def previous_velocity_and_position(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor,
                                   block_input: Optional[torch.Tensor], gamma: float, dtype: torch.dtype
                                   ) -> torch.Tensor:
    """``previous_velocity`` then ``previous_position`` of the block before, in one pass: returns that block's
    input rounded to ``dtype`` in a new tensor."""
    return _call(_velocity_and_position, x, velocity, out, block_input, gamma, dtype)


def _adjoint(grad_x: torch.Tensor, grad_in: Optional[torch.Tensor], block_grad: torch.Tensor, gamma: float,
             dropin: bool, last: bool) -> None:
    if grad_in is not None:
        grad_x.add_(grad_in)
    if dropin:
        grad_x.sub_(block_grad)
    if not last:
        adjoint_step(grad_x, block_grad, gamma, inplace=True)


def adjoint_update(grad_x: torch.Tensor, grad_in: Optional[torch.Tensor], block_grad: torch.Tensor, gamma: float,
                   dropin: bool, last: bool) -> None:
    """One block of the memory-efficient backward, in place: g_x += J_x^T [(1 - gamma) g] (less (1 - gamma) g for
    the drop-in identity), then, unless ``last``, ``adjoint_step`` gives the block before its (1 - gamma) g."""
    _call(_adjoint, grad_x, grad_in, block_grad, gamma, dropin, last)


def _standard_adjoint(grad_x: Optional[torch.Tensor], direct: Optional[torch.Tensor],
                      block_grad: Optional[torch.Tensor], gamma: float, dropin: bool, inplace: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    # dL/dx_n = what reached x_n through later blocks + its direct part, summed in the direct part's storage
    if direct is None:
        total = grad_x
    elif grad_x is None:
        total = direct
    else:
        total = direct.add_(grad_x) if inplace else direct + grad_x
    block_grad = total * (1.0 - gamma) if block_grad is None else adjoint_step(total, block_grad, gamma, False)
    if dropin:
        return block_grad, total.sub_(block_grad) if inplace and direct is not None else total - block_grad
    return block_grad, total.clone() if inplace and direct is None else total


def standard_adjoint(grad_x: Optional[torch.Tensor], direct: Optional[torch.Tensor],
                     block_grad: Optional[torch.Tensor], gamma: float, dropin: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's backward in standard backprop: ``adjoint_step`` with dL/dx_n split in two parts.

    Args:
        grad_x: What reached x_n through the later blocks (autograd's gradient of x_n; not changed), or None.
        direct: The direct part of dL/dx_n, through the rule of the block after (None for the chain's last block);
            a tensor of the chain's own, which is updated in place and returned.
        block_grad: (1 - gamma) g_{n+1}, the block after's output gradient; None for the chain's last block.
        gamma: The momentum.
        dropin: Whether f = block(x) - x, whose identity takes (1 - gamma) g_n off the direct part.

    Returns:
        (1 - gamma) g_n, block n's output gradient, in a new tensor; and the direct part of dL/dx_{n-1}: dL/dx_n,
        less (1 - gamma) g_n for the drop-in f. Where autograd records the backward (a double backward) or a
        functorch transform runs, nothing is updated in place.
    """
    inplace = not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
    return _call(_standard_adjoint, grad_x, direct, block_grad, gamma, dropin, inplace)
