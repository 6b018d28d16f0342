"""The momentum rule, written once, and the element-wise steps of a chain built on it, eager or compiled.

The rule (Sander et al., ICML 2021, eq. 3), its inverse and its adjoint are the four functions ``forward_step``
(its halves ``velocity_step`` and ``position_step``), ``inverse_position``, ``inverse_velocity`` and
``adjoint_step``; every path of the package computes with them: the standard and memory-efficient chains
(``chain``), eager or compiled, and the models' plain forward.

The steps below apply them in place on a chain's state (x, v), so a chain allocates nothing per block but the
next block's input (and, in the memory-efficient chain, f). Eagerly a step is a few kernels, one per operation.
``set_fused(True)`` (or ``TIMM_MOMENTUM_FUSED=1``) runs each step as one compiled kernel instead (inductor, dynamic
shapes, built once per process and cached on disk by torch), about half the bytes moved. It is off by default
(``benchmarks/RESULTS.md`` has the timings; ``benchmarks/gpu_check.sh`` times it on CUDA). Compiled steps may round
the last bit differently from the eager ones. Where compiling fails, a warning says so once and the eager steps run;
``compiled_kernels()`` names the steps that did run compiled.
"""
import contextlib
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch

from .config import fused_enabled, set_fused

__all__ = ['forward_step', 'velocity_step', 'position_step', 'inverse_position', 'inverse_velocity', 'adjoint_step',
           'set_fused', 'fused_enabled', 'compiled_kernels', 'forward_update', 'next_state', 'previous_position',
           'previous_velocity', 'previous_velocity_and_position', 'adjoint_update', 'standard_backward']

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


def _next(x: torch.Tensor, velocity: Optional[torch.Tensor], out: torch.Tensor, block_input: Optional[torch.Tensor],
          gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # the velocity in its own storage (nothing else holds it), the position new: x_{n-1} stays the block's input
    velocity = velocity_step(velocity, out, gamma, velocity is not None, block_input)
    return position_step(x, velocity, False), velocity


def next_state(x: torch.Tensor, velocity: Optional[torch.Tensor], out: torch.Tensor,
               block_input: Optional[torch.Tensor], gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``forward_step`` from a block's output (arguments as in ``forward_update``), for a state carried in the
    blocks' own dtype: v is updated in place (a new tensor before the first block), and x_n, the next block's input
    as it is, is a new tensor. No tensor is made for the drop-in f. Returns (x_n, v_n).
    """
    return _call(_next, x, velocity, out, block_input, gamma)


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


def _standard(grad_position: torch.Tensor, grad_velocity: torch.Tensor, gamma: float,
              dropin: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    block_grad = adjoint_step(grad_position, grad_velocity, gamma, inplace=False)
    return block_grad, grad_position - block_grad if dropin else grad_position


def standard_backward(grad_position: torch.Tensor, grad_velocity: torch.Tensor, gamma: float,
                      dropin: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's backward in standard backprop: ``adjoint_step`` from dL/dx_n and (1 - gamma) g_{n+1}, and the
    gradient reaching x_{n-1} past the block (less (1 - gamma) g_n for the drop-in identity)."""
    return _call(_standard, grad_position, grad_velocity, gamma, dropin)
