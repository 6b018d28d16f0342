"""pretrained=True and the other timm loading paths, offline, from checkpoints the tests make."""
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import save_file

REVISION = 'a' * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in a temp dir, with the hub offline."""
    cache = tmp_path / 'hub'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def _add_repo(cache: Path, repo_id: str, files: dict) -> Path:
    """Write files into the cache as the snapshot of ``repo_id`` at main."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / REVISION
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(REVISION)
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


def _resnet18_state(num_classes: int = 1000):
    return timm.create_model('resnet18', num_classes=num_classes, zero_init_last=False).state_dict()


def _same_weights(model, state) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if not k.startswith('fc.'))


def test_pretrained_true_loads_the_source_tag_from_the_hub_cache(hub_cache):
    state = _resnet18_state()
    _add_repo(hub_cache, 'timm/resnet18.a1_in1k', {'model.safetensors': lambda p: save_file(state, p)})
    model = timm.create_model('momentum_resnet18', pretrained=True)
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/resnet18.a1_in1k'
    assert _same_weights(model, state) and torch.equal(model.fc.weight, state['fc.weight'])
    reference = timm.create_model('resnet18')
    reference.load_state_dict(state)
    model.set_momentum(gamma=0.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(x) - reference.eval()(x)).abs().max() <= 1e-5
    # a new head for fine-tuning: the backbone loads, the classifier is fresh
    finetune = timm.create_model('momentum_resnet18', pretrained=True, num_classes=10, memory_efficient=True)
    assert finetune.fc.out_features == 10 and _same_weights(finetune, state)


def test_pretrained_without_cached_weights_fails_offline(hub_cache):
    with pytest.raises(LocalEntryNotFoundError, match='cannot find the requested files in the local cache'):
        timm.create_model('momentum_resnet34', pretrained=True)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_pretrained_cfg_overlay_file(tmp_path, suffix):
    state = _resnet18_state(num_classes=5)
    path = tmp_path / f'weights{suffix}'
    save_file(state, path) if suffix == '.safetensors' else torch.save(state, path)
    model = timm.create_model('momentum_resnet18', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    assert _same_weights(model, state) and torch.equal(model.fc.weight, state['fc.weight'])


def _model_repo_files(tmp_dir: Path) -> dict:
    state = _resnet18_state(num_classes=10)
    config = {
        'architecture': 'momentum_resnet18', 'num_classes': 10, 'num_features': 512,
        'model_args': {'gamma': 0.5, 'block_fn': 'dropin'},
        'pretrained_cfg': {'input_size': [3, 64, 64], 'mean': [0.5] * 3, 'std': [0.25] * 3,
                           'interpolation': 'bilinear', 'crop_pct': 1.0, 'classifier': 'fc'},
    }
    return state, {
        'config.json': lambda p: p.write_text(json.dumps(config)),
        'model.safetensors': lambda p: save_file(state, p),
    }


def test_hf_hub_name_with_momentum_architecture(hub_cache):
    state, files = _model_repo_files(hub_cache)
    _add_repo(hub_cache, 'someone/momentum-resnet18-digits', files)
    model = timm.create_model('hf-hub:someone/momentum-resnet18-digits', pretrained=True)
    assert type(model).__name__ == 'MomentumResNet' and model.momentum_cfg['gamma'] == [0.5] * 4
    assert _same_weights(model, state) and model.num_classes == 10
    assert tuple(model.pretrained_cfg['input_size']) == (3, 64, 64)


def test_local_dir_with_momentum_architecture(tmp_path):
    state, files = _model_repo_files(tmp_path)
    for name, write in files.items():
        write(tmp_path / name)
    model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert model.momentum_cfg['gamma'] == [0.5] * 4 and _same_weights(model, state)


def test_checkpoint_of_another_depth_names_the_keys(tmp_path):
    path = tmp_path / 'resnet34.safetensors'
    save_file(timm.create_model('resnet34').state_dict(), path)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*layer1\.2\.conv1\.weight'):
        timm.create_model('momentum_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_checkpoint_of_another_width_names_key_and_shapes(tmp_path):
    path = tmp_path / 'wide.safetensors'
    save_file(timm.create_model('resnet18', in_chans=1).state_dict(), path)
    with pytest.raises(RuntimeError, match=r'conv1\.weight.*torch\.Size\(\[64, 1, 7, 7\]\).*torch\.Size\(\[64, 3, 7, 7\]\)'):
        timm.create_model('momentum_resnet18', pretrained=True, in_chans=3,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=1000, first_conv=None))


def test_truncated_checkpoint_is_an_error(tmp_path):
    path = tmp_path / 'truncated.safetensors'
    save_file(_resnet18_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorError, match='incomplete metadata, file not fully covered'):
        timm.create_model('momentum_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
