"""Momentum settings: gamma = 1 is refused everywhere, and set_momentum changes all stages or none."""
import pytest
import timm
import torch

from timm_momentum import momentum_chain, validate_gamma


@pytest.mark.parametrize('gamma', [1, 1.0, True])
def test_gamma_one_is_refused_saying_why(gamma):
    with pytest.raises(ValueError, match=r'\[0, 1\).*velocity .* stays 0.*ignores its blocks'
                       if gamma is not True else r'a number in \[0, 1\)'):
        validate_gamma(gamma)


def test_gamma_one_is_refused_by_the_model_the_chain_and_set_momentum():
    with pytest.raises(ValueError, match='ignores its blocks'):
        timm.create_model('momentum_resnet18', gamma=1.0)
    with pytest.raises(ValueError, match='ignores its blocks'):
        momentum_chain(torch.randn(2, 4), [torch.nn.Linear(4, 4)], gamma=1.0)
    model = timm.create_model('momentum_resnet18', gamma=0.9)
    with pytest.raises(ValueError, match='ignores its blocks'):
        model.set_momentum(gamma=1.0)
    assert model.momentum_cfg['gamma'] == [0.9] * 4 and all(stage.gamma == 0.9 for stage in model.stages)


def _settings(model):
    return [(stage.gamma, stage.block_fn, stage.memory_efficient) for stage in model.stages]


def test_set_momentum_is_atomic():
    model = timm.create_model('momentum_resnet101', gamma=0.9)
    before, cfg = _settings(model), dict(model.momentum_cfg)
    # layer1 and layer2 (chains of 2 and 3 blocks) keep their inputs and accept gamma = 0; layer3 (22) cannot invert
    with pytest.raises(ValueError, match='cannot be inverted'):
        model.set_momentum(gamma=0.0, memory_efficient=True)
    assert _settings(model) == before and model.momentum_cfg == cfg
    with pytest.raises(ValueError, match='block_fn'):
        model.set_momentum(gamma=0.5, block_fn='nope')
    assert _settings(model) == before and model.momentum_cfg == cfg
    model.set_momentum(gamma=0.5, memory_efficient=True)
    assert _settings(model) == [(0.5, 'dropin', True)] * 4
    assert model.momentum_cfg == {'gamma': [0.5] * 4, 'block_fn': 'dropin', 'memory_efficient': True}


@pytest.mark.parametrize('value', ['no way', 'false', 1, 0.0])
def test_memory_efficient_must_be_a_bool(value):
    model = timm.create_model('momentum_resnet18')
    with pytest.raises(TypeError, match='memory_efficient must be True or False'):
        model.set_momentum(memory_efficient=value)
    assert model.momentum_cfg['memory_efficient'] is False and not any(s.memory_efficient for s in model.stages)
    with pytest.raises(TypeError, match='memory_efficient must be True or False'):
        timm.create_model('momentum_resnet18', memory_efficient=value)
