"""Invertible momentum chains: the forward rule of Momentum ResNets and its exact backward.

Sander, Ablin, Blondel, Peyré, "Momentum Residual Neural Networks", ICML 2021, arXiv:2102.07870.

For a chain of blocks f_1 ... f_N and a momentum ``gamma``, starting from v_0 = 0::

    v_n = gamma * v_{n-1} + (1 - gamma) * f_n(x_{n-1});   x_n = x_{n-1} + v_n

The rule inverts in closed form::

    x_{n-1} = x_n - v_n;   v_{n-1} = (v_n - (1 - gamma) * f_n(x_{n-1})) / gamma

so in memory-efficient mode the backward rebuilds every activation from the chain's final state
instead of storing it. This module knows nothing of ResNets or timm: it takes blocks, a function
``block_fn(block, x)`` that gives f, gamma and a memory mode.

Exactness. Every chain gets a plan (``plan_chain``), the exact one that keeps the fewest bytes. A short chain
(at most 4 blocks, 5 at gamma = 0) keeps each block's input, which costs about what the inverse's state costs and
needs no inverse. A longer chain inverts, with its state (x, v) carried in float64 for float32 and bfloat16/float16
work alike, so the inverse's rounding error, which grows like gamma^-K over K blocks, stays far below the working
precision and each recomputed block input rounds to the very value the forward used. Where gamma^-K would outgrow
even the carrier, the chain also stores its state every K blocks or keeps its inputs (``check_invertible`` warns
and names the gamma that needs no extra storage). ``faithful_gamma`` is the policy for pretrained weights: the
smallest gamma whose inverse stays exact in practice, storing no more than at the paper's 0.9 (or a few per cent
more to keep the source's function). Standard mode never inverts, so its state is the positions alone, in the
input's dtype (at least float32; ``kernels.position_form_step``): its outputs equal the memory-efficient ones up to
float32 rounding. The memory-efficient backward checks its own reconstruction: it warns when rebuilt activations drift
past the working precision and raises when gradients would be wrong.
"""
import contextlib
import functools
import math
import warnings
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from .config import (set_standard_matches_memory_efficient, set_strict_check, standard_matches_memory_efficient,
                     strict_check_enabled)
from .kernels import (adjoint_update, forward_step, forward_update, next_position, previous_position,
                      previous_velocity, previous_velocity_and_position, standard_adjoint)

__all__ = [
    'BlockFn', 'ChainPlan', 'PAPER_GAMMA', 'dropin_fn', 'validate_gamma', 'plan_chain', 'plan_bytes', 'min_safe_gamma',
    'POLICY_AMPLIFICATION', 'ZERO_GAMMA_STORE_RATIO', 'faithful_gamma', 'check_invertible', 'momentum_chain', 'checkpoint_blocks', 'frozen_norm_stats', 'set_strict_check',
    'register_deterministic', 'standard_carrier', 'set_standard_matches_memory_efficient',
]

_NORM_STATS = ('running_mean', 'running_var', 'num_batches_tracked')

# Largest relative error tolerated in the rebuilt chain input, by the dtype blocks compute in; past the second
# table the backward raises instead of warning. How both were calibrated: benchmarks/CALIBRATION.md.
_RECONSTRUCTION_TOL = {torch.float64: 1e-9, torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
_RECONSTRUCTION_FAIL = {torch.float64: 1e-6, torch.float32: 5e-5, torch.float16: 0.5, torch.bfloat16: 0.5}

BlockFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]

# Largest gamma^-K the inverse may amplify rounding by, per carrier dtype. float64 carrying float32
# work leaves 2^-53 * 2^24 = 2^-29 relative error, 32x below float32's own rounding.
_AMPLIFICATION_LIMIT = {torch.float64: 2.0 ** 24}
# The paper's gamma: the faithful policy stores no more than a chain stores at it.
PAPER_GAMMA = 0.9
# Largest gamma^-N the faithful policy lets an inverse amplify by, whatever the carrier: a rebuilt block input
# one float32 ulp off is amplified by every later inverse step (why 2^8: benchmarks/CALIBRATION.md).
POLICY_AMPLIFICATION = 2.0 ** 8
# At gamma = 0 (the source's own function) a chain that cannot invert still stores its inputs where they cost at
# most this many times an inverse's state (resnet34/50's 5-block layer3 in float32: 20 bytes per element against 16).
ZERO_GAMMA_STORE_RATIO = 1.25


def dropin_fn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) = block(x) - x: with gamma = 0 the chain computes exactly what the plain blocks compute."""
    return block(x) - x


def validate_gamma(gamma: float) -> float:
    """Return gamma as a float, or raise ValueError naming the value when it is outside [0, 1)."""
    if isinstance(gamma, (bool, str)):
        raise ValueError(f'gamma must be a number in [0, 1), got {gamma!r}')
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f'gamma must be a number in [0, 1), got {gamma!r}') from None
    if value == 1.0:
        raise ValueError(f'gamma must be in [0, 1), got {gamma!r}: at gamma = 1 the velocity starts at 0 and stays 0 '
                         '(v <- v + 0 * f(x)), so a momentum chain ignores its blocks and they get no gradient')
    if not (0.0 <= value < 1.0):  # also rejects NaN
        raise ValueError(f'gamma must be in [0, 1), got {gamma!r}')
    return value


class ChainPlan(NamedTuple):
    """How a chain runs: the dtype of its state (x, v), and what its memory-efficient backward keeps."""
    carrier: torch.dtype
    span: int            # most blocks the inverse runs between stored states; 0: cannot invert
    store_inputs: bool   # keep each block's input instead of inverting (cheaper for short chains)


def _carrier(work_dtype: torch.dtype) -> torch.dtype:
    """The dtype an inverse carries its state in for ``work_dtype``: float64 for every work dtype (why, under
    half-precision autocast too: benchmarks/CALIBRATION.md). ``plan_chain`` weighs its 16 bytes per element
    against storing the inputs."""
    return torch.float64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _span(gamma: float, carrier: torch.dtype, num_blocks: int) -> int:
    """The most blocks an inverse carried in ``carrier`` runs at ``gamma`` before gamma^-K outgrows it."""
    if gamma == 0.0:
        return 0
    return min(int(math.log(_AMPLIFICATION_LIMIT[carrier]) / -math.log(gamma) + 1e-9), num_blocks)


def plan_bytes(plan: ChainPlan, num_blocks: int, input_dtype: torch.dtype) -> int:
    """Bytes per activation element that a chain run by ``plan`` keeps for its memory-efficient backward: each
    block's input, or the state (x, v) at the chain's end and at every span's end."""
    if plan.store_inputs:
        return num_blocks * _itemsize(input_dtype)
    if plan.span < 1:
        return 0
    return 2 * _itemsize(plan.carrier) * math.ceil(num_blocks / plan.span)


def plan_chain(gamma: float, num_blocks: int, work_dtype: torch.dtype = torch.float32,
               input_dtype: Optional[torch.dtype] = None) -> ChainPlan:
    """Plan a chain of ``num_blocks`` blocks computing in ``work_dtype`` on inputs of ``input_dtype``.

    The plan is the exact one that keeps the fewest bytes: storing each block's input (``num_blocks`` tensors of
    the input dtype, no inverse), or inverting with the state carried in a wider dtype, stored at the chain's
    end and every span; the state is float64 for every work dtype (``_carrier``). A chain whose inputs cost no
    more than one state stores them at any gamma, and at gamma = 0 (or a gamma too small to invert even one block),
    one whose inputs cost at most ZERO_GAMMA_STORE_RATIO states; a longer chain there cannot run (span 0).
    """
    gamma = validate_gamma(gamma)
    input_dtype = input_dtype or work_dtype
    carrier = _carrier(work_dtype)
    store = ChainPlan(input_dtype, num_blocks, True)
    store_bytes = plan_bytes(store, num_blocks, input_dtype)
    state_bytes = 2 * _itemsize(carrier)
    if store_bytes <= state_bytes:
        return store
    inverse = ChainPlan(carrier, _span(gamma, carrier, num_blocks), False)
    if inverse.span < 1:  # gamma = 0 (or too small to invert one block): kept exactly where its inputs are cheap enough
        return store if store_bytes <= ZERO_GAMMA_STORE_RATIO * state_bytes else ChainPlan(input_dtype, 0, False)
    # on a tie, stored inputs: exact, and the backward skips the inverse's element-wise steps
    return store if store_bytes <= plan_bytes(inverse, num_blocks, input_dtype) else inverse


def min_safe_gamma(num_blocks: int, work_dtype: torch.dtype = torch.float32) -> float:
    """The smallest gamma whose inverse runs ``num_blocks`` blocks without storing any extra state (with the
    carrier ``plan_chain`` uses for ``work_dtype``)."""
    return _AMPLIFICATION_LIMIT[_carrier(work_dtype)] ** (-1.0 / max(num_blocks, 1))


def _round_up(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits."""
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return round(math.ceil(value / scale - 1e-9) * scale, 12)


def faithful_gamma(num_blocks: int) -> float:
    """The faithful policy for one chain: the gamma closest to 0 (the source ResNet's own function, for the
    drop-in f) at which the chain trains memory-efficiently and exactly, keeping no more bytes for backward than
    at the paper's gamma = 0.9, or a few per cent more to keep the source's function exactly.

    That is 0 where the chain stores its inputs at gamma 0 (it never inverts; ZERO_GAMMA_STORE_RATIO), else the smallest gamma whose inverse
    amplifies rounding by at most POLICY_AMPLIFICATION = 2^8 over the chain, 2^(-8/N) rounded up to 3 significant
    digits: one float64 state, as at 0.9. The policy is planned for float32 work, and holds under bfloat16/float16
    autocast too, whose plans also carry a float64 state (or store inputs where those are cheaper): one set of
    values for every precision, so a model converted once trains exactly in any.
    """
    work_dtype = torch.float32
    num_blocks = int(num_blocks)
    if num_blocks < 1 or plan_chain(0.0, num_blocks, work_dtype).store_inputs:
        return 0.0
    budget = plan_bytes(plan_chain(PAPER_GAMMA, num_blocks, work_dtype), num_blocks, work_dtype)
    gamma = _round_up(POLICY_AMPLIFICATION ** (-1.0 / num_blocks))
    while plan_bytes(plan_chain(gamma, num_blocks, work_dtype), num_blocks, work_dtype) > budget:
        gamma = _round_up(gamma * (1 + 1e-3))  # only where rounding put gamma a hair under a span's edge
    return gamma


def check_invertible(gamma: float, num_blocks: int, work_dtype: torch.dtype = torch.float32) -> None:
    """Say whether a chain of ``num_blocks`` blocks can run memory-efficiently at this gamma.

    Raises ValueError when gamma cannot be inverted at all; warns when the chain must store its state
    more than once (or all its inputs) to stay exact, naming the gamma that would need no extra storage. At
    construction the work dtype is not known yet: float32 is checked, the default. (Under bfloat16/float16
    autocast the state is float64 as well, and a chain of half-precision inputs stores them where they cost no
    more than that state; see ``plan_chain``.)
    """
    plan = plan_chain(gamma, num_blocks, work_dtype)
    if plan.store_inputs and (gamma == 0.0 or  # the plan stores inputs at gamma 0 only where they are cheap
                              plan_bytes(plan, num_blocks, work_dtype) <= 2 * _itemsize(_carrier(work_dtype))):
        return
    safe = _round_up(min_safe_gamma(num_blocks, work_dtype))
    if plan.span < 1:
        raise ValueError(
            f'gamma={gamma} cannot be inverted: rounding error grows like gamma^-N in the inverse; '
            f'use memory_efficient=False, or gamma >= {safe:g} for a chain of {num_blocks} blocks')
    if plan.store_inputs or plan.span < num_blocks:
        kept = 'stores every block\'s input' if plan.store_inputs else f'stores its state every {plan.span} blocks'
        warnings.warn(
            f'gamma={gamma} amplifies rounding error in the inverse by gamma^-{num_blocks} = '
            f'{gamma ** -num_blocks:.3g} over a chain of {num_blocks} blocks; to keep gradients exact the chain '
            f'{kept}, which costs memory. gamma >= {safe:g} needs no extra storage.', stacklevel=3)


class frozen_norm_stats:
    """Keep norm layers' running statistics as they are while blocks are recomputed.

    Inside, each norm layer in training mode updates scratch copies of running_mean, running_var and
    num_batches_tracked, which are dropped on exit; outputs and the kernels that compute them are
    exactly those of the forward, which updated the real statistics once. Re-enterable, since a
    checkpoint recomputes once per backward.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.stashed: List[Tuple[nn.Module, dict]] = []

    def __enter__(self) -> None:
        for module in self.modules:
            for norm in module.modules():
                if isinstance(norm, _NormBase) and norm.training and norm.track_running_stats:
                    # straight into the buffer dict, skipping Module.__setattr__ (benchmarks/CALIBRATION.md)
                    buffers = norm._buffers
                    originals = {name: buffers[name] for name in _NORM_STATS if buffers.get(name) is not None}
                    self.stashed.append((norm, originals))
                    for name, tensor in originals.items():
                        buffers[name] = tensor.clone()

    def __exit__(self, *exc_info: object) -> None:
        for norm, originals in self.stashed:
            norm._buffers.update(originals)
        self.stashed = []


def _recompute_context(modules: Sequence[nn.Module]) -> Tuple[contextlib.nullcontext, frozen_norm_stats]:
    """checkpoint's context_fn: nothing around the forward, frozen norm statistics around the recompute."""
    return contextlib.nullcontext(), frozen_norm_stats(modules)


def checkpoint_blocks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      modules: Sequence[nn.Module]) -> torch.Tensor:
    """Run ``fn(x)`` under activation checkpointing that restores RNG and autocast state on recompute
    and does not update the norm statistics of ``modules`` a second time."""
    if torch.compiler.is_compiling():
        # The compiled backward recomputes from the traced graph, whose buffer updates run once, in the
        # forward; dynamo traces checkpoint only without a context_fn.
        return checkpoint(fn, x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=False, context_fn=functools.partial(_recompute_context, modules))


def _autocast_state(device_type: str) -> Tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type``, and its dtype; off for devices without autocast (meta)."""
    if not torch.amp.is_autocast_available(device_type):
        return False, torch.float32
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype blocks compute in: autocast's where autocast is on, else the input's."""
    enabled, dtype = _autocast_state(x.device.type)
    if enabled and x.dtype in (torch.float32, torch.float64):
        return dtype
    return x.dtype


class _ChainSpec:
    """What the autograd Function needs besides tensors: the blocks, f and gamma."""

    def __init__(self, blocks: Sequence[nn.Module], block_fn: BlockFn, gamma: float) -> None:
        self.blocks = list(blocks)
        self.block_fn = block_fn
        self.gamma = gamma
        self.params = [list(block.parameters()) for block in self.blocks]


# Module types whose own training forward draws no random numbers (their children are checked apart). A
# block made only of these needs no RNG state captured and replayed for its recompute; any other module
# (dropout, drop path, a user's own) gets it. Model code adds its block containers with ``register_deterministic``.
_DETERMINISTIC: List[type] = [
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.modules.conv._ConvNd, nn.Linear,
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd]


def register_deterministic(*module_types: type) -> None:
    """Declare module types whose own forward draws no random numbers (children are checked on their own)."""
    for t in module_types:
        if not isinstance(t, type):
            raise TypeError(f'register_deterministic takes module classes, got {t!r}')
    _DETERMINISTIC.extend(t for t in module_types if t not in _DETERMINISTIC)


def _draws_random_numbers(block: nn.Module) -> bool:
    """Whether a training forward of ``block`` may draw random numbers (then its recompute replays them)."""
    deterministic = tuple(_DETERMINISTIC)
    for module in block.modules():
        if not module.training or isinstance(module, deterministic):
            continue
        if getattr(module, 'drop_prob', None) == 0.0 or getattr(module, 'p', None) == 0.0:
            continue  # timm's DropPath/DropBlock2d and torch's dropouts at rate 0 return their input
        return True
    return False


def _capture_rng(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    device_state = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    return torch.get_rng_state(), device_state


@contextlib.contextmanager
def _replay(block: nn.Module, rng: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]],
            device: torch.device, autocast: Tuple[bool, torch.dtype]) -> Iterator[None]:
    """Recompute a block as the forward ran it: same RNG draws, same autocast, no second norm update."""
    devices = [device] if device.type == 'cuda' else []
    with contextlib.ExitStack() as stack:
        if rng is not None:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
        stack.enter_context(torch.enable_grad())
        if torch.amp.is_autocast_available(device.type):
            stack.enter_context(torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0]))
        stack.enter_context(frozen_norm_stats([block]))
        yield


def _gap(rebuilt: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Relative distance between a rebuilt tensor and the exact one, as a 0-dim tensor."""
    return (rebuilt - exact).norm() / exact.norm().clamp_min(torch.finfo(exact.dtype).tiny)


# Width of the sketch of a chain's input (a prime, so that no power-of-two or spatial period of the
# tensor's layout lines up with it), and the fixed seed of its random signs.
_SKETCH_WIDTH = 251
_SKETCH_SEED = 20210301


def _sketch_signs(state: torch.Tensor) -> torch.Tensor:
    """Fixed random signs, one per row of ``state`` laid out as a (rows, _SKETCH_WIDTH) matrix."""
    rows = state.numel() // _SKETCH_WIDTH
    if state.device.type == 'meta':  # shapes only: meta has no generator and no values to check
        return state.new_empty(rows)
    # drawn on the state's device: a host-to-device copy from pageable memory would wait for the stream
    generator = torch.Generator(state.device).manual_seed(_SKETCH_SEED)
    signs = torch.randint(0, 2, (rows,), generator=generator, device=state.device)
    return signs.to(state.dtype).mul_(2).sub_(1)


def _sketch(state: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """A random linear sketch of ``state``: _SKETCH_WIDTH signed sums of its elements, plus the leftover tail.

    Element i goes to sum i mod _SKETCH_WIDTH with the sign of its row, so E|sketch(e)|^2 = |e|^2 for
    any error e: the sketch's distance estimates the tensor's distance (a CountSketch), in one pass and
    without the float64 copy a projection matrix would need. ``state`` must be dense (it is: the chain
    made it), and is read in memory order.
    """
    flat = state.as_strided((state.numel(),), (1,))
    body = signs.numel() * _SKETCH_WIDTH
    return torch.cat([signs @ flat[:body].view(-1, _SKETCH_WIDTH), flat[body:]])


# (the module's parameter or buffer dict, the name in it, the tensor, its version counter at the end of forward)
_Read = Tuple[dict, str, torch.Tensor, int]


def _recompute_reads(blocks: Sequence[nn.Module]) -> List[_Read]:
    """The parameters and buffers the memory-efficient backward's recompute of ``blocks`` reads, with their versions.

    Standard backprop saves these tensors, so autograd raises when one is changed in place before backward. The
    recompute reads them afresh instead, so it checks them itself. Left out, as autograd leaves them out: the
    running statistics of norm layers in training mode, which the forward does not read and a second forward
    updates in place.
    """
    reads = []
    for block in blocks:
        for module in block.modules():
            for name, tensor in module._parameters.items():
                if tensor is not None:
                    reads.append((module._parameters, name, tensor, tensor._version))
            training_norm = isinstance(module, _NormBase) and module.training
            for name, tensor in module._buffers.items():
                if tensor is not None and not (training_norm and name in _NORM_STATS):
                    reads.append((module._buffers, name, tensor, tensor._version))
    return reads


def _check_unchanged(reads: Sequence[_Read], blocks: Sequence[nn.Module]) -> None:
    """Raise as autograd does when a tensor the recompute reads was changed in place (or replaced) after forward:
    the rebuilt activations, and so the gradients, would be those of other weights."""
    for where, name, tensor, version in reads:
        if where.get(name) is tensor and tensor._version == version:
            continue
        qualified = next((f'block {n} {prefix + "." if prefix else ""}{name}' for n, block in enumerate(blocks)
                          for prefix, module in block.named_modules()
                          if where is module._parameters or where is module._buffers), name)
        what = f'{qualified} [{tensor.type()} {list(tensor.shape)}]'
        if where.get(name) is not tensor:
            raise RuntimeError(f'one of the variables needed for gradient computation has been replaced: {what} is '
                               f'another tensor than in forward, and the memory-efficient backward recomputes the '
                               f'blocks from their current weights')
        raise RuntimeError(f'one of the variables needed for gradient computation has been modified by an inplace '
                           f'operation: {what} is at version {tensor._version}; expected version {version} instead. '
                           f'The memory-efficient backward recomputes the blocks from their weights, so they must '
                           f'not change between forward and backward.')


class _InvertibleMomentum(torch.autograd.Function):
    """One momentum chain as one autograd node that keeps only its final state for backward.

    The backward checks its own reconstruction: the rebuilt chain input against a sketch of the real
    one taken in forward, and every rebuilt state against the stored ones. Where rounding made the
    rebuilt activations drift past the working precision it warns, and where gradients would be
    wrong it raises (see ``set_strict_check`` for when).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: _ChainSpec, *params: torch.Tensor) -> torch.Tensor:
        autocast = _autocast_state(x.device.type)
        work_dtype = _work_dtype(x)
        carrier, span, store_inputs = plan_chain(spec.gamma, len(spec.blocks), work_dtype, x.dtype)
        if span < 1:
            raise ValueError(
                f'gamma={spec.gamma} cannot be inverted; use memory_efficient=False '
                f'or gamma >= {_round_up(min_safe_gamma(len(spec.blocks), work_dtype)):g}')
        gamma = spec.gamma
        dropin = spec.block_fn is dropin_fn
        rng_states: List[Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]] = []
        x_state = x.to(carrier, copy=True)
        v_state = None
        x_in = x
        stored = []
        if not store_inputs:
            signs = _sketch_signs(x_state)
            stored += [signs, _sketch(x_state, signs)]
        for n, block in enumerate(spec.blocks):
            if store_inputs:
                stored.append(x_in if n else x.clone())
            elif n and n % span == 0:
                stored += [x_state.clone(), v_state.clone()]
            rng_states.append(_capture_rng(x.device) if _draws_random_numbers(block) else None)
            out = block(x_in) if dropin else spec.block_fn(block, x_in)
            v_state, x_in = forward_update(x_state, v_state, out, x_in if dropin else None, gamma, x.dtype)
            del out
        ctx.store_inputs = store_inputs
        ctx.spec = spec
        ctx.rng_states = rng_states
        ctx.autocast = autocast
        ctx.span = span
        ctx.in_dtype = x.dtype
        ctx.work_dtype = work_dtype
        ctx.reads = _recompute_reads(spec.blocks)
        # x_in is the chain's output, x_state rounded to the input dtype in a tensor of its own: the
        # backward rebuilds x in the saved state's storage and the caller's output must not move
        if store_inputs:
            ctx.save_for_backward(*stored)
            return x_in
        ctx.save_for_backward(x_state, v_state, *stored)
        return x_in

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        _check_pending()
        _check_unchanged(ctx.reads, ctx.spec.blocks)
        # The saved state is rebuilt in place, so a second backward through this node fails loudly
        # (autograd's "modified by an inplace operation") instead of using stale activations.
        if ctx.store_inputs:
            grad_x, param_grads = _backward_from_inputs(ctx, grad_out, ctx.saved_tensors)
        else:
            grad_x, param_grads = _backward_by_inverse(ctx, grad_out, *ctx.saved_tensors)
        return (grad_x.to(ctx.in_dtype), None, *param_grads)


def _backward_from_inputs(ctx, grad_out: torch.Tensor, inputs: Sequence[torch.Tensor]
                          ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The backward of a chain that stored each block's input: recompute and pull back each block, last first."""
    adjoint = _Adjoint(grad_out, ctx.spec.gamma)
    param_grads = []
    for n in reversed(range(len(ctx.spec.blocks))):
        _, grads = _pull_back(ctx, n, inputs[n], adjoint)
        param_grads.append(grads)
    return adjoint.grad_x, [g for block_grads in reversed(param_grads) for g in block_grads]


def _backward_by_inverse(ctx, grad_out: torch.Tensor, x_state: torch.Tensor, v_state: torch.Tensor,
                         signs: torch.Tensor, input_sketch: torch.Tensor, *stored: torch.Tensor
                         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """The backward of a chain that inverts: from the final state, rebuild each block's input with the inverse
    rule, recompute and pull back the block; each span starts from the exact state stored at its end. Then check
    the rebuilt states against the stored ones and the rebuilt chain input against its sketch."""
    spec, span = ctx.spec, ctx.span
    dropin = spec.block_fn is dropin_fn
    # the state stored in forward before block ``n``, for each span's end n
    span_ends = {span * (j + 1): (stored[2 * j], stored[2 * j + 1]) for j in range(len(stored) // 2)}
    adjoint = _Adjoint(grad_out, spec.gamma)
    param_grads, gaps = [], []
    x_in = None
    check = grad_out.device.type != 'meta'  # meta tensors have shapes, not values to check
    for n in reversed(range(len(spec.blocks))):
        if n + 1 in span_ends:
            exact_x, exact_v = span_ends[n + 1]
            gaps += [_gap(x_state, exact_x), _gap(v_state, exact_v)]
            _release(x_state, v_state)
            x_state, v_state, x_in = exact_x, exact_v, None
        if x_in is None:  # the chain's last block, or a span's end
            x_in = previous_position(x_state, v_state, ctx.in_dtype)
        if n == 0:  # x_state is the rebuilt chain input: check it, then the state's bytes are not needed
            if check:
                gaps.append(_gap(_sketch(x_state, signs), input_sketch))
            _release(x_state, v_state)
        out, grads = _pull_back(ctx, n, x_in, adjoint)
        param_grads.append(grads)
        branch_input = x_in if dropin else None
        if n > 0 and n % span:  # v_{n-1}, then the input of block n - 1, in one pass
            x_in = previous_velocity_and_position(x_state, v_state, out, branch_input, spec.gamma, ctx.in_dtype)
        elif n > 0:  # a span's start: the stored state takes over, v_{n-1} only feeds the check
            previous_velocity(x_state, v_state, out, branch_input, spec.gamma)
        del out  # not alive at the next block's recompute, where the step's memory peaks
    if check:
        _report_reconstruction(torch.stack(gaps).max(), ctx.work_dtype, spec.gamma, len(spec.blocks))
    return adjoint.grad_x, [g for block_grads in reversed(param_grads) for g in block_grads]


def _release(*states: torch.Tensor) -> None:
    """Free the bytes of saved states the backward has finished with, before the recomputes that follow, where
    the step's memory peaks (the parameter gradients are all there by the chain's first block). Autograd keeps
    a saved tensor until the node's backward returns; a state rebuilt in place can never be read again (a second
    backward fails on its version), so its storage is emptied. Only a state that owns its storage exactly is
    freed: one a saved-tensor hook packed into a shared buffer is left alone."""
    for state in states:
        storage = state.untyped_storage()
        if (state.device.type != 'meta' and state.is_contiguous() and state.storage_offset() == 0
                and storage.nbytes() == state.numel() * state.element_size()):
            storage.resize_(0)


def _pull_back(ctx, n: int, x_in: torch.Tensor, adjoint: '_Adjoint'
               ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Recompute block ``n`` on ``x_in`` as the forward ran it and take its step of the adjoint; returns the
    block's output (for the inverse) and its parameters' gradients."""
    spec = ctx.spec
    with _replay(spec.blocks[n], ctx.rng_states[n], adjoint.grad_out.device, ctx.autocast):
        out, grad_in, grads = _block_vjp(spec, n, x_in, adjoint.block_grad)
    adjoint.accumulate(grad_in, dropin=spec.block_fn is dropin_fn, last_step=n == 0)
    return out, grads


def _block_vjp(spec: _ChainSpec, n: int, x_in: torch.Tensor, block_grad: torch.Tensor
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Recompute the block on ``x_in`` and pull ``block_grad`` back through f.

    Returns the block's output (detached): f itself, or block(x) for the drop-in f = block(x) - x, whose
    subtraction the inverse's step does in the same pass. Then J_x^T block_grad (None if f
    ignores x) and J_theta^T block_grad for each of the block's parameters (None for frozen ones). For the
    drop-in f, J_x^T leaves out the identity's -block_grad, which ``_Adjoint.accumulate`` subtracts in place.
    """
    block, params = spec.blocks[n], spec.params[n]
    trainable = [p for p in params if p.requires_grad]
    x_in = x_in.detach().requires_grad_(True)
    out = block(x_in) if spec.block_fn is dropin_fn else spec.block_fn(block, x_in)
    grads = torch.autograd.grad(out, [x_in] + trainable, block_grad.to(out.dtype), allow_unused=True)
    by_param = iter(grads[1:])
    return out.detach(), grads[0], [next(by_param) if p.requires_grad else None for p in params]


class _Adjoint:
    """The adjoint of the momentum rule (PAPER.md), walked from the chain's end to its start.

    It carries g_x = dL/dx_n and the blocks' output gradient (1 - gamma) g with g = g_x + dL/dv_n, so the
    blocks' parameter gradients come out already scaled; both in float32 or wider.
    """

    def __init__(self, grad_out: torch.Tensor, gamma: float) -> None:
        self.gamma = gamma
        self.grad_out = grad_out
        self.grad_x: Optional[torch.Tensor] = None
        self.block_grad = torch.mul(grad_out, 1.0 - gamma).to(torch.promote_types(grad_out.dtype, torch.float32))

    def accumulate(self, grad_in: Optional[torch.Tensor], dropin: bool, last_step: bool) -> None:
        """g_x += J_x^T [(1 - gamma) g] (less (1 - gamma) g for the drop-in identity), then, for the step
        before, (1 - gamma) g <- (1 - gamma) g_x + gamma (1 - gamma) g: one lerp."""
        if self.grad_x is None:
            self.grad_x = self.grad_out.to(self.block_grad.dtype, copy=True)
        adjoint_update(self.grad_x, grad_in, self.block_grad, self.gamma, dropin, last_step)


# Reconstruction gaps of CUDA backwards still on their way to the host: (gap, event, dtype, gamma, blocks).
_PENDING: List[Tuple[torch.Tensor, object, torch.dtype, float, int]] = []


def _report_reconstruction(worst_gap: torch.Tensor, work_dtype: torch.dtype, gamma: float, num_blocks: int) -> None:
    if strict_check_enabled() or worst_gap.device.type != 'cuda':
        _check_reconstruction(worst_gap.item(), work_dtype, gamma, num_blocks)
        return
    host = torch.empty((), dtype=worst_gap.dtype, pin_memory=True)
    host.copy_(worst_gap, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING.append((host, event, work_dtype, gamma, num_blocks))


def _check_pending() -> None:
    """Check the gaps of earlier backwards whose values have reached the host."""
    while _PENDING and _PENDING[0][1].query():
        host, _, work_dtype, gamma, num_blocks = _PENDING.pop(0)
        _check_reconstruction(host.item(), work_dtype, gamma, num_blocks)


def _check_reconstruction(worst_gap: float, work_dtype: torch.dtype, gamma: float, num_blocks: int) -> None:
    """Warn when rebuilt activations drifted past the working precision; raise when gradients would be wrong."""
    tol = _RECONSTRUCTION_TOL.get(work_dtype, 5e-6)
    if worst_gap <= tol:
        return
    if not math.isfinite(worst_gap):  # the inverse amplifies rounding by at most 2^24 (plan_chain): not an overflow
        raise RuntimeError(f'memory-efficient backward of a {num_blocks}-block momentum chain: the input or the '
                           f'activations hold NaN or inf, so its gradients cannot be computed. Check the input '
                           f'batch and the weights (a diverged step, a too-large lr); gamma is not the cause.')
    what = (f'memory-efficient backward rebuilt the activations of a {num_blocks}-block momentum chain at '
            f'gamma={gamma} with relative error {worst_gap:.3g} (expected <= {tol:g} for {work_dtype}): '
            f'the blocks amplify rounding in the inverse')
    if not worst_gap <= _RECONSTRUCTION_FAIL.get(work_dtype, 5e-5):  # also catches NaN
        raise RuntimeError(f'{what}; gradients would be wrong. Use a gamma closer to 1, or memory_efficient=False.')
    warnings.warn(f'{what}; gradients may carry a relative error up to 1000 times that. A gamma closer to 1 or '
                  f'memory_efficient=False avoids it.', RuntimeWarning, stacklevel=2)


@torch.compiler.disable
def _invertible_chain(x: torch.Tensor, spec: _ChainSpec) -> torch.Tensor:
    """The memory-efficient chain as one opaque call for torch.compile: its forward reads RNG state and
    storage pointers and its backward syncs once on the reconstruction check, so it runs eagerly (blocks
    included) while the code around it compiles."""
    return _InvertibleMomentum.apply(x, spec, *[p for ps in spec.params for p in ps])


def momentum_chain(
        x: torch.Tensor,
        blocks: Sequence[nn.Module],
        gamma: float,
        block_fn: BlockFn = dropin_fn,
        memory_efficient: bool = False,
        grad_checkpointing: bool = False,
) -> torch.Tensor:
    """Run ``x`` through a momentum chain, with v = 0 at its start.

    Args:
        x: Input of the first block.
        blocks: The chain's blocks f_1 ... f_N, applied through ``block_fn``.
        gamma: Momentum in [0, 1]; 0 gives a plain residual chain.
        block_fn: ``block_fn(block, x)`` returns f(x).
        memory_efficient: When gradients are needed, rebuild activations in backward from the final
            state instead of storing them.
        grad_checkpointing: In standard mode, recompute each block in backward from its stored input.

    Returns:
        x_N, the chain's final position.

    Note:
        The memory-efficient backward, like ``grad_checkpointing`` and ``torch.utils.checkpoint``, recomputes each
        block, so forward hooks on the blocks (and on their submodules) fire a second time there, with gradients
        enabled: a hook that counts or logs calls sees two per block and training step. A hook that changes the
        block's output must change it the same way both times, or the recomputed activations differ from the
        forward's.
    """
    gamma = validate_gamma(gamma)
    if not blocks:
        return x
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for block in blocks for p in block.parameters()))
    if gamma == 0.0 and block_fn is dropin_fn and not (needs_grad and (memory_efficient or
                                                        standard_matches_memory_efficient())):
        # v_n = f_n and x_n = x_{n-1} + f_n = block(x_{n-1}): the plain blocks, bit for bit, nothing else to do
        return _plain_chain(x, blocks, grad_checkpointing and needs_grad)
    if not needs_grad:  # eval and no_grad: the plain forward, in the input's dtype
        return _autograd_chain(x, blocks, gamma, block_fn, False, x.dtype)
    if memory_efficient:
        return _invertible_chain(x, _ChainSpec(blocks, block_fn, gamma))
    if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        return _stepped_chain(x, blocks, gamma, block_fn, grad_checkpointing)
    # torch.compile fuses the plain ops itself; half-precision inputs keep autograd's float32 gradients
    return _autograd_chain(x, blocks, gamma, block_fn, grad_checkpointing, standard_carrier(x, gamma, len(blocks)))


def standard_carrier(x: torch.Tensor, gamma: float, num_blocks: int) -> torch.dtype:
    """The dtype standard mode carries the state (x, v) of a chain of ``num_blocks`` blocks in: the input's, and
    at least float32.

    Standard mode never inverts, so it needs no wider state; the memory-efficient forward carries float64 where it
    inverts (``plan_chain``), and there the two modes' outputs differ by the rounding of the state's sums in float32.
    ``set_standard_matches_memory_efficient(True)`` carries the plan's dtype instead: both modes bitwise the same.
    """
    if standard_matches_memory_efficient():
        return torch.promote_types(plan_chain(gamma, num_blocks, _work_dtype(x), x.dtype).carrier, x.dtype)
    return torch.promote_types(x.dtype, torch.float32)


def _run_block(fn: BlockFn, block: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """``fn(block, x)``, recomputed in backward from its stored input under ``grad_checkpointing``."""
    if grad_checkpointing:
        return checkpoint_blocks(functools.partial(fn, block), x, [block])
    return fn(block, x)


def _plain_chain(x: torch.Tensor, blocks: Sequence[nn.Module], grad_checkpointing: bool) -> torch.Tensor:
    """The drop-in chain at gamma = 0: its blocks one after another, as the source network runs them."""
    for block in blocks:
        x = _run_block(_block_output, block, x, grad_checkpointing)
    return x


def _autograd_chain(x: torch.Tensor, blocks: Sequence[nn.Module], gamma: float, block_fn: BlockFn,
                    grad_checkpointing: bool, carrier: torch.dtype) -> torch.Tensor:
    """The chain as plain tensor ops (``forward_step`` out of place), with the state in ``carrier``; autograd,
    where it records, differentiates them."""
    position, velocity = x.to(carrier), None
    for block in blocks:
        out = _run_block(block_fn, block, position.to(x.dtype), grad_checkpointing)
        position, velocity = forward_step(position, velocity, out.to(carrier), gamma, inplace=False)
    return position.to(x.dtype)


def _stepped_chain(x: torch.Tensor, blocks: Sequence[nn.Module], gamma: float, block_fn: BlockFn,
                   grad_checkpointing: bool) -> torch.Tensor:
    """The chain in standard backprop with one ``_MomentumStep`` per block, whose forward and backward are each a
    few element-wise passes outside autograd (``kernels.next_position``, ``kernels.standard_adjoint``)."""
    dropin = block_fn is dropin_fn  # the step subtracts the drop-in f's input itself, in the update's pass
    step_fn = _block_output if dropin else block_fn
    # positions alone (the velocity is the last step), or, where it must match the memory-efficient forward
    # bitwise, that forward's own state (x, v) in its dtype, updated in place by its own forward_update
    matched = standard_matches_memory_efficient()
    state = _StepState(x.detach().to(standard_carrier(x, gamma, len(blocks)), copy=True) if matched else None)
    position, block_token, direct_token = x, None, None
    for block in blocks:
        out = _run_block(step_fn, block, position, grad_checkpointing)
        position, block_token, direct_token = _MomentumStep.apply(
            out, position, block_token, direct_token, state, gamma, dropin)
    return position


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block(x): the drop-in f = block(x) - x before its subtraction."""
    return block(x)


class _StepState:
    """What a chain's steps pass forward outside autograd: the position before the last (x_{n-2}), or, where
    standard mode matches the memory-efficient forward, that forward's state (x, v) in its own dtype."""

    def __init__(self, x: Optional[torch.Tensor]) -> None:
        self.previous: Optional[torch.Tensor] = None
        self.x = x
        self.v: Optional[torch.Tensor] = None


class _MomentumStep(torch.autograd.Function):
    """One block's update in standard backprop, as a few element-wise passes with nothing saved (the rule is linear).

    Forward: x_n from block n's output, x_{n-1} and x_{n-2} (``kernels.next_position``), a new tensor, the next
    block's input; or, matching the memory-efficient forward, that forward's ``kernels.forward_update`` of its state.
    For the drop-in f the step takes block(x) and subtracts x itself.

    Backward (``kernels.standard_adjoint``): two zero-stride tokens stand for the state between steps, and their
    gradients carry the adjoint from block n + 1 to block n outside autograd's sums: (1 - gamma) g_{n+1}, and the
    direct part of dL/dx_n (through the rule, not through block n + 1), a tensor of the chain's own that each step
    updates in place. Only the chain's first step hands the direct part to autograd, for the chain's input.
    """

    generate_vmap_rule = True  # torch.func transforms (grad, vmap, ...) work as through the plain ops

    @staticmethod
    def forward(out: torch.Tensor, position: torch.Tensor, block_token: Optional[torch.Tensor],
                direct_token: Optional[torch.Tensor], state: _StepState, gamma: float, dropin: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if state.x is None:
            next_x = next_position(position, state.previous, out, gamma, dropin)
            state.previous = position
        else:
            state.v, next_x = forward_update(state.x, state.v, out, position if dropin else None, gamma,
                                                     position.dtype)
        shape = next_x.shape
        return next_x, position.new_zeros(()).expand(shape), position.new_zeros(()).expand(shape)

    @staticmethod
    def setup_context(ctx, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
        out, _, block_token, _, _, gamma, dropin = inputs
        ctx.set_materialize_grads(False)
        ctx.gamma, ctx.out_dtype, ctx.first, ctx.dropin = gamma, out.dtype, block_token is None, dropin

    @staticmethod
    def backward(ctx, grad_position: Optional[torch.Tensor], grad_block: Optional[torch.Tensor],
                 grad_direct: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        if grad_position is None and grad_direct is None:  # then no step after this one had a gradient either
            return None, None, None, None, None, None, None
        block_grad, direct = standard_adjoint(grad_position, grad_direct, grad_block, ctx.gamma, ctx.dropin)
        if ctx.first:  # dL/dx_0 = J^T (from block 1, through autograd) + the direct part
            return block_grad.to(ctx.out_dtype), direct, None, None, None, None, None
        return block_grad.to(ctx.out_dtype), None, block_grad, direct, None, None, None
