"""The memory-efficient backward refuses what standard backprop refuses, and says what went wrong (issue 20)."""
import pytest
import torch
import torch.nn as nn

from timm_momentum.core.chain import momentum_chain, plan_chain


def _blocks(count: int) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
                         for _ in range(count))


# 2 blocks keep each block's input; 6 invert from the final state
CHAINS = [2, 6]


@pytest.mark.parametrize('count', CHAINS)
def test_the_plans_under_test_are_the_two_backward_paths(count):
    assert plan_chain(0.9, count).store_inputs == (count == 2)


@pytest.mark.parametrize('memory_efficient', [False, True])
@pytest.mark.parametrize('count', CHAINS)
def test_a_weight_changed_in_place_before_backward_raises_as_autograd_does(count, memory_efficient):
    blocks = _blocks(count).train()
    out = momentum_chain(torch.randn(2, 4, 8, 8, requires_grad=True), blocks, 0.9, memory_efficient=memory_efficient)
    with torch.no_grad():
        blocks[1][0].weight.mul_(3)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        out.sum().backward()


@pytest.mark.parametrize('count', CHAINS)
def test_a_replaced_weight_raises_and_names_it(count):
    blocks = _blocks(count).train()
    out = momentum_chain(torch.randn(2, 4, 8, 8), blocks, 0.9, memory_efficient=True)
    blocks[1][0].weight = nn.Parameter(blocks[1][0].weight.detach() * 3)
    with pytest.raises(RuntimeError, match=r'has been replaced: block 1 0\.weight'):
        out.sum().backward()


@pytest.mark.parametrize('count', CHAINS)
def test_eval_mode_norm_statistics_changed_before_backward_raise(count):
    blocks = _blocks(count).eval()
    out = momentum_chain(torch.randn(2, 4, 8, 8, requires_grad=True), blocks, 0.9, memory_efficient=True)
    with torch.no_grad():
        blocks[0][1].running_mean.add_(1)
    with pytest.raises(RuntimeError, match=r'block 0 1\.running_mean .* modified by an inplace operation|'
                                           r'modified by an inplace operation: block 0 1\.running_mean'):
        out.sum().backward()


@pytest.mark.parametrize('count', CHAINS)
def test_two_forwards_before_one_backward_still_train(count):
    """In training mode a second forward updates the norm statistics in place; neither mode reads them."""
    blocks = _blocks(count).train()
    x = torch.randn(2, 4, 8, 8)
    (momentum_chain(x, blocks, 0.9, memory_efficient=True).sum()
     + momentum_chain(x, blocks, 0.9, memory_efficient=True).sum()).backward()
    assert all(p.grad is not None for p in blocks.parameters())


def test_a_nan_input_is_named_as_such_not_as_a_gamma_problem():
    blocks = _blocks(6).train()
    x = torch.randn(2, 4, 8, 8)
    x[0, 0, 0, 0] = float('nan')
    out = momentum_chain(x, blocks, 0.9, memory_efficient=True)
    with pytest.raises(RuntimeError, match='the input or the activations hold NaN or inf') as raised:
        out.sum().backward()
    assert 'gamma closer to 1' not in str(raised.value)


@pytest.mark.parametrize('memory_efficient, calls', [(False, 1), (True, 2)])
def test_forward_hooks_on_chain_blocks_fire_once_more_in_the_memory_efficient_backward(memory_efficient, calls):
    """As documented in momentum_chain: the backward recomputes each block, hooks included."""
    blocks = _blocks(6).train()
    fired = []
    blocks[3].register_forward_hook(lambda module, args, output: fired.append(torch.is_grad_enabled()))
    momentum_chain(torch.randn(2, 4, 8, 8), blocks, 0.9, memory_efficient=memory_efficient).sum().backward()
    assert len(fired) == calls


@pytest.mark.parametrize('count, gamma', [(6, 0.9), (20, 0.3)])  # one span; two spans (a state stored mid-chain)
def test_the_backward_frees_the_saved_states_it_has_finished_with(count, gamma, standard_matches_memory_efficient):
    # every float64 state the chain saved (its final x and v, and the exact states at span ends) has no bytes left
    # once the backward is done with it, so the recomputes at the chain's start do not hold them
    assert plan_chain(gamma, count).span == (count if count == 6 else 13)
    blocks = _blocks(count).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = momentum_chain(x, blocks, gamma, memory_efficient=True)
    states = [t for t in saved if t.dtype == torch.float64 and t.shape == x.shape]
    assert len(states) == (2 if count == 6 else 4) and all(t.untyped_storage().nbytes() > 0 for t in states)
    out.square().sum().backward()
    assert all(t.untyped_storage().nbytes() == 0 for t in states)
    grads = [x.grad] + [p.grad for p in blocks.parameters()]
    x.grad = None
    blocks.zero_grad(set_to_none=True)
    momentum_chain(x, blocks, gamma, memory_efficient=False).square().sum().backward()
    for got, expected in zip(grads, [x.grad] + [p.grad for p in blocks.parameters()]):
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # exact up to the inverse's rounding
