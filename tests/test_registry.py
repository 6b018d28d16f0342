"""Registry, key names, timm options and pretrained tags of the momentum models."""
import pytest
import timm
import torch
import torchvision

from timm_momentum import MomentumResNet, MomentumStage
from timm_momentum.core.models.momentum_resnet import RECORD_KEYS

DEPTHS = (18, 34, 50, 101, 152)


def test_list_models_has_dropin_and_paper_variants():
    names = set(timm.list_models('momentum_*'))
    for depth in DEPTHS:
        assert f'momentum_resnet{depth}' in names
    for depth in (18, 34, 101, 152):
        assert f'momentum_mresnet{depth}' in names
        assert f'momentum_mresnet{depth}_cifar' in names


@pytest.mark.parametrize('depth', DEPTHS)
def test_keys_match_timm_and_torchvision(depth):
    model = timm.create_model(f'momentum_resnet{depth}')
    reference = timm.create_model(f'resnet{depth}')
    # every ResNet key, in ResNet's order, then the record of the momentum settings
    assert list(model.state_dict()) == list(reference.state_dict()) + list(RECORD_KEYS)
    assert isinstance(model, MomentumResNet) and isinstance(model.layer3, MomentumStage)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.load_state_dict(getattr(torchvision.models, f'resnet{depth}')().state_dict(), strict=True)


@pytest.mark.parametrize('kwargs', [
    dict(stem_type='deep', avg_down=True),            # resnet50d
    dict(stem_type='deep_tiered', stem_width=32),
    dict(cardinality=32, base_width=4),               # resnext50_32x4d
    dict(block_args=dict(attn_layer='se')),           # seresnet50
    dict(drop_path_rate=0.1, drop_rate=0.2),
    dict(replace_stem_pool=True),
])
def test_timm_resnet_options_keep_working(kwargs):
    model = timm.create_model('momentum_resnet50', num_classes=7, **kwargs).eval()
    reference = timm.create_model('resnet50', num_classes=7, **kwargs).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    model.set_momentum(gamma=0.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-5


def test_momentum_kwargs_show_in_config():
    model = timm.create_model('momentum_resnet18', gamma=0.5, memory_efficient=True, block_fn='paper')
    assert model.momentum_cfg == dict(gamma=[0.5] * 4, block_fn='paper', memory_efficient=True)
    assert all(stage.gamma == 0.5 and stage.memory_efficient for stage in model.stages)
    assert 'gamma=0.5' in repr(model.layer1)
    # built to be trained from scratch, the paper's gamma; with pretrained weights, the faithful policy
    default = timm.create_model('momentum_resnet18')
    assert default.momentum_cfg == dict(gamma=[0.9] * 4, block_fn='dropin', memory_efficient=False)
    assert default.gamma_policy is None
    default.set_momentum(gamma=0.25)
    assert default.momentum_cfg['gamma'] == [0.25] * 4 and default.layer4.gamma == 0.25
    default.set_momentum(gamma='auto')
    assert default.momentum_cfg['gamma'] == [0.0] * 4 and default.gamma_policy == 'auto'


@pytest.mark.parametrize('gamma', [-0.1, 1.5, float('nan'), 'high'])
def test_gamma_outside_unit_interval_is_rejected(gamma):
    with pytest.raises(ValueError, match='gamma'):
        timm.create_model('momentum_resnet18', gamma=gamma)


def test_unknown_block_fn_is_rejected():
    with pytest.raises(ValueError, match="block_fn must be one of"):
        timm.create_model('momentum_resnet18', block_fn='residual')


@pytest.mark.parametrize('depth', DEPTHS)
def test_every_timm_tag_has_a_momentum_counterpart(depth):
    source_tags = timm.list_pretrained(f'resnet{depth}.*')
    momentum_tags = timm.list_pretrained(f'momentum_resnet{depth}.*')
    assert sorted(t.split('.', 1)[1] for t in momentum_tags) == sorted(t.split('.', 1)[1] for t in source_tags)
    assert timm.models.get_pretrained_cfg(f'momentum_resnet{depth}').tag == \
        timm.models.get_pretrained_cfg(f'resnet{depth}').tag
    for tag in source_tags:
        src = timm.models.get_pretrained_cfg(tag).to_dict()
        dst = timm.models.get_pretrained_cfg('momentum_' + tag).to_dict()
        for key in ('hf_hub_id', 'url', 'input_size', 'test_input_size', 'mean', 'std', 'crop_pct',
                    'interpolation', 'license', 'num_classes', 'pool_size'):
            assert dst.get(key) == src.get(key), (tag, key)
        assert tag in dst['notes'] and '2102.07870' in dst['paper_ids']


def test_pretrained_cfg_of_built_model_follows_source_tag():
    model = timm.create_model('momentum_resnet50.a1_in1k')
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.a1_in1k'
    assert model.pretrained_cfg['interpolation'] == 'bicubic'


def test_cifar_variant_has_paper_stem():
    model = timm.create_model('momentum_mresnet18_cifar')
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.num_classes == 10
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)
    assert [info['reduction'] for info in model.feature_info] == [1, 1, 2, 4, 8]
