"""Pretrained weights at the faithful gamma: per-stage gamma everywhere, the policy, and Fashion-MNIST."""
import copy
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from timm_momentum import faithful_gamma, parse_gamma, plan_chain, resolve_gamma
from timm_momentum.tools.convert import convert
from timm_momentum.tools.data import FASHION_MNIST_DIR, FashionMNIST, DigitsDataset
from timm_momentum.tools.errors import ConfigError, ConversionError
from timm_momentum.tools.finetune import DEFAULTS, load_config, train
from timm_momentum.core.chain import POLICY_AMPLIFICATION, plan_bytes
from timm_momentum.tools.memory import saved_tensor_bytes

from conftest import relative_error

R101_CHAINS = (2, 3, 22, 2)


def test_gamma_takes_one_value_per_stage_and_names_the_stage():
    model = timm.create_model('momentum_resnet50', gamma=[0.1, 0.2, 0.3, 0.4])
    assert model.momentum_cfg['gamma'] == [0.1, 0.2, 0.3, 0.4] and model.gamma_policy is None
    assert [stage.gamma for stage in model.stages] == [0.1, 0.2, 0.3, 0.4]
    assert parse_gamma('0, 0, 0.036, 0') == [0.0, 0.0, 0.036, 0.0] and parse_gamma('0.5') == 0.5
    assert parse_gamma('[0.5]') == [0.5] and parse_gamma(' auto ') == 'auto'
    with pytest.raises(ValueError, match='gamma for layer2: gamma must be in'):
        timm.create_model('momentum_resnet50', gamma=[0.1, 1.5, 0.2, 0.3])
    with pytest.raises(ValueError, match=r'one per stage \(4: layer1, layer2, layer3, layer4\)'):
        model.set_momentum(gamma=[0.1, 0.2])
    with pytest.raises(ValueError, match="or 'auto'"):
        model.set_momentum(gamma='faithful')
    # a chain that must invert refuses gamma 0, naming its stage; nothing changed
    deep = timm.create_model('momentum_resnet101', gamma=[0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match='layer3: gamma=0.0 cannot be inverted'):
        deep.set_momentum(gamma=[0, 0, 0, 0], memory_efficient=True)
    assert deep.momentum_cfg['gamma'] == [0.1, 0.2, 0.3, 0.4] and not deep.layer1.memory_efficient


def test_the_policy_keeps_gamma_zero_where_a_chain_stores_its_inputs():
    for blocks in (1, 2, 3, 4, 5):  # 5: 20 bytes of float32 inputs, within ZERO_GAMMA_STORE_RATIO of a state's 16
        assert faithful_gamma(blocks) == 0.0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert plan_chain(0.0, blocks, dtype).store_inputs  # it never inverts: exact at gamma 0
    gammas, policy = resolve_gamma('auto', R101_CHAINS)
    assert policy == 'auto' and gammas == [0.0, 0.0, 0.778, 0.0]
    assert resolve_gamma('auto', [2, 3, 5, 2])[0] == [0.0, 0.0, 0.0, 0.0]  # resnet34/50: the source, exactly
    for blocks in (6, 7, 22, 35):
        gamma = faithful_gamma(blocks)
        assert gamma ** -blocks <= POLICY_AMPLIFICATION < (gamma - 0.001) ** -blocks  # the smallest, to 3 digits
        # one policy for every precision: exact with no extra stored state (a half-precision chain of at most 8
        # blocks stores its inputs instead, as it does at 0.9), and no more bytes than at the paper's gamma
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            plan = plan_chain(gamma, blocks, dtype)
            assert plan.store_inputs == (dtype != torch.float32 and blocks <= 8), (blocks, dtype)
            assert plan.store_inputs or plan.span == blocks, (blocks, dtype)
            assert plan_bytes(plan, blocks, dtype) == plan_bytes(plan_chain(0.9, blocks, dtype), blocks, dtype)


@pytest.mark.parametrize('depth', [50, 101])
def test_the_policy_stores_no_more_than_gamma_0_9(depth):
    """Bytes saved for backward in memory-efficient mode, float32 and bfloat16 autocast, policy against 0.9: equal,
    or (resnet50 in float32, whose policy is gamma 0 everywhere) within the 5 % the policy may spend."""
    model = timm.create_model(f'momentum_resnet{depth}', memory_efficient=True).train()
    x = torch.randn(2, 3, 64, 64)
    for amp in (None, torch.bfloat16):
        measured = {}
        for gamma in (0.9, 'auto'):
            model.set_momentum(gamma=gamma)
            with torch.autocast('cpu', dtype=amp, enabled=amp is not None):
                measured[gamma] = saved_tensor_bytes(model, x)
        if depth == 50 and amp is None:  # layer3's 5 float32 inputs at gamma 0 instead of a 16-byte state
            assert measured[0.9] < measured['auto'] <= 1.05 * measured[0.9], measured
        else:
            assert measured['auto'] == measured[0.9], (amp, measured)


def test_pretrained_cfgs_name_the_faithful_gamma():
    notes = timm.models.get_pretrained_cfg('momentum_resnet50.a1_in1k').notes
    assert '(0.0, 0.0, 0.0, 0.0)' in notes and 'computes its source' in notes
    notes = timm.models.get_pretrained_cfg('momentum_resnet101.a1h_in1k').notes
    assert '(0.0, 0.0, 0.778, 0.0)' in notes and 'do not compute their source' in notes


def _trained_resnet34(tmp_path: Path):
    """A plain timm resnet34 trained briefly on digits 0-4 at 16 px (its 5-block layer3 keeps its inputs at gamma 0)."""
    torch.manual_seed(0)
    source = timm.create_model('resnet34', num_classes=5)
    train_set = DigitsDataset('train', [0, 1, 2, 3, 4], 16)
    optimizer = torch.optim.AdamW(source.parameters(), lr=2e-3)
    source.train()
    for step in range(30):
        index = torch.randint(0, len(train_set), (64,))
        loss = nn.functional.cross_entropy(source(train_set.images[index]), train_set.targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path / 'resnet34.safetensors'
    save_file(source.state_dict(), path)
    return source.eval(), path


def test_pretrained_at_defaults_keeps_the_source_and_trains_exactly(tmp_path):
    source, path = _trained_resnet34(tmp_path)
    images = DigitsDataset('validation', [0, 1, 2, 3, 4], 16).images
    model = timm.create_model('momentum_resnet34', pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=5))
    assert model.gamma_policy == 'auto' and model.momentum_cfg['gamma'] == [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        reference, faithful = source(images), model.eval()(images)
        model.set_momentum(gamma=0.9)
        paper = model(images)
    agreement = float((faithful.argmax(-1) == reference.argmax(-1)).float().mean())
    print(f'top-1 agreement with the source: {agreement:.4f} at the policy, '
          f'{float((paper.argmax(-1) == reference.argmax(-1)).float().mean()):.4f} at 0.9; max logit difference '
          f'{float((faithful - reference).abs().max()):.2e} at the policy')
    assert agreement == 1.0 and torch.equal(faithful, reference)  # the source's blocks, bit for bit
    assert relative_error(paper, reference) > 0.05
    # memory-efficient gradients at the policy's gamma (layer3's 5 blocks keep their inputs) are standard backprop's
    model.set_momentum(gamma='auto')
    grads = []
    for memory_efficient in (False, True):
        net = copy.deepcopy(model).train()
        net.set_momentum(memory_efficient=memory_efficient)
        x = images[:16].clone().requires_grad_(True)
        nn.functional.cross_entropy(net(x), torch.arange(16) % 5).backward()
        grads.append([x.grad] + [p.grad for p in net.parameters()])
    assert plan_chain(0.0, 5).store_inputs
    assert max(relative_error(e, s) for e, s in zip(grads[1], grads[0])) <= 1e-5


def test_per_stage_gamma_round_trips_through_convert_and_local_dir(tmp_path):
    source = timm.create_model('resnet101', num_classes=5, zero_init_last=False).eval()
    save_file(source.state_dict(), tmp_path / 'r101.safetensors')
    # the default is the faithful policy; the folder carries its values, which load back as they are
    result = convert(str(tmp_path / 'r101.safetensors'), tmp_path / 'auto', img_size=16, eval_images='sklearn/digits')
    config = json.loads((result.out_dir / 'config.json').read_text())
    assert config['model_args']['gamma'] == [0.0, 0.0, 0.778, 0.0]
    assert config['provenance']['gamma_policy'] == 'auto' and result.verify['gamma_policy'] == 'auto'
    assert result.verify['gamma'] == [0.0, 0.0, 0.778, 0.0]
    drift = result.verify['drift_at_gamma']
    assert drift['against'].startswith('the source ResNet, run as timm resnet101') and drift['images'] == 256
    assert {'top1_agreement', 'kl_source_to_converted'} <= set(drift)
    card = (result.out_dir / 'README.md').read_text()
    assert '(0, 0, 0.778, 0), chosen by the faithful policy `auto`' in card
    assert 'do not compute their source\'s function' in card and 'is exactly' not in card.split('## How')[1]
    loaded = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True)
    assert loaded.momentum_cfg['gamma'] == [0.0, 0.0, 0.778, 0.0]
    source = timm.create_model('resnet34', num_classes=5, zero_init_last=False).eval()
    save_file(source.state_dict(), tmp_path / 'r34.safetensors')
    # one value per stage from the command line, through the CLI's own parsing
    out = tmp_path / 'stages'
    proc = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.cli', 'convert', str(tmp_path / 'r34.safetensors'),
                           '--out', str(out), '--gamma', '0,0.2,0.5,0', '--img-size', '16'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'gamma (0, 0.2, 0.5, 0) per stage' in proc.stdout
    assert timm.create_model(f'local-dir:{out}', pretrained=True).momentum_cfg['gamma'] == [0.0, 0.2, 0.5, 0.0]
    card = (out / 'README.md').read_text()
    assert 'γ = (0, 0.2, 0.5, 0) per stage' in card
    for bad, message in (('0.5,x', 'comma-separated'), ('0.1,0.2', 'one per stage'), ('1.5', r'in \[0, 1\)')):
        proc = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.cli', 'convert', str(tmp_path / 'r34.safetensors'),
                               '--out', str(tmp_path / 'bad'), '--gamma', bad], capture_output=True, text=True)
        assert proc.returncode == 2 and re.search(message, proc.stderr.splitlines()[-1]), (bad, proc.stderr)
        assert not (tmp_path / 'bad').exists()


def test_drift_is_measured_against_the_real_source(tmp_path):
    """The paper block function at gamma 0 is not its source ResNet: verify.json must say how far it is."""
    source = timm.create_model('resnet18', num_classes=5, zero_init_last=False).eval()
    save_file(source.state_dict(), tmp_path / 'r18.safetensors')
    result = convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'paper', arch='momentum_mresnet18', gamma=0,
                     img_size=32, eval_images='sklearn/digits')
    drift = result.verify['drift_at_gamma']
    images = DigitsDataset('validation', None, 32).images[:256]
    with torch.no_grad():
        reference = source(images)
    assert drift['against'] == 'the source ResNet, run as timm resnet18'
    with torch.no_grad():
        converted = timm.create_model(f'local-dir:{result.out_dir}', pretrained=True).eval()(images)
    assert drift['max_abs_logit_diff'] == pytest.approx(float((converted - reference).abs().max()), rel=1e-4)
    assert drift['relative_logit_diff'] > 0.1
    assert 'not its source ResNet at any γ' in (result.out_dir / 'README.md').read_text()
    with pytest.raises(ConversionError, match='source_gamma'):
        convert(str(tmp_path / 'r18.safetensors'), tmp_path / 'x', source_gamma=0.9)


def test_card_metadata_cannot_rewrite_the_card(tmp_path):
    source = timm.create_model('resnet18', num_classes=5).eval()
    folder = tmp_path / '<b>src'
    folder.mkdir()
    save_file(source.state_dict(), folder / 'model.safetensors')
    (folder / 'config.json').write_text(json.dumps({'pretrained_cfg': {
        'license': 'mit\nlibrary_name: evil\ntags:\n  - injected'}}))
    (folder / 'README.md').write_text('---\ndatasets:\n  - "imagenet\\nlibrary_name: evil"\n  - <script>x</script>\n'
                                      '  - fashion_mnist\n---\n')
    result = convert(f'local-dir:{folder}', tmp_path / 'out', img_size=32)
    card = (result.out_dir / 'README.md').read_text()
    front = card.split('---\n')[1]
    import yaml
    meta = yaml.safe_load(front)
    assert meta['library_name'] == 'timm' and meta['license'] == 'other' and meta['datasets'] == ['fashion_mnist']
    assert 'evil' not in card and 'injected' not in card and '<script>' not in card and '<b>' not in card
    assert json.loads((result.out_dir / 'config.json').read_text())['pretrained_cfg']['license'] == 'other'


def test_finetune_takes_per_stage_gamma_and_exports_it(tmp_path):
    cfg = dict(DEFAULTS, model='momentum_resnet34', dataset='sklearn/digits', classes=[0, 1], img_size=16,
               batch_size=32, epochs=1, opt='adamw', lr=1e-3, progress=False, plots=False, checkpoints=False,
               output=str(tmp_path / 'run'), gamma=[0.0, 0.3, 0.5, 0.0])
    result = train(cfg)
    assert result['model'].momentum_cfg['gamma'] == [0.0, 0.3, 0.5, 0.0]
    final = timm.create_model(f'local-dir:{tmp_path / "run" / "final"}', pretrained=True)
    assert final.momentum_cfg['gamma'] == [0.0, 0.3, 0.5, 0.0]
    result = train(dict(cfg, gamma='auto', output=str(tmp_path / 'auto')))
    assert result['model'].momentum_cfg['gamma'] == [0.0, 0.0, 0.0, 0.0]
    assert load_config(None, ['--gamma', '0,0,0.5,0'])['gamma'] == [0.0, 0.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match='gamma for stage 3'):
        load_config(None, ['--gamma', '[0, 0, 1.5, 0]'])
    with pytest.raises(ConfigError, match='layer3: gamma=0.0 cannot be inverted'):
        train(dict(cfg, model='momentum_resnet101', gamma=0.0, output=str(tmp_path / 'zero')))


_REQUIRE = os.environ.get('TIMM_MOMENTUM_REQUIRE_FASHION_MNIST') == '1'  # .ci/run installs the data and sets it
needs_fashion_mnist = pytest.mark.skipif(
    not _REQUIRE and not (FASHION_MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)')


@needs_fashion_mnist
def test_fashion_mnist_reads_the_real_files(tmp_path):
    test = FashionMNIST('test', img_size=32)
    assert len(test) == 10000 and test.images.shape == (10000, 1, 32, 32) and test.num_classes == 10
    assert test[0][0].shape == (3, 32, 32) and test.classes[9] == 'Ankle boot'
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert abs(float(test.images.mean())) < 0.1 and 0.8 < float(test.images.std()) < 1.1  # normalised
    subset = FashionMNIST('test', classes=[5, 9], img_size=28, in_chans=1)
    assert len(subset) == 2000 and set(subset.targets.tolist()) == {0, 1} and subset[0][0].shape == (1, 28, 28)
    # a torchvision root (FashionMNIST/raw) works too, and the dataset is timm's torch/fashion_mnist in finetune
    raw = tmp_path / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for path in FASHION_MNIST_DIR.glob('*.gz'):
        (raw / path.name).symlink_to(path)
    assert len(FashionMNIST('test', tmp_path, limit=100)) == 100
    cfg = load_config(None, ['--dataset', 'torch/fashion_mnist', '--data-dir', str(tmp_path), '--classes', '[0, 1]'])
    from timm_momentum.tools.data import build_datasets
    train_set, val_set, classes = build_datasets(cfg, None)
    assert classes == 2 and len(train_set) == 12000 and len(val_set) == 2000


def test_fashion_mnist_without_its_files_says_how_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match=r'apt-get install dataset-fashion-mnist.*set data_dir'):
        FashionMNIST('train', tmp_path)
    (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(gzip.compress(b'\x00\x00\x08\x03' + bytes(12)))
    for name in ('t10k-labels-idx1-ubyte', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte'):
        (tmp_path / f'{name}.gz').write_bytes(gzip.compress(b'junk'))
    with pytest.raises(ConfigError, match='not an idx file'):
        FashionMNIST('test', tmp_path)
    (tmp_path / 't10k-images-idx3-ubyte.gz').write_bytes(gzip.compress(
        b'\x00\x00\x08\x03' + (5).to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2 + bytes(100)))
    with pytest.raises(ConfigError, match='truncated'):
        FashionMNIST('test', tmp_path)
