"""timm's whole ResNet family as momentum models: every architecture builds, keeps timm's keys, is its source at
gamma 0, and a sample of them trains memory-efficiently with standard backprop's gradients."""
import copy

import pytest
import timm
import torch
from timm.models import list_pretrained

from timm_momentum import resnet_state_dict
from timm_momentum.core.models import resnet_family
from timm_momentum.core.models.resnet_family import momentum_name, source_architectures, source_model_args

from conftest import relative_error

FAMILY = source_architectures()
# the sample the issue names: deep-stem and avg-down, grouped with SE, widened, GroupNorm, the RS recipe at depth
SAMPLE = ['resnet50d', 'seresnext26d_32x4d', 'wide_resnet50_2', 'resnet50_gn', 'resnetrs101']


def test_the_family_is_timms_whole_resnet_module():
    """Every architecture timm.models.resnet registers is in the family (81 in timm 1.0.31), and every one of
    its pretrained tags is mirrored, pointing at the same weights."""
    assert FAMILY == timm.list_models(module='resnet')
    assert len(FAMILY) >= 80
    for source in FAMILY:
        name = momentum_name(source)
        assert name in timm.list_models('momentum_*')
        source_tags = list_pretrained(f'{source}.*')
        momentum_tags = list_pretrained(f'{name}.*')
        assert [t.split('.', 1)[1] for t in momentum_tags] == [t.split('.', 1)[1] for t in source_tags]
        for tag in source_tags:
            src_cfg = timm.models.get_pretrained_cfg(tag)
            cfg = timm.models.get_pretrained_cfg(momentum_name(tag))
            assert (cfg.hf_hub_id, cfg.url, cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation) == \
                (src_cfg.hf_hub_id, src_cfg.url, src_cfg.input_size, src_cfg.mean, src_cfg.std, src_cfg.crop_pct,
                 src_cfg.interpolation)
    assert len(list_pretrained('momentum_*')) >= sum(len(list_pretrained(f'{s}.*')) for s in FAMILY)


def test_an_architecture_outside_the_family_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'vit_tiny_patch16_224' is not in timm's ResNet family"):
        source_model_args('vit_tiny_patch16_224')
    with pytest.raises(ValueError, match=r"'no_such_net' is not a timm architecture"):
        source_model_args('no_such_net')
    assert resnet_family.check_source('resnet50d') == 'resnet50d'
    with pytest.raises(ValueError, match=r"'skresnet18' is not in timm's ResNet family: its entry point"):
        resnet_family.check_source('skresnet18')


def test_pruned_architectures_take_timms_pruned_widths():
    assert source_model_args('ecaresnet50d_pruned')['pruned'] is True
    momentum = timm.create_model('momentum_ecaresnet50d_pruned', device='meta')
    plain = timm.create_model('ecaresnet50d_pruned', device='meta')
    assert {k: v.shape for k, v in resnet_state_dict(momentum.state_dict()).items()} == \
        {k: v.shape for k, v in plain.state_dict().items()}


@pytest.mark.parametrize('source', FAMILY)
def test_every_architecture_builds_with_timms_keys_and_is_its_source_at_gamma_zero(source):
    """Random weights, a 32x32 input: at gamma 0 the drop-in model's logits are the timm network's, bit for bit,
    in eval and in train mode, and its state dict is timm's plus the momentum record."""
    plain = timm.create_model(source, num_classes=7)
    momentum = timm.create_model(momentum_name(source), num_classes=7, gamma=0.0, device='meta')
    assert type(momentum).__name__ == 'MomentumResNet'
    assert list(resnet_state_dict(momentum.state_dict())) == list(plain.state_dict())
    # random weights and statistics everywhere (timm zero-initialises each block's last norm), shared with the
    # momentum model, which gets the non-persistent buffers (BlurPool2d's filter) by name too
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in plain.state_dict().items():
            if key.endswith('running_var'):
                value.uniform_(0.5, 1.5, generator=generator)
            elif value.is_floating_point():
                value.normal_(0, 0.05 if value.dim() > 1 else 0.2, generator=generator)
    momentum = momentum.to_empty(device='cpu')
    momentum.load_state_dict(plain.state_dict(), strict=True, assign=True)
    plain_buffers = dict(plain.named_buffers())
    with torch.no_grad():
        for name, buffer in momentum.named_buffers():
            if name in plain_buffers:
                buffer.copy_(plain_buffers[name])
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        assert torch.equal(momentum.eval()(x), plain.eval()(x))
        assert torch.equal(momentum.train()(x), plain.train()(x))


@pytest.mark.slow
@pytest.mark.parametrize('source', SAMPLE)
def test_memory_efficient_gradients_match_standard_backprop(source, standard_matches_memory_efficient):
    """On the sample, at gamma 0.9 (every chain of two or more blocks inverts), the memory-efficient backward's
    gradients are standard backprop's, and each BatchNorm's statistics are updated once, from the same batch.
    (64x64: at 32x32 layer4 normalises over 2 values per channel, which amplifies rounding without bound.)

    In float64, where a rebuilt block input is the forward's to about 1e-16. In float32 it is the forward's to an
    ulp or two, and a ReLU whose input lies that close to 0 takes the other side in the recompute: the gradient
    through that one element is then 0 instead of whole. Which sample hits such a tie depends on the machine's
    arithmetic (wide_resnet50_2 did on 2 threads of an AMD EPYC, 1.7e-2, and not on 1 thread), so a float32
    bound would test the machine, not the backward; the fp32 errors are measured in benchmarks/fidelity*.py."""
    torch.manual_seed(0)
    standard = timm.create_model(momentum_name(source), num_classes=5, gamma=0.9, zero_init_last=False).train()
    standard.double()
    efficient = copy.deepcopy(standard)
    efficient.set_momentum(memory_efficient=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads, outputs = [], []
    for net in (standard, efficient):
        inputs = x.clone().requires_grad_(True)
        outputs.append(net(inputs))
        outputs[-1].square().sum().backward()
        grads.append([inputs.grad] + [p.grad for p in net.parameters()])
    assert torch.equal(*outputs)  # the two modes run the same arithmetic forward
    errors = [relative_error(e, s) for e, s in zip(grads[1], grads[0])]
    assert max(errors) <= 1e-10, f'{source}: worst relative gradient error {max(errors):.2e}'
    for buf_s, buf_e in zip(standard.buffers(), efficient.buffers()):
        assert torch.equal(buf_s, buf_e)


def test_the_family_rows_say_what_readme_tables():
    row, = resnet_family.family_table(['resnetrs101'])
    assert row == {'name': 'momentum_resnetrs101', 'source': 'resnetrs101',
                   'tags': [t.split('.', 1)[1] for t in list_pretrained('resnetrs101.*')],
                   'chain_lengths': [2, 3, 22, 2], 'auto_gamma': row['auto_gamma']}
    assert row['auto_gamma'][0] == 0.0 and row['auto_gamma'][2] > 0.0


@pytest.mark.parametrize('tag', ['resnet50d.ra2_in1k', 'seresnext26d_32x4d.bt_in1k', 'ecaresnet50d_pruned.miil_in1k'])
def test_a_mirrored_tag_loads_its_sources_weights_strictly_and_converts(tag, tmp_path, monkeypatch):
    """pretrained=True on a mirrored tag reads the source's Hub repo (a hand-built offline cache here), loads
    every tensor unchanged, and is the source at gamma 0; convert names the same architecture from timm's tag."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    from test_loading import _add_repo
    from timm_momentum.tools.convert import convert

    cache = tmp_path / 'hub'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    source = timm.create_model(tag.split('.')[0], zero_init_last=False).eval()
    state = source.state_dict()
    _add_repo(cache, timm.models.get_pretrained_cfg(tag).hf_hub_id,
              {'model.safetensors': lambda p: save_file(state, p)})
    model = timm.create_model(momentum_name(tag), pretrained=True).eval()
    assert model.pretrained_cfg['hf_hub_id'] == f'timm/{tag}' and model.gamma_policy == 'auto'
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.set_momentum(gamma=0.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    result = convert(tag, tmp_path / 'out')
    assert result.arch == momentum_name(tag.split('.')[0]) and result.verify['equivalence']['passed']
    loaded = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True)
    assert loaded.momentum_cfg['gamma'] == result.model_args['gamma']


@pytest.mark.slow
def test_a_family_model_fine_tunes_memory_efficiently_and_its_export_loads_in_timm_and_transformers(tmp_path):
    """The fine-tuning module and the folder loaders take any family architecture, not only the plain depths."""
    from transformers import AutoModelForImageClassification

    from timm_momentum.tools.finetune import DEFAULTS, train

    result = train(dict(DEFAULTS, model='momentum_seresnext26d_32x4d', dataset='sklearn/digits', classes=[0, 1, 2],
                        img_size=32, batch_size=32, epochs=1, train_limit=96, val_limit=64, opt='adamw', lr=1e-3,
                        gamma=0.9, progress=False, plots=False, checkpoints=False, workers=0,
                        output=str(tmp_path / 'run')))
    assert result['metrics']['epoch'] == 0
    final = tmp_path / 'run' / 'final'
    model = timm.create_model(f'local-dir:{final}', pretrained=True).eval()
    assert model.pretrained_cfg['architecture'] == 'momentum_seresnext26d_32x4d'
    assert model.momentum_cfg['gamma'] == [0.9] * 4 and model.num_classes == 3
    wrapped = AutoModelForImageClassification.from_pretrained(final).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(pixel_values=x).logits, model(x))
