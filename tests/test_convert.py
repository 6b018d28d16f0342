"""The converter, offline, on checkpoints the tests make in every source layout."""
import errno
import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from timm_momentum.tools.cli import main
from timm_momentum.tools.convert import convert, infer_architecture, plan_upload, upload_to_hub
from timm_momentum.tools.errors import ConversionError
from timm_momentum.tools.files import write_marker

from conftest import hide_package
from test_loading import _add_repo


def _resnet(depth: int = 18, **kwargs) -> torch.nn.Module:
    return timm.create_model(f'resnet{depth}', zero_init_last=False, **kwargs).eval()


def _logits(model: torch.nn.Module, size: int = 64, in_chans: int = 3) -> torch.Tensor:
    torch.manual_seed(3)
    with torch.no_grad():
        return model.eval()(torch.randn(2, in_chans, size, size))


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.')]


def test_timm_safetensors_round_trip(tmp_path):
    source = _resnet(18, num_classes=5)
    save_file(source.state_dict(), tmp_path / 'r18.safetensors')
    previous_umask = os.umask(0o022)
    try:
        result = convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'out', gamma=0.9)
    finally:
        os.umask(previous_umask)
    out = result.out_dir
    assert out.stat().st_mode & 0o777 == 0o755  # the umask's, not mkdtemp's 0700
    files = ['.timm-momentum.json', 'README.md', 'config.json', 'model.safetensors', 'verify.json']
    assert sorted(p.name for p in out.iterdir()) == files
    # every file too, model.safetensors included (safetensors creates its files 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(files, 0o644)
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'momentum_resnet18' and config['model_args']['gamma'] == [0.9] * 4
    assert config['model_args']['block_fn'] == 'dropin' and config['num_classes'] == 5
    assert len(config['provenance']['sha256']) == 64
    verify = json.loads((out / 'verify.json').read_text())
    assert verify['equivalence']['passed'] and verify['equivalence']['max_abs_logit_diff_gamma0'] <= 1e-5
    assert verify['drift_at_gamma']['max_abs_logit_diff'] > 0
    # without images the drift says it comes from noise, and gives no top-1 agreement (of 2 noise images)
    assert verify['drift_at_gamma']['input'] == 'synthetic random normal, 2 images'
    assert 'top1_agreement' not in verify['drift_at_gamma']
    assert verify['num_params'] == sum(p.numel() for p in source.parameters())
    card = (out / 'README.md').read_text()
    assert 'library_name: timm' in card and 'momentum_resnet18' in card and '{' + 'model_name}' not in card
    # a local file carries no metadata: its dataset and license are unknown, never guessed
    assert 'imagenet' not in card.lower() and 'datasets:' not in card and 'Trained on: unknown' in card
    assert 'license: unknown' in card and config['pretrained_cfg']['license'] == 'unknown'
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.momentum_cfg['gamma'] == [0.9] * 4
    model.set_momentum(gamma=0.0)
    assert (_logits(model) - _logits(source)).abs().max() <= 1e-5


def test_torchvision_and_wrapped_checkpoints(tmp_path):
    tv = torchvision.models.resnet50(num_classes=7)
    torch.save(tv.state_dict(), tmp_path / 'tv.pth')
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in tv.state_dict().items()}}, tmp_path / 'w.bin')
    # older torchvision checkpoints have no BatchNorm num_batches_tracked counters
    torch.save({k: v for k, v in tv.state_dict().items() if not k.endswith('num_batches_tracked')},
               tmp_path / 'old.pth')
    tv.eval()
    torch.manual_seed(0)  # the 2 noise images verification and drift are measured on
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = tv(images)
    # the default ('auto') is gamma 0 at depth 50, which drifts by nothing: the others drift, so the figure matters
    for name, gamma in (('tv.pth', None), ('w.bin', 0.5), ('old.pth', 0.5)):
        result = convert(str(tmp_path / name), tmp_path / f'out-{name}', gamma=gamma)
        assert result.arch == 'momentum_resnet50'
        # verify.json's figures against the written folder's model run here, and torchvision's own resnet50
        verify = json.loads((result.out_dir / 'verify.json').read_text())
        assert verify['input_size'] == [3, 224, 224] and verify['drift_at_gamma']['images'] == 2
        model = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True).eval()
        with torch.no_grad():
            drift = float((model(images) - reference).abs().max())
            model.set_momentum(gamma=0.0)
            at_zero = float((model(images) - reference).abs().max())
        assert verify['drift_at_gamma']['max_abs_logit_diff'] == pytest.approx(drift, rel=1e-3, abs=1e-5)
        assert (drift > 1e-3) == (gamma is not None)
        assert verify['equivalence']['max_abs_logit_diff_gamma0'] == pytest.approx(at_zero, abs=1e-5)
        assert at_zero <= verify['equivalence']['tolerance']


def test_official_transform_to_momentumnet_layout(tmp_path):
    from momentumnet import transform_to_momentumnet
    official = transform_to_momentumnet(_resnet(34), gamma=0.9, use_backprop=True).eval()
    state = official.state_dict()
    assert 'layer3.1.0.network.1.conv1.weight' in state
    torch.save(state, tmp_path / 'official.pth')
    result = convert(str(tmp_path / 'official.pth'), tmp_path / 'out', gamma=0.9)
    assert result.arch == 'momentum_resnet34'
    model = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True)
    assert (_logits(model) - _logits(official)).abs().max() <= 1e-4


def test_official_mresnet_cifar_layout(tmp_path):
    from momentumnet.models import mResNet18
    official = mResNet18(num_classes=10, gamma=0.9, use_backprop=True).eval()
    with torch.no_grad():
        for module in official.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    assert any(k.startswith('layer2.1.network.0.') for k in official.state_dict())
    save_file({k: v.contiguous() for k, v in official.state_dict().items()}, tmp_path / 'm.safetensors')
    result = convert(str(tmp_path / 'm.safetensors'), tmp_path / 'out', gamma=0.9)
    assert result.arch == 'momentum_mresnet18_cifar' and 'skipped' in result.verify['equivalence']
    model = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True)
    assert model.momentum_cfg['block_fn'] == 'paper'
    assert (_logits(model, 32) - _logits(official, 32)).abs().max() <= 1e-4


def test_timm_tag_from_the_hub_cache_and_hf_hub_output(tmp_path, monkeypatch):
    cache = tmp_path / 'hub'
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    state = _resnet(18).state_dict()
    hub_card = '---\nlicense: apache-2.0\ndatasets:\n  - imagenet-1k\n---\n# resnet18.a1_in1k\n'
    _add_repo(cache, 'timm/resnet18.a1_in1k', {'model.safetensors': lambda p: save_file(state, p),
                                               'README.md': lambda p: p.write_text(hub_card)})
    result = convert('resnet18.a1_in1k', tmp_path / 'out', gamma=0.5)
    config = json.loads((result.out_dir / 'config.json').read_text())
    assert config['provenance']['source'] == 'resnet18.a1_in1k' and config['provenance']['revision'] == 'a' * 40
    assert config['pretrained_cfg']['interpolation'] == 'bicubic'  # the source tag's cfg
    # dataset and license come from the source's hub card and cfg, and the card agrees with config.json
    card = (result.out_dir / 'README.md').read_text()
    assert 'datasets:\n  - imagenet-1k\n---' in card and 'Trained on: imagenet-1k.' in card
    assert f"license: {config['pretrained_cfg']['license']}\n" in card and config['pretrained_cfg']['license'] == 'apache-2.0'
    # a Hub repo's files on disk convert as a folder, with the same metadata
    folder = convert(f'local-dir:{cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("a" * 40)}',
                     tmp_path / 'from-folder', gamma=0.5)
    assert 'Trained on: imagenet-1k.' in (folder.out_dir / 'README.md').read_text()
    files = {p.name: p for p in result.out_dir.iterdir()}
    _add_repo(cache, 'me/momentum-resnet18', {n: (lambda dst, src=p: dst.write_bytes(src.read_bytes()))
                                               for n, p in files.items()})
    model = timm.create_model('hf-hub:me/momentum-resnet18', pretrained=True)
    assert model.momentum_cfg['gamma'] == [0.5] * 4
    with pytest.raises(ConversionError, match='cannot fetch'):
        convert('resnet34.a1_in1k', tmp_path / 'missing')


@pytest.mark.parametrize('options, message', [
    (['--gamma', '2'], 'gamma must be in [0, 1), got 2.0'),
    (['--gamma', '1'], 'at gamma = 1 the velocity starts at 0 and stays 0'),
    (['--distill-steps', '-3'], 'distill_steps must be >= 0, got -3'),
    (['--recalibrate-bn'], 'needs heal_images'),
    (['--img-size', '-5'], 'img_size must be a positive number of pixels, got -5'),
    (['--img-size', '0'], 'img_size must be a positive number of pixels, got 0'),
    (['--push-to-hub', 'not a repo'], "'not a repo' is not a Hub repo id of the form ORG/NAME"),
    (['--push-to-hub', 'org/bad--name'], "'org/bad--name' is not a Hub repo id"),
])
def test_bad_options_are_refused_before_the_source_is_read(tmp_path, options, message, capsys):
    assert main(['convert', str(tmp_path / 'absent.safetensors'), '--out', str(tmp_path / 'out')] + options) == 2
    assert message in capsys.readouterr().err
    assert _no_leftovers(tmp_path / 'out')


def test_an_absent_repo_offline_names_hf_hub_offline_and_the_ways_to_work_offline(tmp_path):
    import subprocess
    import sys
    empty_cache = tmp_path / 'hub'
    empty_cache.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(empty_cache))
    proc = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.cli', 'convert', 'hf-hub:nobody/absent-resnet',
                           '--out', str(tmp_path / 'out')], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'HF_HUB_OFFLINE=1 is set' in proc.stderr and 'local-dir:PATH' in proc.stderr
    assert 'huggingface-cli download nobody/absent-resnet' in proc.stderr and str(empty_cache) in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_infer_architecture_reads_the_state_dict():
    assert infer_architecture(_resnet(50, num_classes=3, in_chans=1).state_dict()) == \
        ('momentum_resnet50', {'num_classes': 3, 'in_chans': 1})
    # a family architecture by its keys and shapes; anti-aliasing has neither, so resnetaa50d reads as resnet50d
    assert infer_architecture(timm.create_model('resnet50d').state_dict()) == ('momentum_resnet50d',
                                                                               {'num_classes': 1000})
    assert infer_architecture(timm.create_model('resnetaa50d', num_classes=4).state_dict())[0] == 'momentum_resnet50d'
    assert infer_architecture(timm.create_model('seresnext26d_32x4d', in_chans=1, num_classes=5).state_dict()) == \
        ('momentum_seresnext26d_32x4d', {'num_classes': 5, 'in_chans': 1})
    # what a source's config names wins over the keys (resnetblur50 has resnet50's)
    assert infer_architecture(timm.create_model('resnetblur50').state_dict(), architecture='resnetblur50')[0] == \
        'momentum_resnetblur50'
    # a deep stem on resnet50's layers that no family architecture has exactly: described by its options
    arch, args = infer_architecture(timm.create_model('resnet50', stem_type='deep', stem_width=48,
                                                      avg_down=True).state_dict())
    assert arch == 'momentum_resnet50' and args['stem_type'] == 'deep' and args['avg_down'] and \
        args['stem_width'] == 48
    with pytest.raises(ConversionError, match='selective-kernel .* match no architecture of timm'):
        infer_architecture(timm.create_model('skresnet18').state_dict())
    with pytest.raises(ConversionError, match="'skresnet18' .* is not in timm's ResNet family"):
        infer_architecture(timm.create_model('resnet18').state_dict(), architecture='skresnet18')


@pytest.mark.parametrize('case', ['unsupported', 'mismatch', 'truncated', 'nan', 'not_empty', 'garbage',
                                  'empty_pth', 'empty_bin'])
def test_bad_input_is_a_clear_error_with_no_partial_output(tmp_path, case, capsys):
    path = tmp_path / 'ckpt.safetensors'
    state = _resnet(18).state_dict()
    arch = None
    if case == 'unsupported':
        state = timm.create_model('resnet18', layers=(3, 3, 3, 3)).state_dict()
        message = 'unsupported architecture: basic blocks per stage (3, 3, 3, 3) match no architecture'
    elif case == 'mismatch':
        arch = 'momentum_mresnet18_cifar'
        message = 'shape mismatch for conv1.weight: checkpoint (64, 3, 7, 7), momentum_mresnet18_cifar (64, 3, 3, 3)'

    elif case == 'nan':
        state['layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
        message = 'layer2.0.conv1.weight holds NaN'
    elif case == 'not_empty':
        (tmp_path / 'out').mkdir()
        (tmp_path / 'out' / 'keep.txt').write_text('mine')
        message = 'not empty'
    save_file(state, path)
    if case == 'truncated':
        path.write_bytes(path.read_bytes()[:5000])
        message = 'corrupt or truncated'
    if case == 'garbage':
        path = tmp_path / 'ckpt.pth'
        path.write_bytes(b'not a checkpoint at all')
        message = 'cannot read'
    if case.startswith('empty_'):
        path = tmp_path / f'ckpt.{case[len("empty_"):]}'
        path.write_bytes(b'')
        message = 'the file is empty (0 bytes)'
    argv = ['convert', str(path), '--out', str(tmp_path / 'out')] + (['--arch', arch] if arch else [])
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    if case == 'not_empty':
        assert (tmp_path / 'out' / 'keep.txt').read_text() == 'mine'
    else:
        assert _no_leftovers(tmp_path / 'out')


def test_healing_images_from_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    save_file(_resnet(18).state_dict(), tmp_path / 'a.safetensors')
    (tmp_path / 'empty').mkdir()
    assert main(['convert', str(tmp_path / 'a.safetensors'), '--out', str(tmp_path / 'out'), '--img-size', '32',
                 '--heal-images', str(tmp_path / 'empty'), '--recalibrate-bn']) == 2
    assert 'no images found' in capsys.readouterr().err
    assert _no_leftovers(tmp_path / 'out')
    assert main(['convert', str(tmp_path / 'a.safetensors'), '--out', str(tmp_path / 'out'), '--img-size', '32',
                 '--eval-images', str(tmp_path / 'absent')]) == 2
    assert 'evaluation images' in capsys.readouterr().err and _no_leftovers(tmp_path / 'out')


@pytest.mark.parametrize('failure, message', [
    (errno.ENOSPC, 'no space left on device'),
    (errno.EROFS, 'read-only file system'),
])
def test_a_full_or_read_only_disk_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, failure, message):
    import safetensors.torch

    save_file(_resnet(18).state_dict(), tmp_path / 'a.safetensors')

    def fail(*args, **kwargs):
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(safetensors.torch, 'save_file', fail)
    out = tmp_path / 'new' / 'parents' / 'out'
    assert main(['convert', str(tmp_path / 'a.safetensors'), '--out', str(out), '--img-size', '32']) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors']  # no new parent folders either


def _old_folder(out: Path) -> None:
    """A folder timm-momentum wrote (it carries the marker), so that --force may replace it."""
    out.mkdir()
    (out / 'old.txt').write_text('old')
    write_marker(out, 'timm-momentum test')


def test_force_never_leaves_the_output_missing(tmp_path, monkeypatch):
    save_file(_resnet(18).state_dict(), tmp_path / 'a.safetensors')
    out = tmp_path / 'out'
    _old_folder(out)
    # interrupted between moving the old folder aside and renaming the new one in: the old one stays
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith('.out.tmp-') and Path(dst) == out:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / 'a.safetensors'), out, force=True, img_size=32)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert (out / 'old.txt').read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors', 'out']
    # killed (SIGKILL) there, with litter of an earlier killed write: the next run puts the old folder back
    real_replace(out, tmp_path / 'aside')
    (tmp_path / '.out.old-killed').mkdir()
    real_replace(tmp_path / 'aside', tmp_path / '.out.old-killed' / 'previous')
    (tmp_path / '.out.tmp-killed').mkdir()
    (tmp_path / '.out.tmp-killed' / 'model.safetensors').write_bytes(b'half')
    with pytest.raises(ConversionError, match='exists and is not empty'):
        convert(str(tmp_path / 'a.safetensors'), out, img_size=32)
    assert (out / 'old.txt').read_text() == 'old' and sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors', 'out']
    convert(str(tmp_path / 'a.safetensors'), out, force=True, img_size=32)
    assert (out / 'model.safetensors').exists() and not (out / 'old.txt').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors', 'out']


def test_force_replaces_an_existing_folder(tmp_path):
    save_file(_resnet(18).state_dict(), tmp_path / 'a.safetensors')
    _old_folder(tmp_path / 'out')
    convert(str(tmp_path / 'a.safetensors'), tmp_path / 'out', force=True)
    assert not (tmp_path / 'out' / 'old.txt').exists() and (tmp_path / 'out' / 'model.safetensors').exists()


def test_push_to_hub_plan_and_offline_failure(tmp_path):
    save_file(_resnet(18).state_dict(), tmp_path / 'a.safetensors')
    out = convert(str(tmp_path / 'a.safetensors'), tmp_path / 'out').out_dir
    plan = plan_upload(out, 'someone/momentum-resnet18')
    assert plan['repo_id'] == 'someone/momentum-resnet18'
    assert plan['files'] == ['README.md', 'config.json', 'model.safetensors', 'verify.json']
    with pytest.raises(ConversionError, match='ORG/NAME'):
        plan_upload(out, 'no-slash')

    class Offline:
        def create_repo(self, *args, **kwargs):
            raise OSError('network is unreachable')

    class Recording:
        calls = []

        def create_repo(self, repo_id, exist_ok):
            self.calls.append(('create_repo', repo_id))

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            self.calls.append(('upload_folder', repo_id, folder_path, ignore_patterns))

    with pytest.raises(ConversionError, match='upload to someone/momentum-resnet18 failed.*complete'):
        upload_to_hub(out, 'someone/momentum-resnet18', api=Offline())
    assert (out / 'model.safetensors').exists()
    api = Recording()
    upload_to_hub(out, 'someone/momentum-resnet18', api=api)
    assert api.calls == [('create_repo', 'someone/momentum-resnet18'),
                         ('upload_folder', 'someone/momentum-resnet18', str(out), ['.timm-momentum.json'])]


def test_zoo_driver_converts_each_entry_and_reports_failures(tmp_path):
    import subprocess
    import sys
    save_file(_resnet(18).state_dict(), tmp_path / 'r18.safetensors')
    manifest = tmp_path / 'zoo.yaml'
    manifest.write_text(f'models:\n  - source: {tmp_path / "r18.safetensors"}\n    name: momentum_resnet18.test\n'
                        f'    gamma: 0.8\n  - source: {tmp_path / "missing.safetensors"}\n    name: broken\n')
    script = Path(__file__).parent.parent / 'convert' / 'build_zoo.py'
    proc = subprocess.run([sys.executable, str(script), '--manifest', str(manifest), '--out', str(tmp_path / 'zoo')],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and 'broken: ' in proc.stdout and '1 converted, 1 failed' in proc.stdout
    config = json.loads((tmp_path / 'zoo' / 'momentum_resnet18.test' / 'config.json').read_text())
    assert config['model_args']['gamma'] == [0.8] * 4
    assert not (tmp_path / 'zoo' / 'broken').exists()
    repo_manifest = yaml_load(Path(__file__).parent.parent / 'convert' / 'zoo.yaml')
    # the repo's manifest: one timm tag per entry, every one of the family's (tests/test_zoo.py checks each)
    assert all(e['source'].startswith('timm/') for e in repo_manifest['models']) and len(repo_manifest['models']) >= 150


def yaml_load(path):
    import yaml
    return yaml.safe_load(Path(path).read_text())


def test_healing_options_run(tmp_path):
    save_file(_resnet(18).state_dict(), tmp_path / 'r18.safetensors')
    # healing is for a gamma > 0 (the faithful default keeps resnet18 at 0, its source's function)
    result = convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'out', heal_images='sklearn/digits',
                     recalibrate_bn=True, distill_steps=2, img_size=32, gamma=0.9)
    assert json.loads((result.out_dir / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert result.verify['healing'] == {'images': 'sklearn/digits', 'num_images': 1024, 'recalibrate_bn': True,
                                        'distill_steps': 2}
    healed = load_file(result.out_dir / 'model.safetensors')
    unhealed = convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'plain', img_size=32, eval_images='sklearn/digits',
                       gamma=0.9)
    plain = load_file(unhealed.out_dir / 'model.safetensors')
    # the card and verify.json say what healing did, and drift is measured after it, on real held-out images
    card = (result.out_dir / 'README.md').read_text()
    assert 'unchanged' not in card and 'recalibrated at γ = 0.9 on 1024 images of sklearn/digits' in card
    assert 'distilled from the source for 2 steps' in card and 'after healing' in card
    assert 'unchanged' in (unhealed.out_dir / 'README.md').read_text()
    drift = json.loads((result.out_dir / 'verify.json').read_text())['drift_at_gamma']
    unhealed_drift = json.loads((unhealed.out_dir / 'verify.json').read_text())['drift_at_gamma']
    assert drift['after_healing'] and not unhealed_drift['after_healing']
    assert drift['images'] == unhealed_drift['images'] == 256 and 'held-out split' in drift['input']
    assert drift['max_abs_logit_diff'] != unhealed_drift['max_abs_logit_diff']
    assert drift['top1_agreement'] != unhealed_drift['top1_agreement']
    assert 0 <= unhealed_drift['top1_agreement'] <= 1 and unhealed_drift['top1_agreement'] * 256 % 1 == 0
    recalibrated = load_file(convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'recalibrated', img_size=32,
                                     heal_images='sklearn/digits', recalibrate_bn=True, gamma=0.9).out_dir /
                             'model.safetensors')
    # recalibration changes only BatchNorm statistics; distillation then changes the weights too
    changed = {k for k in plain if not torch.equal(plain[k], recalibrated[k])}
    assert changed and all(k.endswith(('running_mean', 'running_var', 'num_batches_tracked')) for k in changed)
    assert not torch.equal(healed['layer3.1.conv1.weight'], recalibrated['layer3.1.conv1.weight'])
    with pytest.raises(ConversionError, match='needs heal_images'):
        convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'out2', recalibrate_bn=True)


def _kl_to(model: torch.nn.Module, reference: torch.Tensor, images: torch.Tensor) -> float:
    with torch.no_grad():
        log_probs = model.eval()(images).log_softmax(-1)
    return float(torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction='batchmean'))


def test_healing_brings_the_converted_net_back_toward_its_source():
    """The measurement of convert/HEALING.md at a test's size: a resnet18 trained briefly on digits 0-4,
    converted to gamma = 0.9; recalibration lowers the KL divergence from the source on held-out digits,
    and distillation after it lowers it further."""
    from timm_momentum.tools.data import DigitsDataset
    from timm_momentum.tools.heal import distill, load_images, recalibrate_batchnorm

    torch.manual_seed(0)
    train, held_out = DigitsDataset('train', [0, 1, 2, 3, 4], 16), DigitsDataset('validation', [0, 1, 2, 3, 4], 16)
    images = load_images('sklearn/digits', 3, 16, limit=512)
    source = timm.create_model('resnet18', num_classes=5)
    optimizer = torch.optim.AdamW(source.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(train), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(source.train()(train.images[idx]), train.targets[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recalibrate_batchnorm(source, images)
    with torch.no_grad():
        reference = source.eval()(held_out.images).log_softmax(-1)
    assert (reference.argmax(-1) == held_out.targets).float().mean() > 0.8

    def converted():
        model = timm.create_model('momentum_resnet18', num_classes=5, gamma=0.9)
        model.load_state_dict(source.state_dict())
        return model

    teacher = converted()
    teacher.set_momentum(gamma=0.0)
    unhealed = _kl_to(converted(), reference, held_out.images)
    recalibrated = recalibrate_batchnorm(converted(), images)
    recalibrated_kl = _kl_to(recalibrated, reference, held_out.images)
    distilled_kl = _kl_to(distill(recalibrated, teacher, images, steps=30), reference, held_out.images)
    assert recalibrated_kl < unhealed, (recalibrated_kl, unhealed)
    assert distilled_kl < recalibrated_kl, (distilled_kl, recalibrated_kl)


def test_healing_on_digits_without_scikit_learn_is_a_conversion_error(monkeypatch):
    from timm_momentum.tools.heal import load_images

    hide_package(monkeypatch, 'sklearn')
    with pytest.raises(ConversionError, match='healing images sklearn/digits: .*needs scikit-learn'):
        load_images('sklearn/digits', 3, 16)
