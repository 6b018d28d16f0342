"""The element-wise steps of a momentum chain, in place on the chain's state, eager or compiled and fused.

Each step updates the state (x, v) in place, so a chain allocates nothing per block but the next block's
input and f. Eagerly a step is a few kernels, one per operation. ``set_fused(True)`` (or
``TIMM_MOMENTUM_FUSED=1``) runs each step as one compiled kernel instead (inductor, dynamic shapes, built once
per process and cached on disk by torch), about half the bytes moved. On CPU that measured no faster in a
whole training step (``benchmarks/RESULTS.md``), so it is off by default; ``benchmarks/gpu_check.sh`` times it
on CUDA. Compiled steps may round the last bit differently from the eager ones; standard and
memory-efficient modes stay bitwise identical either way, since both take the same steps. Where compiling
fails, a warning says so once and the eager steps run.
"""
import contextlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ['set_fused', 'fused_enabled', 'forward_update', 'previous_position', 'previous_state', 'adjoint_step',
           'standard_backward']

_ENABLED = os.environ.get('TIMM_MOMENTUM_FUSED', '0') == '1'
_COMPILED: Dict[Callable, Callable] = {}
_WEIGHTS: Dict[Tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def set_fused(enabled: bool = True) -> None:
    """Choose whether the chain's element-wise steps run as compiled fused kernels or eagerly (the default)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def fused_enabled() -> bool:
    """Whether the element-wise steps will try compiled fused kernels."""
    return _ENABLED


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
    if not _ENABLED or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
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
    if not _ENABLED:  # the default: nothing to inspect on the hot path
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
    return result if layout is None else _unflatten(result, *layout)


def _unflatten(result, shape: torch.Size, stride: Tuple[int, ...]):
    if isinstance(result, tuple):
        return tuple(_unflatten(r, shape, stride) for r in result)
    if isinstance(result, torch.Tensor) and result.dim() == 1:
        return result.as_strided(shape, stride)
    return result


def _give_up_compiling(error: Exception) -> None:
    global _ENABLED
    _ENABLED = False
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    warnings.warn(f'timm_momentum could not compile its fused momentum kernels ({type(error).__name__}: {reason}); '
                  'it runs the same steps eagerly from now on (the default; results agree but for the last bits). '
                  'set_fused(False), or TIMM_MOMENTUM_FUSED unset, skips the attempt.', RuntimeWarning, stacklevel=3)


def _step(out: torch.Tensor, block_input: Optional[torch.Tensor], carrier: torch.dtype) -> torch.Tensor:
    """f in the carrier dtype, in a new tensor: the block's output, less its input for the drop-in f.

    The subtraction is rounded in the block's dtype, so f is a function of the block's input alone and the
    backward recomputes it bitwise from the rebuilt input.
    """
    return out.to(carrier, copy=True) if block_input is None else (out - block_input).to(carrier)


def _first_update(x: torch.Tensor, out: torch.Tensor, block_input: Optional[torch.Tensor], one_minus_gamma: float,
                  next_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    velocity = _step(out, block_input, x.dtype).mul_(one_minus_gamma)
    x.add_(velocity)
    return velocity, x.to(next_dtype, copy=True)


def _update(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor, block_input: Optional[torch.Tensor],
            one_minus_gamma: float, next_dtype: torch.dtype) -> torch.Tensor:
    velocity.lerp_(_step(out, block_input, x.dtype), one_minus_gamma)  # v + (1 - gamma) (f - v), one pass
    x.add_(velocity)
    return x.to(next_dtype, copy=True)


def forward_update(x: torch.Tensor, velocity: Optional[torch.Tensor], out: torch.Tensor,
                   block_input: Optional[torch.Tensor], gamma: float, next_dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """v <- gamma v + (1 - gamma) f;  x <- x + v, in place on the carrier state (x, v).

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
    if velocity is None:
        return _call(_first_update, x, out, block_input, 1.0 - gamma, next_dtype)
    return velocity, _call(_update, x, velocity, out, block_input, 1.0 - gamma, next_dtype)


def _previous_position(x: torch.Tensor, velocity: torch.Tensor, next_dtype: torch.dtype) -> torch.Tensor:
    return x.sub_(velocity).to(next_dtype, copy=True)


def previous_position(x: torch.Tensor, velocity: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_{n-1} = x_n - v_n in place; returns it rounded to ``dtype`` in a new tensor (the block's input)."""
    return _call(_previous_position, x, velocity, dtype)


def _previous_velocity(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor,
                       block_input: Optional[torch.Tensor], inverse_gamma: float) -> None:
    # f + (v - f) / gamma, computed as v + (1/gamma - 1)(v - f): a small correction to v, as lerp does for
    # weights >= 0.5 (lerp_ on v with weight 1 - 1/gamma < -0.5 would round f + (v - f)/gamma, worse for gamma < 2/3)
    torch.lerp(_step(out, block_input, x.dtype), velocity, inverse_gamma, out=velocity)


def _previous_velocity_and_position(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor,
                                    block_input: Optional[torch.Tensor], inverse_gamma: float,
                                    next_dtype: torch.dtype) -> torch.Tensor:
    _previous_velocity(x, velocity, out, block_input, inverse_gamma)
    return x.sub_(velocity).to(next_dtype, copy=True)


def previous_state(x: torch.Tensor, velocity: torch.Tensor, out: torch.Tensor, block_input: Optional[torch.Tensor],
                   gamma: float, dtype: torch.dtype, position: bool) -> Optional[torch.Tensor]:
    """Invert one block: v_{n-1} = (v_n - (1 - gamma) f) / gamma in place, as one lerp f + (v_n - f) / gamma.

    ``out`` and ``block_input`` are the recomputed block's, as in ``forward_update``. With ``position`` the
    next inverse step follows in the same pass: x_{n-2} = x_{n-1} - v_{n-1}, returned rounded to ``dtype``.
    """
    if position:
        return _call(_previous_velocity_and_position, x, velocity, out, block_input, 1.0 / gamma, dtype)
    _call(_previous_velocity, x, velocity, out, block_input, 1.0 / gamma)
    return None


def _adjoint_step(grad_x: torch.Tensor, grad_in: Optional[torch.Tensor], block_grad: torch.Tensor,
                  one_minus_gamma: float, dropin: bool, last: bool) -> None:
    if grad_in is not None:
        grad_x.add_(grad_in)
    if dropin:
        grad_x.sub_(block_grad)
    if not last:
        block_grad.lerp_(grad_x, one_minus_gamma)


def adjoint_step(grad_x: torch.Tensor, grad_in: Optional[torch.Tensor], block_grad: torch.Tensor, gamma: float,
                 dropin: bool, last: bool) -> None:
    """g_x += J_x^T [(1 - gamma) g] (less (1 - gamma) g for the drop-in identity); then, unless ``last``,
    (1 - gamma) g <- (1 - gamma) g_x + gamma (1 - gamma) g for the block before. In place."""
    _call(_adjoint_step, grad_x, grad_in, block_grad, 1.0 - gamma, dropin, last)


def _standard_backward(grad_position: torch.Tensor, grad_velocity: torch.Tensor, gamma: float,
                       dropin: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    block_grad = torch.lerp(grad_position, grad_velocity, gamma)
    return block_grad, grad_position - block_grad if dropin else grad_position


def standard_backward(grad_position: torch.Tensor, grad_velocity: torch.Tensor, gamma: float,
                      dropin: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's backward in standard backprop: (1 - gamma) g_n = lerp(dL/dx_n, (1 - gamma) g_{n+1}, gamma),
    and the gradient reaching x_{n-1} past the block (less (1 - gamma) g_n for the drop-in identity)."""
    return _call(_standard_backward, grad_position, grad_velocity, gamma, dropin)
