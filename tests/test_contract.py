"""timm's model contract, mirroring timm's own tests/test_models.py, for the momentum models of the plain depths,
the paper's, and a sample of the rest of timm's ResNet family (tests/test_family.py builds every one of those).

TorchScript is excluded: the memory-efficient chains run as a Python autograd.Function and the stage
rule loops over blocks in Python, which torch.jit.script cannot compile.
"""
import copy
import re

import pytest
import timm
import torch
from timm.models import group_parameters
from timm_momentum import resnet_state_dict

FAMILY_SAMPLE = ['momentum_resnet50d', 'momentum_seresnext26d_32x4d', 'momentum_wide_resnet50_2',
                 'momentum_resnet50_gn', 'momentum_resnetrs101', 'momentum_ecaresnet50d_pruned',
                 'momentum_resnetblur50', 'momentum_test_resnet']
MODELS = [name for name in timm.list_models('momentum_*') if re.fullmatch(r'momentum_m?resnet\d+(_cifar)?', name)]
MODELS += FAMILY_SAMPLE
# the deep models and the family sample run in the full suite only, not in the fast subset
MODELS = [pytest.param(name, marks=pytest.mark.slow) if re.search(r'resnet(101|152)', name) or name in FAMILY_SAMPLE
          else name for name in MODELS]


def _input(model: torch.nn.Module, batch_size: int = 2, in_chans: int = 3) -> torch.Tensor:
    size = 32 if model.pretrained_cfg['input_size'][-1] <= 32 else 64
    return torch.randn(batch_size, in_chans, size, size)


@pytest.mark.parametrize('name', MODELS)
def test_forward_and_backward(name):
    for memory_efficient in (False, True):
        model = timm.create_model(name, num_classes=7, memory_efficient=memory_efficient)
        out = model(_input(model))
        assert out.shape == (2, 7) and not torch.isnan(out).any()
        out.mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f'no gradient for {missing[:3]} (memory_efficient={memory_efficient})'


@pytest.mark.parametrize('name', MODELS)
def test_features_head_and_classifier(name):
    model = timm.create_model(name, num_classes=7).eval()
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        assert torch.equal(model.forward_head(features), model(x))
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features)
        assert [t.shape[1] for t in intermediates] == [info['num_chs'] for info in model.feature_info]
        assert [x.shape[-1] // t.shape[-1] for t in intermediates] == [info['reduction'] for info in model.feature_info]
        assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, '')
        assert model(x).shape == features.shape
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize('name', MODELS)
def test_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state and cfg['classifier'] + '.weight' in state
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert features.shape[-2:] == tuple(cfg['pool_size'])
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == cfg['input_size']


@pytest.mark.parametrize('name', MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    reference = timm.create_model(name).eval()
    x = _input(reference)
    with torch.no_grad():
        outputs = model(x)
    assert [o.shape[1] for o in outputs] == model.feature_info.channels()
    assert [x.shape[-1] // o.shape[-1] for o in outputs] == model.feature_info.reduction()
    partial = timm.create_model(name, features_only=True, out_indices=(2, 4)).eval()
    with torch.no_grad():
        assert len(partial(x)) == 2


@pytest.mark.parametrize('name', MODELS)
def test_grad_checkpointing_leaves_outputs_unchanged(name):
    for memory_efficient in (False, True):
        model = timm.create_model(name, memory_efficient=memory_efficient)
        checkpointed = copy.deepcopy(model)
        checkpointed.set_grad_checkpointing()
        x = _input(model)
        out, out_checkpointed = model(x), checkpointed(x)
        assert torch.equal(out, out_checkpointed)
        out.sum().backward()
        out_checkpointed.sum().backward()
        for (n, p), q in zip(model.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
        for (n, a), b in zip(model.named_buffers(), checkpointed.buffers()):
            assert torch.equal(a, b), n  # recomputation does not update BatchNorm statistics again


@pytest.mark.parametrize('name', MODELS)
def test_group_matcher_in_chans_and_num_classes(name):
    model = timm.create_model(name, in_chans=1, num_classes=0)
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    # coarse groups are whole stages, fine ones blocks: fewer, unless every stage has one block (test_resnet)
    assert len(coarse) < len(groups) or all(len(stage) == 1 for stage in model.stages)
    out = model.eval()(_input(model, in_chans=1))
    assert out.shape == (2, model.num_features)


@pytest.mark.parametrize('indices', [None, 2, [0, -1], (1, 3)])
def test_forward_intermediates_takes_the_indices_timm_takes(indices):
    # gamma = 0 drop-in is timm's resnet18: the same intermediates for every way of naming them
    model = timm.create_model('momentum_resnet18', gamma=0.0).eval()
    reference = timm.create_model('resnet18').eval()
    reference.load_state_dict(resnet_state_dict(model.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for stop_early in (False, True):
            ours = model.forward_intermediates(x, indices=indices, stop_early=stop_early, intermediates_only=True)
            theirs = reference.forward_intermediates(x, indices=indices, stop_early=stop_early,
                                                     intermediates_only=True)
            assert [t.shape for t in ours] == [t.shape for t in theirs]
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match='out of range'):
        model.forward_intermediates(x, indices=[5])
