"""Memory-efficient (invertible) training gives the gradients, statistics and RNG draws of standard backprop."""
import copy
import os
import warnings
from unittest import mock

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from timm_momentum.core import chain as invertible
from timm_momentum.core.chain import min_safe_gamma, momentum_chain, plan_bytes, plan_chain
from timm_momentum.core.config import set_standard_matches_memory_efficient

from conftest import relative_error

# Standard and memory-efficient modes compared bitwise: standard mode's state in float64, as the memory-efficient
# forward carries it (the default float32 state is tested in test_standard_mode_by_default_sums_in_float32).
pytestmark = pytest.mark.usefixtures('standard_matches_memory_efficient')


def _grads(module: nn.Module, x: torch.Tensor, seed: int = 0):
    """Output, input gradient and parameter gradients of a weighted sum of the output."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = module(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad, [p.grad for p in module.parameters()]


def _deepest_stage(gamma: float) -> nn.Module:
    """layer3 of momentum_resnet152 (a 35-block chain), with trained-like small residual branches."""
    model = timm.create_model('momentum_resnet152', gamma=gamma, zero_init_last=False)
    with torch.no_grad():
        for block in model.layer3:
            block.bn3.weight.mul_(0.2)
    return model.layer3


@pytest.mark.parametrize('gamma', [pytest.param(0.5, marks=pytest.mark.slow), 0.854,  # 0.854: the policy's
                                   pytest.param(0.9, marks=pytest.mark.slow), pytest.param(0.99, marks=pytest.mark.slow)])
def test_gradients_match_standard_backprop_on_deepest_stage(gamma):
    standard = _deepest_stage(gamma)
    efficient = copy.deepcopy(standard)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        efficient.set_momentum(memory_efficient=True)
    # 0.5^-35 outgrows what float64 absorbs: the chain says so and stores its state once more
    assert bool(caught) == (gamma < min_safe_gamma(35))
    x = torch.randn(2, 512, 8, 8)
    out_s, gx_s, gp_s = _grads(standard, x)
    out_e, gx_e, gp_e = _grads(efficient, x)
    assert torch.equal(out_s, out_e)  # both modes run the same arithmetic
    errors = [relative_error(gx_e, gx_s)] + [relative_error(a, b) for a, b in zip(gp_e, gp_s)]
    print(f'gamma={gamma}: input grad rel err {errors[0]:.2e}, worst parameter grad rel err {max(errors[1:]):.2e}')
    assert max(errors) <= 1e-5
    for buf_s, buf_e in zip(standard.buffers(), efficient.buffers()):
        assert torch.equal(buf_s, buf_e)  # statistics updated once, from the same batch


def test_standard_mode_by_default_sums_in_float32():
    """By default standard mode steps its positions in the input's dtype (float32), never a float64 state: on
    resnet152's 35-block layer3 its output and gradients stay within 1e-5 of the memory-efficient mode's (float64
    state)."""
    set_standard_matches_memory_efficient(False)
    standard = _deepest_stage(0.9)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 512, 8, 8)
    with mock.patch.object(invertible, 'next_position', wraps=invertible.next_position) as update, \
            mock.patch.object(invertible, 'forward_update') as in_place:
        out_s, gx_s, gp_s = _grads(standard, x)
    assert {call.args[0].dtype for call in update.call_args_list} == {torch.float32} and update.call_count == 35
    assert in_place.call_count == 0  # no float64 state updated in place
    out_e, gx_e, gp_e = _grads(efficient, x)
    assert not torch.equal(out_s, out_e)  # other rounding of the state's sums ...
    assert relative_error(out_e, out_s) <= 1e-5  # ... within float32's
    errors = [relative_error(gx_e, gx_s)] + [relative_error(a, b) for a, b in zip(gp_e, gp_s)]
    assert max(errors) <= 1e-5


def test_standard_mode_at_gamma_zero_trains_as_the_source_bit_for_bit():
    """At gamma 0 the drop-in chain is its blocks (x_n = x_{n-1} + f_n = block(x_{n-1})): a training step of
    momentum_resnet50 in standard mode gives timm's resnet50's logits, gradients and statistics, bit for bit."""
    set_standard_matches_memory_efficient(False)
    source = timm.create_model('resnet50', num_classes=10, zero_init_last=False)
    model = timm.create_model('momentum_resnet50', num_classes=10, gamma=0.0)
    model.load_state_dict(source.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_m, gx_m, gp_m = _grads(model, x)
    out_s, gx_s, gp_s = _grads(source, x)
    assert torch.equal(out_m, out_s) and torch.equal(gx_m, gx_s)
    assert all(torch.equal(a, b) for a, b in zip(gp_m, gp_s))
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[name], b) for name, b in source.named_buffers())


def _train(model: nn.Module, batches, lr: float = 0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(100 + step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_batchnorm_statistics_match_after_several_steps():
    base = timm.create_model('momentum_resnet18', num_classes=5, zero_init_last=False)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))) for _ in range(3)]
    standard = _train(copy.deepcopy(base), batches, lr=0.01)
    efficient = copy.deepcopy(base)
    efficient.set_momentum(memory_efficient=True)
    _train(efficient, batches, lr=0.01)
    for (name, buf_s), buf_e in zip(standard.named_buffers(), efficient.buffers()):
        if name.endswith('num_batches_tracked'):
            assert int(buf_e) == int(buf_s) == 3, name
        else:
            # The modes' gradients differ by rounding (6e-7); three SGD steps on this random network (train-mode
            # norms over batches of 4) amplify that in the weights and the statistics.
            assert relative_error(buf_e, buf_s) <= 2e-4, name


def test_drop_path_masks_are_replayed():
    standard = timm.create_model('momentum_resnet50', drop_path_rate=0.5, zero_init_last=False)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 3, 32, 32)
    out_s, gx_s, gp_s = _grads(standard, x, seed=7)
    out_e, gx_e, gp_e = _grads(efficient, x, seed=7)
    assert torch.equal(out_s, out_e)
    assert relative_error(gx_e, gx_s) <= 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_e, gp_s)) <= 1e-5
    _, _, gp_other = _grads(efficient, x, seed=8)  # other masks really give other gradients
    assert relative_error(gp_other[0], gp_s[0]) > 1e-3


def test_paper_block_function_gradients_match_standard_backprop():
    # the residual-branch f goes through the generic vector-Jacobian product, the drop-in one a shortcut
    standard = timm.create_model('momentum_mresnet50', num_classes=10, zero_init_last=False)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 3, 64, 64)
    out_s, gx_s, gp_s = _grads(standard, x)
    out_e, gx_e, gp_e = _grads(efficient, x)
    assert torch.equal(out_s, out_e)
    assert relative_error(gx_e, gx_s) <= 1e-5
    # compared as one vector: the training-mode norms after each stage make the loss blind to a constant
    # added per channel, so the chains' bn3.bias gradients are rounding noise (1e-7 of the others) in both
    assert relative_error(torch.cat([g.flatten() for g in gp_e]), torch.cat([g.flatten() for g in gp_s])) <= 1e-5


class _Float64Kernels(TorchDispatchMode):
    """Counts aten kernels that read or write a float64 tensor of ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in list(args) + [out] if isinstance(t, torch.Tensor)]
        self.count += any(t.dtype == torch.float64 and t.numel() == self.numel for t in tensors)
        return out


def test_standard_backward_carries_gradients_in_the_input_dtype():
    # the float64 carrier is a forward matter: the adjoint of the linear rule needs no float64 pass
    torch.manual_seed(0)
    blocks = [nn.Conv2d(8, 8, 1) for _ in range(12)]
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert plan_chain(0.9, 12).carrier == torch.float64
    out = momentum_chain(x, blocks, 0.9)
    counter = _Float64Kernels(x.numel())
    with counter:
        out.backward(torch.ones_like(out))
    assert counter.count == 0


def test_standard_mode_gradients_are_exact_to_second_order():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()).double() for _ in range(5)]
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    for gamma in (0.0, 0.5, 0.9):
        assert torch.autograd.gradcheck(lambda x: momentum_chain(x, blocks, gamma), (x,))
        assert torch.autograd.gradgradcheck(lambda x: momentum_chain(x, blocks, gamma), (x,))


def test_standard_mode_works_under_torch_func_transforms():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(6)])
    x = torch.randn(3, 4)
    grad = torch.func.grad(lambda x: momentum_chain(x, blocks, 0.9).square().sum())(x)
    x_ = x.clone().requires_grad_(True)
    momentum_chain(x_, blocks, 0.9).square().sum().backward()
    assert torch.allclose(grad, x_.grad, rtol=1e-6, atol=1e-7)
    batched = torch.func.vmap(lambda row: momentum_chain(row, blocks, 0.9))(x)
    assert torch.allclose(batched, torch.stack([momentum_chain(row, blocks, 0.9) for row in x]), rtol=1e-6)


def test_dropin_block_that_returns_its_input_keeps_the_saved_inputs():
    # a short chain keeps its block inputs; f = block(x) - x is formed in block(x)'s storage, never in x's
    blocks = [nn.Linear(6, 6), nn.Identity(), nn.Linear(6, 6)]
    x = torch.randn(3, 6, requires_grad=True)
    out = momentum_chain(x, blocks, 0.9, memory_efficient=True)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    assert torch.allclose(x.grad, 2 * first)


def test_rng_state_is_kept_only_for_blocks_that_draw_random_numbers():
    x = torch.randn(2, 3, 32, 32)
    for drop_path_rate, captures in ((0.0, 0), (0.1, 12)):  # resnet50's chains hold 2 + 3 + 5 + 2 blocks
        model = timm.create_model('momentum_resnet50', memory_efficient=True, drop_path_rate=drop_path_rate)
        with mock.patch.object(invertible, '_capture_rng', wraps=invertible._capture_rng) as capture:
            model(x).sum().backward()
        assert capture.call_count == captures
    assert not invertible._draws_random_numbers(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Dropout(0.0)))
    assert invertible._draws_random_numbers(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Dropout(0.1)))
    assert invertible._draws_random_numbers(nn.RReLU())  # not known to be deterministic
    assert not invertible._draws_random_numbers(nn.Dropout(0.1).eval())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    tol = 4 * torch.finfo(dtype).eps  # the two modes round the backward's products differently
    standard = timm.create_model('momentum_resnet18', num_classes=5, zero_init_last=False)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = 50 * torch.randn(2, 3, 32, 32)  # large activations: the official package overflows here
    results = []
    for model in (standard, efficient):
        with torch.autocast('cpu', dtype=dtype):
            results.append(_grads(model, x))
    (out_s, gx_s, gp_s), (out_e, gx_e, gp_e) = results
    assert out_e.dtype == dtype and torch.isfinite(out_e).all()
    assert torch.equal(out_s, out_e)
    assert relative_error(gx_e, gx_s) <= tol
    assert max(relative_error(a, b) for a, b in zip(gp_e, gp_s)) <= tol


def test_eval_and_no_grad_run_the_plain_forward():
    model = timm.create_model('momentum_resnet18', memory_efficient=True)
    x = torch.randn(2, 3, 32, 32)
    with mock.patch.object(invertible._InvertibleMomentum, 'apply',
                           wraps=invertible._InvertibleMomentum.apply) as apply, \
            mock.patch.object(invertible, 'checkpoint', wraps=invertible.checkpoint) as checkpoint:
        with torch.no_grad():
            model.train()(x)
            model.eval()(x)
        model.eval()(x)  # eval with grad enabled: no recomputation machinery, no autograd Function
        assert checkpoint.call_count == 0
        assert apply.call_count == 0
        model.train()(x).sum().backward()
        assert apply.call_count == 4 and checkpoint.call_count == 5  # stem and the 4 first blocks


def test_stored_transitions_trade_memory_for_recomputation():
    """checkpoint_transitions=False keeps the stem's and first blocks' activations: no checkpoint, the
    same gradients, and more bytes saved for backward (a deterministic count)."""
    from timm_momentum.tools.memory import saved_tensor_bytes

    recomputed = timm.create_model('momentum_resnet50', memory_efficient=True, zero_init_last=False)
    stored = timm.create_model('momentum_resnet50', memory_efficient=True, checkpoint_transitions=False)
    stored.load_state_dict(recomputed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with mock.patch.object(invertible, 'checkpoint', wraps=invertible.checkpoint) as checkpoint:
        out_s, gx_s, gp_s = _grads(stored, x)
        assert checkpoint.call_count == 0
    out_r, gx_r, gp_r = _grads(recomputed, x)
    assert torch.equal(out_s, out_r)
    assert max(relative_error(a, b) for a, b in zip(gp_s, gp_r)) <= 1e-5
    assert saved_tensor_bytes(stored.train(), x) > 2 * saved_tensor_bytes(recomputed.train(), x)


def test_gamma_too_small_for_memory_efficient_mode():
    with pytest.raises(ValueError, match=r'gamma=0\.0 cannot be inverted.*gamma >='):
        timm.create_model('momentum_resnet101', gamma=0.0, memory_efficient=True)
    with pytest.raises(ValueError, match='cannot be inverted'):
        timm.create_model('momentum_resnet101', gamma=1e-9, memory_efficient=True)
    with pytest.warns(UserWarning, match=r'gamma >= 0\.6\d+ needs no extra storage'):
        timm.create_model('momentum_resnet152', gamma=0.5, memory_efficient=True)
    assert plan_chain(0.9, 35) == (torch.float64, 35, False)
    assert plan_chain(0.5, 35).span < 35
    # short chains keep their block inputs: exact, and no costlier than an inverse's float64 state
    assert plan_chain(0.9, 4) == (torch.float32, 4, True)
    assert plan_chain(0.0, 2, torch.bfloat16) == (torch.bfloat16, 2, True)
    # at gamma 0 nothing inverts: a 5-block chain keeps its float32 inputs (20 bytes against 16), a 6-block one
    # (24) is refused
    assert plan_chain(0.0, 5) == (torch.float32, 5, True) and plan_chain(0.0, 6).span == 0
    assert plan_chain(0.01, 5).store_inputs and not plan_chain(0.33, 5).store_inputs


def _expanding_chain(scale: float):
    torch.manual_seed(0)
    blocks = [nn.Linear(16, 16) for _ in range(30)]
    with torch.no_grad():
        for block in blocks:  # each block expands activations: the inverse cancels more and more digits
            nn.init.orthogonal_(block.weight)
            block.weight.mul_(scale)
    x = torch.randn(4, 16, requires_grad=True)
    return momentum_chain(x, blocks, gamma=0.6, memory_efficient=True)


def test_backward_warns_about_drift_and_refuses_wrong_gradients():
    with pytest.warns(RuntimeWarning, match='relative error'):
        _expanding_chain(1.9).sum().backward()  # rebuilt input off by 6e-6
    with pytest.raises(RuntimeError, match='gradients would be wrong'):
        _expanding_chain(3.0).sum().backward()


def _layer3_of_resnet50(gamma: float = 0.9):
    """layer3 of momentum_resnet50 (a 5-block chain, which inverts), random weights, at 64 px."""
    model = timm.create_model('momentum_resnet50', gamma=gamma, zero_init_last=False)
    return model.layer3, torch.randn(2, 512, 8, 8)


def _all_grads(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    out, gx, gp = _grads(module, x)
    return torch.cat([gx.flatten()] + [g.flatten() for g in gp])


@pytest.mark.parametrize('broken', ['scaled', 'norm_preserving'])
def test_self_check_raises_on_a_broken_inverse(broken):
    """A deliberately wrong inverse that gives 1e-2 gradient errors raises. The old check compared only the
    norm of the rebuilt input: for the sign flips (norm_preserving) it moved by 1.6e-3, a warning, while the
    input itself was off by 4.9e-2; the sketch reads 4.5e-2."""
    standard, x = _layer3_of_resnet50()
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    real = invertible.previous_velocity_and_position
    error = {'scaled': 1e-2, 'norm_preserving': None}[broken]

    def wrong(x_state, v_state, *args, **kwargs):
        """The real inverse, then a wrong velocity: the next inverse step carries the error into x."""
        block_input = real(x_state, v_state, *args, **kwargs)
        if error is not None:
            v_state.mul_(1 + error)
        else:
            flat = v_state.view(-1)
            flat[: flat.numel() // 64].neg_()  # a few signs flipped: |x_0| barely moves
        return block_input

    reference = _all_grads(standard, x)
    with mock.patch.object(invertible, 'previous_velocity_and_position', wrong), \
            mock.patch.object(invertible, '_check_reconstruction'):
        wrong_grads = _all_grads(efficient, x)
    assert relative_error(wrong_grads, reference) >= 1e-2  # the gradients really are wrong
    with mock.patch.object(invertible, 'previous_velocity_and_position', wrong), \
            pytest.raises(RuntimeError, match='gradients would be wrong'):
        _all_grads(efficient, x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the real inverse passes the check silently
        assert relative_error(_all_grads(efficient, x), reference) <= 1e-5


def test_strict_check_flag():
    standard, x = _layer3_of_resnet50()
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    with mock.patch.object(invertible, '_check_reconstruction') as check:
        invertible.set_strict_check(True)
        try:
            _all_grads(efficient, x)
        finally:
            invertible.set_strict_check(False)
        assert check.call_count == 1  # one chain inverts, one check, read at once
        assert check.call_args.args[0] <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the deferred check matters only on CUDA')
def test_cuda_check_does_not_sync_and_raises_at_a_later_backward():
    efficient, x = _layer3_of_resnet50()
    efficient.cuda().set_momentum(memory_efficient=True)
    x = x.cuda().requires_grad_(True)
    real = invertible.previous_velocity_and_position
    try:
        with mock.patch.object(invertible, 'previous_velocity_and_position', lambda x, v, *a, **k: (real(x, v, *a, **k), v.mul_(1.01))[0]):
            efficient(x).sum().backward()  # deferred: no sync, no error yet
            assert len(invertible._PENDING) == 1
            torch.cuda.synchronize()
            with pytest.raises(RuntimeError, match='gradients would be wrong'):
                efficient(x).sum().backward()  # the next backward reads the first one's gap
    finally:
        invertible._PENDING.clear()


@pytest.mark.slow
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_inverse_carries_a_float64_state(dtype):
    """Under autocast a long chain inverts with a float64 state, so each rebuilt block input rounds to the
    half-precision value the forward used: its gradients are as far from float32 backprop's as standard
    low-precision backprop's are, and within a few ulps of them (resnet152's 35-block layer3 at the policy's
    0.854). A float32 state there rebuilt the chain to 0.25..0.98 and raised or tripled that distance
    (benchmarks/half_carrier.py measures it on trained networks)."""
    torch.manual_seed(0)
    standard = _deepest_stage(0.854)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 512, 8, 8)
    reference = _all_grads(standard, x)
    inverted = []
    real = invertible.previous_velocity_and_position
    with torch.autocast('cpu', dtype=dtype), warnings.catch_warnings():
        warnings.simplefilter('error')  # no reconstruction warning
        low_standard = _all_grads(standard, x)
        with mock.patch.object(invertible, 'previous_velocity_and_position',
                               lambda x, v, *a, **k: inverted.append(v.dtype) or real(x, v, *a, **k)):
            low_efficient = _all_grads(efficient, x)
    assert inverted and set(inverted) == {torch.float64}  # a real inverse, float64 state
    standard_error = relative_error(low_standard, reference)
    efficient_error = relative_error(low_efficient, reference)
    print(f'{dtype}: standard {standard_error:.3g}, memory-efficient {efficient_error:.3g} from float32')
    assert 0 < standard_error and efficient_error <= 1.02 * standard_error
    assert relative_error(low_efficient, low_standard) <= 2 * torch.finfo(dtype).eps


def test_plan_under_autocast_carries_a_float64_state():
    # a float32 state would flip the rounding of half-precision block inputs (benchmarks/half_carrier.py): under
    # autocast the state is float64 at any gamma, 16 bytes per element of the state (x, v)
    for dtype in (torch.bfloat16, torch.float16):
        for gamma in (0.9, 0.854, 0.8):
            assert plan_chain(gamma, 35, dtype) == (torch.float64, 35, False)
            assert plan_bytes(plan_chain(gamma, 35, dtype), 35, dtype) == 16
    # storing 8 half-precision inputs (16 bytes) costs no more than that state and needs no inverse, at any gamma
    assert plan_chain(0.9, 8, torch.bfloat16).store_inputs and plan_chain(0.0, 8, torch.float16).store_inputs
    assert not plan_chain(0.9, 9, torch.bfloat16).store_inputs
    # the float64 floor of a 5-block chain under autocast: storing 5 bfloat16 inputs (10 bytes) is cheaper
    assert plan_chain(min_safe_gamma(5), 5, torch.bfloat16).store_inputs
    # below the float64 floor a float32 chain stores extra states, or its inputs where cheaper
    assert plan_chain(0.3, 35) == (torch.float64, 13, False)
    assert plan_chain(0.01, 5).store_inputs  # 2 float64 states (32 bytes) or 5 float32 inputs (20)
    # gamma 0 on a chain that must invert is refused, as before (a 5-block one keeps its inputs instead)
    assert plan_chain(0.0, 6).span == 0 and plan_chain(1e-9, 6).span == 0 and plan_chain(1e-9, 5).store_inputs
    # so the construction check (float32 work) says nothing where autocast alone would shrink the span
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm.create_model('momentum_resnet152', gamma=0.8, memory_efficient=True)
        timm.create_model('momentum_resnet152', gamma=0.9, memory_efficient=True)
    with pytest.warns(UserWarning, match=r'stores its state every 13 blocks.*gamma >= 0\.622'):
        timm.create_model('momentum_resnet152', gamma=0.3, memory_efficient=True)


def test_second_backward():
    # resnet18's chains are short and keep their inputs: a second backward is exact
    model = timm.create_model('momentum_resnet18', memory_efficient=True, zero_init_last=False)
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    assert all(torch.allclose(p.grad, 2 * g, rtol=1e-5, atol=1e-7) for p, g in zip(model.parameters(), first))
    # an inverted chain rebuilt its state in place: a second backward fails loudly, never silently
    model = timm.create_model('momentum_resnet50', memory_efficient=True)
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='inplace'):
        loss.backward()


def test_channels_last():
    standard = timm.create_model('momentum_resnet18', zero_init_last=False).to(memory_format=torch.channels_last)
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    out_s, gx_s, gp_s = _grads(standard, x)
    out_e, gx_e, gp_e = _grads(efficient, x)
    assert torch.equal(out_s, out_e)
    assert max(relative_error(a, b) for a, b in zip(gp_e + [gx_e], gp_s + [gx_s])) <= 1e-5
    assert gx_s.is_contiguous(memory_format=torch.channels_last)
    assert gx_e.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)  # 2x2 final maps: the formats differ
    for model in (standard, efficient):
        features = model.forward_features(x)
        assert features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()


def test_frozen_parameters_get_no_gradient_and_the_others_match_standard_mode():
    # momentum_resnet50's layer3 inverts its 5-block chain; freeze a block inside it and all of layer1
    efficient = timm.create_model('momentum_resnet50', memory_efficient=True, zero_init_last=False)
    standard = copy.deepcopy(efficient)
    standard.set_momentum(memory_efficient=False)
    x = torch.randn(2, 3, 32, 32)
    for model in (efficient, standard):
        for p in list(model.layer1.parameters()) + list(model.layer3[2].parameters()):
            p.requires_grad_(False)
    (_, gx_e, gp_e), (_, gx_s, gp_s) = _grads(efficient, x), _grads(standard, x)
    assert all(p.grad is None for p in list(efficient.layer1.parameters()) + list(efficient.layer3[2].parameters()))
    assert [g is None for g in gp_e] == [g is None for g in gp_s]
    assert max(relative_error(a, b) for a, b in zip(gp_e + [gx_e], gp_s + [gx_s]) if a is not None) <= 1e-5
    efficient.zero_grad()
    efficient(torch.randn(2, 3, 32, 32)).sum().backward()  # an input without grad
    assert efficient.layer3[1].conv1.weight.grad is not None and efficient.layer1[0].conv1.weight.grad is None


def _ddp_worker(rank: int, world_size: int, port: int, state: dict, batches, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    # a spawned process starts with the defaults: compare the modes bitwise here too, as this module does (the
    # layer4 norms over a batch of 2 at 1x1 amplify the rounding of another forward to 1e-3)
    set_standard_matches_memory_efficient(True)
    try:
        efficient = timm.create_model('momentum_resnet18', num_classes=5, memory_efficient=True)
        efficient.load_state_dict(state)
        standard = copy.deepcopy(efficient)
        standard.set_momentum(memory_efficient=False)
        x, y = batches[rank]
        ddp = nn.parallel.DistributedDataParallel(efficient)
        nn.functional.cross_entropy(ddp(x), y).backward()
        nn.functional.cross_entropy(standard(x), y).backward()
        for p in standard.parameters():  # the average DDP should have produced
            dist.all_reduce(p.grad)
            p.grad /= world_size
        results[rank] = (
            [p.grad.clone() for p in efficient.parameters()],
            max(relative_error(a.grad, b.grad) for a, b in zip(efficient.parameters(), standard.parameters())),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_gloo_two_processes():
    state = timm.create_model('momentum_resnet18', num_classes=5, zero_init_last=False).state_dict()
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))) for _ in range(2)]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, 29500 + os.getpid() % 1000, state, batches, results), nprocs=2)
        results = dict(results)
    for grad_0, grad_1 in zip(results[0][0], results[1][0]):
        assert torch.equal(grad_0, grad_1)
    assert results[0][1] <= 1e-5 and results[1][1] <= 1e-5
