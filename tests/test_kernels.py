"""The chain's element-wise steps: compiled fused kernels against the eager ones, and the fallback.

The compiled tests prove a compiled kernel ran (``kernels.compiled_kernels``) and turn the eager fallback's warning
into an error, so they cannot compare eager with eager; where this machine cannot compile they skip, saying why.
"""
import copy
import shutil
import warnings
from unittest import mock

import pytest
import timm
import torch

import timm_momentum  # noqa: F401  (registers the models)
from timm_momentum.core import kernels
from timm_momentum.core.chain import momentum_chain


@pytest.fixture
def fused():
    """Compiled kernels on for the test, off again afterwards (the default). A fallback to the eager steps fails
    the test, and the test must have run the steps it compares compiled."""
    if shutil.which('gcc') is None and shutil.which('cc') is None:
        pytest.skip('no C compiler: inductor cannot build CPU kernels here')
    kernels.set_fused(True)
    try:
        with warnings.catch_warnings(), mock.patch.object(kernels, '_RAN_COMPILED', set()):
            warnings.filterwarnings('error', message='timm_momentum could not compile')
            yield
    finally:
        kernels.set_fused(False)


def _state(shape, carrier, work, seed, channels_last=False):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=carrier) * 3
    v = torch.randn(shape, dtype=carrier)
    out = torch.randn(shape).to(work)
    if channels_last:
        x, v, out = (t.contiguous(memory_format=torch.channels_last) for t in (x, v, out))
    return x, v, out, x.to(work)


def _both(step):
    """``step()`` run eagerly and compiled on fresh copies of its inputs: (eager result, compiled result)."""
    results = []
    for enabled in (False, True):
        kernels.set_fused(enabled)
        results.append(step())
    return results


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for the last bits: compiled and eager lerps may round differently."""
    tol = 4 * torch.finfo(a.dtype).eps
    return a.dtype == b.dtype and torch.allclose(a, b, rtol=tol, atol=tol * a.abs().max().item())


@pytest.mark.parametrize('carrier, work', [(torch.float64, torch.float32), (torch.float64, torch.float64),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.slow
@pytest.mark.parametrize('shape, channels_last', [((2, 8, 5, 7), False), ((2, 8, 5, 7), True), ((3, 1000), False)])
def test_compiled_forward_update_matches_the_eager_one(fused, carrier, work, shape, channels_last):
    """For the first block (v = 0) and later ones, the drop-in f and a direct f, any shape and memory format:
    the compiled kernel updates the state in place as the eager ops do, and returns a new block input."""
    x, v, out, x_in = _state(shape, carrier, work, seed=len(shape), channels_last=channels_last)
    for first in (True, False):
        for block_input in (x_in, None):
            def step():
                state_x, state_v = x.clone(), None if first else v.clone()
                velocity, next_in = kernels.forward_update(state_x, state_v, out, block_input, 0.9, work)
                return state_x, velocity, next_in
            eager, compiled = _both(step)
            assert '_forward' in kernels.compiled_kernels()
            for a, b in zip(eager, compiled):
                assert a.stride() == b.stride() and _close(a, b)
            assert not torch.equal(eager[0], x)  # really updated in place
            assert eager[2].dtype == work and eager[2].data_ptr() != eager[0].data_ptr()  # a tensor of its own


@pytest.mark.slow
def test_compiled_inverse_and_adjoint_steps_match_the_eager_ones(fused):
    x, v, out, x_in = _state((2, 16, 6, 6), torch.float64, torch.float32, seed=0)

    def inverse():
        state_x, state_v = x.clone(), v.clone()
        first_input = kernels.previous_position(state_x, state_v, torch.float32)
        next_input = kernels.previous_velocity_and_position(state_x, state_v, out, x_in, 0.9, torch.float32)
        kernels.previous_velocity(state_x, state_v, out, None, 0.9)
        return state_x, state_v, first_input, next_input

    def adjoint():
        grad_x, block_grad, direct = out.float().clone(), x_in.clone(), (x_in * 3).clone()
        kernels.adjoint_update(grad_x, x_in * 2, block_grad, 0.9, dropin=True, last=False)
        with torch.no_grad():
            step = kernels.standard_adjoint(grad_x, direct, block_grad, 0.9, dropin=True)
        return (grad_x, block_grad, direct) + tuple(step)

    for step in (inverse, adjoint):
        eager, compiled = _both(step)
        assert all(_close(a, b) for a, b in zip(eager, compiled))
    assert {'_position', '_velocity', '_velocity_and_position', '_adjoint', '_standard_adjoint'} <= \
        kernels.compiled_kernels()


@pytest.mark.slow
def test_compiled_kernels_train_as_the_eager_ones(fused, standard_matches_memory_efficient):
    """A training step of momentum_resnet50 at 64 px (layer3's 5-block chain inverts) with compiled kernels:
    standard and memory-efficient forwards bitwise equal to each other; gradients within 1e-5 (the issue's bound) of
    eager standard backprop's."""
    torch.manual_seed(0)
    model = timm.create_model('momentum_resnet50', num_classes=10, zero_init_last=False)
    x = torch.randn(2, 3, 64, 64)
    outs, grads = {}, {}
    for enabled in (False, True):
        kernels.set_fused(enabled)
        for memory_efficient in (False, True):
            trained = copy.deepcopy(model)
            trained.set_momentum(memory_efficient=memory_efficient)
            out = trained(x)
            out.square().sum().backward()
            outs[enabled, memory_efficient] = out.detach()
            grads[enabled, memory_efficient] = torch.cat([p.grad.flatten() for p in trained.parameters()])
    assert {'_forward', '_velocity_and_position', '_adjoint', '_standard_adjoint'} <= kernels.compiled_kernels()
    for enabled in (False, True):
        assert torch.equal(outs[enabled, False], outs[enabled, True])
    for key in grads:
        assert ((grads[key] - grads[False, False]).norm() / grads[False, False].norm()).item() <= 1e-5
    assert (outs[True, False] - outs[False, False]).abs().max().item() <= 1e-5


def _positions(seed):
    """x_{n-2}, x_{n-1} and a block's output, float32."""
    torch.manual_seed(seed)
    return torch.randn(2, 8, 5, 7) * 3, torch.randn(2, 8, 5, 7) * 3, torch.randn(2, 8, 5, 7)


def test_position_form_step_is_the_rule_and_keeps_its_inputs():
    """Standard mode's forward step: ``forward_step`` with v_{n-1} = x_{n-1} - x_{n-2} (v = 0 before the first block),
    for the drop-in f from block(x) and for a direct f; x_n a new tensor, its inputs untouched."""
    previous, x, out = _positions(seed=3)
    inputs = previous.clone(), x.clone(), out.clone()
    for first in (True, False):
        for dropin in (True, False):
            before = None if first else previous
            next_x = kernels.next_position(x, before, out, 0.9, dropin)
            velocity = None if first else (x.double() - previous.double())
            f = out.double() - x.double() if dropin else out.double()
            expected, _ = kernels.forward_step(x.double(), velocity, f, 0.9, inplace=False)
            assert _close(next_x, expected.float())
            assert next_x.data_ptr() not in (x.data_ptr(), out.data_ptr(), previous.data_ptr())
            assert all(torch.equal(a, b) for a, b in zip((previous, x, out), inputs))


def _adjoint_reference(grad_x, direct, block_grad, gamma, dropin):
    """The adjoint of (x, v) -> (x + v', v') with v' = gamma v + (1 - gamma) f, in float64 and out of place."""
    total = grad_x.double() + (0 if direct is None else direct.double())
    g = total if block_grad is None else total + gamma / (1 - gamma) * block_grad.double()  # dL/dv_n
    return (1 - gamma) * g, total - (1 - gamma) * g if dropin else total


def test_standard_adjoint_updates_the_direct_part_in_place_and_keeps_the_gradients_it_reads():
    """Standard mode's backward step: (1 - gamma) g_n in a new tensor and the direct part of dL/dx_{n-1} in the
    direct part's own storage (a new tensor only at the chain's last block); autograd's gradient of x_n and the
    block after's output gradient untouched. Recorded by autograd (a double backward), nothing changes in place."""
    grad_x, direct, block_grad = _positions(seed=5)
    inputs = grad_x.clone(), block_grad.clone()
    for last in (True, False):
        for dropin in (True, False):
            given = None if last else direct.clone()
            with torch.no_grad():
                new_block_grad, new_direct = kernels.standard_adjoint(
                    grad_x, given, None if last else block_grad, 0.9, dropin)
            expected = _adjoint_reference(grad_x, None if last else direct, None if last else block_grad, 0.9, dropin)
            assert _close(new_block_grad, expected[0].float()) and _close(new_direct, expected[1].float())
            assert new_block_grad.data_ptr() not in (grad_x.data_ptr(), block_grad.data_ptr(), new_direct.data_ptr())
            if last:
                assert new_direct.data_ptr() != grad_x.data_ptr()  # later steps update it in place
            else:
                assert new_direct.data_ptr() == given.data_ptr()  # updated in place, not a new tensor
            assert torch.equal(grad_x, inputs[0]) and torch.equal(block_grad, inputs[1])
    recorded = direct.clone().requires_grad_(True)
    with torch.enable_grad():
        _, new_direct = kernels.standard_adjoint(grad_x, recorded * 1, block_grad, 0.9, True)
    assert new_direct.grad_fn is not None and recorded._version == 0


@pytest.mark.slow
def test_compiled_standard_steps_match_the_eager_ones(fused):
    previous, x, out = _positions(seed=4)
    for first in (True, False):
        for dropin in (True, False):
            eager, compiled = _both(lambda: kernels.next_position(x, None if first else previous, out, 0.9, dropin))
            assert _close(eager, compiled)

            def adjoint():
                direct = None if first else previous.clone()
                with torch.no_grad():
                    return kernels.standard_adjoint(out, direct, None if first else x, 0.9, dropin) + (direct,)
            eager, compiled = _both(adjoint)
            assert _close(eager[0], compiled[0]) and _close(eager[1], compiled[1])
            if not first:
                assert compiled[1].data_ptr() == compiled[2].data_ptr()  # the compiled kernel wrote in place
    assert {'position_form_step', '_standard_adjoint'} <= kernels.compiled_kernels()


def test_a_failed_compile_warns_once_and_runs_eagerly():
    x, v, out, x_in = _state((2, 4, 3, 3), torch.float64, torch.float32, seed=1)
    expected_x, expected_v = x.clone(), v.clone()
    _, expected_in = kernels.forward_update(expected_x, expected_v, out, x_in, 0.9, torch.float32)
    kernels.set_fused(True)

    def broken_compile(fn, **options):
        def run(*args):
            raise RuntimeError('no C++ compiler found\nsecond line')
        return run
    with mock.patch.object(kernels, '_COMPILED', {}), mock.patch.object(torch, 'compile', broken_compile):
        with pytest.warns(RuntimeWarning, match='could not compile .*no C\\+\\+ compiler found.*eagerly from now on'):
            _, next_in = kernels.forward_update(x, v, out, x_in, 0.9, torch.float32)
        assert not kernels.fused_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # once only
            kernels.forward_update(x.clone(), v.clone(), out, x_in, 0.9, torch.float32)
    kernels.set_fused(False)
    assert torch.equal(x, expected_x) and torch.equal(v, expected_v) and torch.equal(next_in, expected_in)


@pytest.mark.parametrize('dtype, gamma', [(torch.float64, 0.9), (torch.float32, 0.0)])
def test_standard_mode_updates_its_own_state_not_the_input(dtype, gamma):
    """The state is updated in place; where the carrier is the input's own dtype (float64 inputs, or gamma 0)
    it starts as a copy, so the caller's tensor and the blocks' saved inputs never move."""
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(6, 6).to(dtype) for _ in range(3)]
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    out = momentum_chain(x, blocks, gamma)
    assert torch.equal(x.detach(), before)
    out.square().sum().backward()  # autograd would refuse a saved input changed in place
    reference = x.detach().clone().requires_grad_(True)
    position, velocity = reference, torch.zeros_like(reference)
    for block in blocks:
        velocity = gamma * velocity + (1 - gamma) * (block(position) - position)
        position = position + velocity
    position.square().sum().backward()
    assert torch.allclose(out, position) and torch.allclose(x.grad, reference.grad)
