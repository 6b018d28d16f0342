"""Fine-tuning on CPU at tiny sizes: configs, outputs, exact resume after SIGKILL, DDP, bad input, demo."""
import csv
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from timm_momentum.tools.cli import main
from timm_momentum.tools.demo import run_demo
from timm_momentum.tools.errors import ConfigError
from timm_momentum.tools.finetune import DEFAULTS, checkpoint_checksum, load_config, train, validate_config

from conftest import hide_package

CONFIGS = Path(__file__).parent.parent / 'configs'


def _tiny(tmp_path: Path, **overrides) -> dict:
    cfg = dict(DEFAULTS, model='momentum_resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16,
               batch_size=32, epochs=2, opt='adamw', lr=2e-3, weight_decay=0.01, progress=False,
               output=str(tmp_path / 'run'))
    cfg.update(overrides)
    return cfg


def test_config_files_and_overrides():
    for path in CONFIGS.glob('*.yaml'):
        load_config(str(path))
    cfg = load_config(str(CONFIGS / 'cifar10_mresnet101.yaml'), ['--lr', '0.1', '--memory-efficient', 'false'])
    assert cfg['lr'] == 0.1 and cfg['memory_efficient'] is False and cfg['decay_milestones'] == [180]
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*did you mean"):
        load_config(None, ['--learning_rate', '0.1'])
    with pytest.raises(ConfigError, match="unknown config key 'gama'.*'gamma'"):
        load_config(None, ['--gama', '0.5'])
    with pytest.raises(ConfigError, match='does not exist'):
        load_config('configs/nope.yaml')


def test_training_writes_metrics_plots_checkpoint_and_exports(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.last.pth.tar.tmp-killed').write_bytes(b'half a checkpoint')  # litter of a killed run
    (out / '.best.tmp-killed').mkdir()
    previous_umask = os.umask(0o022)
    try:
        result = train(_tiny(tmp_path, model_ema=True, grad_accum_steps=2))
    finally:
        os.umask(previous_umask)
    assert not list(out.glob('.*tmp-*'))
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'train_loss', 'val_acc', 'images_per_s', 'peak_memory_mib'} <= set(rows[0])
    # the lr each epoch trained with: cosine over 2 epochs starts at lr and halves
    assert [float(r['lr']) for r in rows] == pytest.approx([2e-3, 1e-3])
    assert yaml.safe_load((out / 'args.yaml').read_text())['memory_efficient'] is True
    for name in ('loss.png', 'accuracy.png', 'last.pth.tar'):
        assert (out / name).stat().st_size > 0
    for path, mode in ((out / 'best', 0o755), (out / 'final', 0o755), (out / 'metrics.csv', 0o644),
                       (out / 'last.pth.tar', 0o644)):
        assert path.stat().st_mode & 0o777 == mode, path
    state = torch.load(out / 'last.pth.tar', weights_only=True)
    assert {'model', 'optimizer', 'scheduler', 'scaler', 'ema', 'epoch', 'rng'} <= set(state) and state['epoch'] == 1
    assert {'python', 'numpy', 'torch'} <= set(state['rng'])
    # grad_accum_steps=2: one optimizer step per two batches
    steps = state['optimizer']['state'][0]['step']
    assert int(steps) == 2 * math.ceil(result['steps_per_epoch'] / 2)
    # model_ema: best/ and final/ hold the EMA weights, which lag behind the trained ones
    final = timm.create_model(f'local-dir:{out / "final"}', pretrained=True).state_dict()
    ema = {k[len('module.'):]: v for k, v in state['ema'].items()}
    assert all(torch.equal(final[k], ema[k]) for k in final)
    assert not torch.equal(final['fc.weight'], state['model']['fc.weight'])
    for folder in ('best', 'final'):
        model = timm.create_model(f'local-dir:{out / folder}', pretrained=True)
        assert model.num_classes == 2 and model.momentum_cfg['gamma'] == [0.9] * 4


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / 'pwned'

    class RunsCode:
        def __reduce__(self):
            return exec, (f'open({str(marker)!r}, "w").write("ran")',)

    (tmp_path / 'run').mkdir()
    torch.save({'model': RunsCode(), 'epoch': 0}, tmp_path / 'run' / 'last.pth.tar')
    with pytest.raises(ConfigError, match='not a weights-only checkpoint.*holds code'):
        train(_tiny(tmp_path, resume=True))
    assert not marker.exists()
    assert main(['finetune', '--model', 'momentum_resnet18', '--classes', '[0,1]', '--img_size', '16',
                 '--output', str(tmp_path / 'run'), '--resume', 'true', '--progress', 'false']) == 2
    assert 'not a weights-only checkpoint' in capsys.readouterr().err and not marker.exists()
    # a checkpoint that reads, checks out and has the run's config, but other weights
    state = {'model': {'conv1.weight': torch.zeros(1)}, 'optimizer': {}, 'scheduler': {}, 'epoch': 0,
             'best_acc': 0.0, 'rows': [], 'rng': {}, 'config': validate_config(_tiny(tmp_path, resume=True))}
    torch.save({**state, 'checksum': checkpoint_checksum(state)}, tmp_path / 'run' / 'last.pth.tar')
    with pytest.raises(ConfigError, match='does not fit this config'):
        train(_tiny(tmp_path, resume=True))


def _run_cli(tmp_path: Path, output: Path, *extra: str) -> subprocess.Popen:
    args = ['--model', 'momentum_resnet18', '--classes', '[0,1]', '--img_size', '16', '--batch_size', '32',
            '--epochs', '2', '--opt', 'sgd', '--lr', '0.05', '--progress', 'false', '--output', str(output), *extra]
    return subprocess.Popen([sys.executable, '-m', 'timm_momentum.tools.finetune', *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_reaches_the_same_metrics(tmp_path):
    full = _run_cli(tmp_path, tmp_path / 'full')
    killed = _run_cli(tmp_path, tmp_path / 'killed')
    checkpoint = tmp_path / 'killed' / 'last.pth.tar'
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # mid-epoch 1: the checkpoint of epoch 0 was just written
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert full.wait() == 0, full.stderr.read()[-2000:]
    resumed = _run_cli(tmp_path, tmp_path / 'killed', '--resume', 'true')
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr[-2000:]
    # the resumed process trained only the epoch the killed one did not finish
    assert f"resuming from {checkpoint} at epoch 1" in stdout
    assert re.findall(r'^epoch (\d+):', stdout, re.M) == ['1']
    rows = [list(csv.DictReader(open(tmp_path / name / 'metrics.csv'))) for name in ('full', 'killed')]
    keys = ('epoch', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'lr')
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]


def _ddp_worker(rank: int, port: int, cfg: dict, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        model = train(cfg)['model']
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        results[rank] = digest.hexdigest()
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_end_with_identical_weights(tmp_path):
    cfg = _tiny(tmp_path, epochs=1)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(29800 + os.getpid() % 100, cfg, results), nprocs=2)
        results = dict(results)
    assert results[0] == results[1]
    assert (tmp_path / 'run' / 'metrics.csv').exists()


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ConfigError, match='num_classes=7 but the dataset has 2 classes'):
        train(_tiny(tmp_path, num_classes=7))
    with pytest.raises(ConfigError, match='dataset path .* does not exist'):
        train(_tiny(tmp_path, dataset='', data_dir=str(tmp_path / 'missing')))
    with pytest.raises(ConfigError, match='needs a CUDA device'):
        train(_tiny(tmp_path, batch_size='auto'))
    with pytest.raises(ConfigError, match='sched: wsd schedule requires 0 < decay_epochs'):  # a known name
        train(_tiny(tmp_path, sched='wsd', epochs=1))
    assert not (tmp_path / 'run').exists()
    with pytest.raises(FloatingPointError, match='(loss is (nan|inf)|diverged).*no checkpoint to resume from'):
        train(_tiny(tmp_path, opt='sgd', lr=1e12, epochs=1))
    assert main(['finetune', '--epochs_typo', '3']) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_reduced_demo_pipeline(tmp_path):
    from timm_momentum.tools.data import DigitsDataset
    from timm_momentum.tools.demo import folder_bytes

    lines = []
    report = run_demo(str(tmp_path / 'demo'), epochs_source=1, epochs_target=1, img_size=16, progress=False,
                      log=lines.append)
    # each stage: a heading and one result line
    assert [line.split(':')[0] for line in lines] == [
        '== 1/3 upstream', 'upstream resnet18', '== 2/3 conversion', 'converted to momentum_resnet18',
        '== 3/3 fine-tuning', 'fine-tuned momentum_resnet18']
    assert re.search(r'agrees with the source\'s on \d+\.\d% of 256 val digits', lines[3])
    verify = json.loads((tmp_path / 'demo' / 'converted' / 'verify.json').read_text())
    assert verify['equivalence']['passed']
    # the reported accuracy is that of the exported model on the digits 5-9 val split
    model = timm.create_model(f"local-dir:{tmp_path / 'demo' / 'finetune' / 'final'}", pretrained=True).eval()
    val = DigitsDataset('validation', [5, 6, 7, 8, 9], 16)
    with torch.no_grad():
        accuracy = 100.0 * float((model(val.images).argmax(-1) == val.targets).float().mean())
    assert report['val_acc_digits5-9'] == pytest.approx(accuracy, abs=1e-6)
    assert f'val accuracy {accuracy:.2f}% on digits 5-9' in lines[-1]
    assert report['saved_activation_bytes_momentum'] < report['saved_activation_bytes_resnet18']
    assert report['output_bytes'] == folder_bytes(tmp_path / 'demo') > report['checkpoint_bytes'] > 0


def test_demo_summary_uses_one_split_name_and_rounds(monkeypatch, capsys):
    import timm_momentum.tools.demo as demo

    monkeypatch.setattr(demo, 'run_demo', lambda *args: {
        'upstream_val_acc_digits0-4': 99.7245179063361, 'val_acc_digits5-9': 99.4475138121547,
        'saved_activation_bytes_momentum': 5.5 * 2 ** 20, 'saved_activation_bytes_resnet18': 70.5 * 2 ** 20,
        'activation_ratio': 5.5 / 70.5, 'seconds': 68.4, 'output': 'output/demo', 'output_bytes': 513_123_456,
        'checkpoint_bytes': 268_000_000})
    assert main(['demo']) == 0
    out = capsys.readouterr().out
    assert 'digits 5-9 val accuracy after fine-tuning: 99.45% (upstream resnet18 on digits 0-4: 99.72% val)' in out
    assert 'output/demo holds 513 MB (268 MB of it the last.pth.tar' in out and 'time 68 s' in out
    assert 'test' not in out and '99.447' not in out


@pytest.mark.parametrize('overrides, message', [
    (['--epochs', 'ten'], "epochs must be an integer, got 'ten'"),
    (['--lr', 'fast'], "lr must be a number, got 'fast'"),
    (['--memory_efficient', 'no way'], "memory_efficient must be true or false, got 'no way'"),
    (['--batch_size', '0'], 'batch_size must be >= 1, got 0'),
    (['--grad_accum_steps', '0'], 'grad_accum_steps must be >= 1, got 0'),
    (['--img_size', '-5'], 'img_size must be >= 1, got -5'),
    (['--opt', 'sgdd'], "opt: unknown optimizer 'sgdd'"),
    (['--sched', 'cosinus'], "sched: unknown scheduler 'cosinus'; did you mean 'cosine'?"),
    (['--gamma', '1'], 'gamma: gamma must be in [0, 1), got 1'),
    (['--classes', '[0,1'], "--classes: cannot parse '[0,1'"),
    (['--device', 'cuda'], 'device: cuda asked for, but no CUDA GPU is available'),
])
def test_config_values_are_checked_against_their_type(overrides, message, capsys):
    if overrides[1] == 'cuda' and torch.cuda.is_available():
        pytest.skip('a GPU is available')
    assert main(['finetune', *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_config_file_errors_and_conversions(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('lr: [0.1\nepochs: 3\n')
    assert main(['finetune', '--config', str(bad)]) == 2
    assert f'{bad} is not valid YAML' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('')
    assert main(['finetune', '--output', str(tmp_path / 'a_file')]) == 2
    assert 'output: ' in capsys.readouterr().err
    good = tmp_path / 'good.yaml'
    good.write_text('lr: 1e-3\nweight_decay: 5E-4\nepochs: 3.0\nmemory_efficient: no\n')
    cfg = load_config(str(good), ['--min_lr', '1e-6', '--momentum', '1'])
    assert (cfg['lr'], cfg['weight_decay'], cfg['min_lr'], cfg['momentum']) == (1e-3, 5e-4, 1e-6, 1.0)
    assert type(cfg['momentum']) is float and cfg['epochs'] == 3 and type(cfg['epochs']) is int
    assert cfg['memory_efficient'] is False
    with pytest.raises(ConfigError, match='epochs must be an integer, got 2.5'):
        train(_tiny(tmp_path, epochs=2.5))


def _image_folder(root: Path, classes_by_split: dict, per_class: int = 4) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, classes in classes_by_split.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def _folder_cfg(tmp_path: Path, root: Path, **overrides) -> dict:
    return _tiny(tmp_path, dataset='', data_dir=str(root), classes=None, batch_size=4, workers=0, epochs=1,
                 **overrides)


def test_validation_folder_takes_the_training_class_indices(tmp_path):
    from timm_momentum.tools.data import build_datasets
    from timm_momentum.tools.finetune import validate_config

    root = _image_folder(tmp_path / 'data', {'train': ['cat', 'dog', 'emu'], 'validation': ['dog', 'emu']})
    train_set, val_set, num_classes = build_datasets(validate_config(_folder_cfg(tmp_path, root)), None)
    assert num_classes == 3
    assert sorted({val_set[i][1] for i in range(len(val_set))}) == [1, 2]  # dog and emu, as in training


def test_a_validation_class_unknown_to_training_fails_before_training(tmp_path):
    root = _image_folder(tmp_path / 'data', {'train': ['cat', 'dog'], 'validation': ['cat', 'dog', 'fox']})
    with pytest.raises(ConfigError, match=r"validation split 'validation' has classes .* lacks: \['fox'\]"):
        train(_folder_cfg(tmp_path, root))
    assert not (tmp_path / 'run' / 'metrics.csv').exists()


def test_image_folder_runs_with_the_same_seed_repeat_exactly(tmp_path):
    """timm's RandomResizedCrop draws from Python's random: it is seeded per epoch like torch and numpy."""
    import random

    root = _image_folder(tmp_path / 'data', {'train': ['cat', 'dog'], 'validation': ['cat', 'dog']})
    first = train(_folder_cfg(tmp_path, root, output=str(tmp_path / 'a')))['rows']
    random.random()
    second = train(_folder_cfg(tmp_path, root, output=str(tmp_path / 'b')))['rows']
    assert [r['train_loss'] for r in first] == [r['train_loss'] for r in second]


def test_initial_checkpoint_loads_strictly_except_a_new_classifier(tmp_path):
    from safetensors.torch import save_file

    from timm_momentum.tools.finetune import load_initial_checkpoint

    resnet18 = timm.create_model('resnet18').state_dict()
    save_file(resnet18, tmp_path / 'resnet18.safetensors')
    model = timm.create_model('momentum_resnet18', num_classes=2)
    load_initial_checkpoint(model, str(tmp_path / 'resnet18.safetensors'))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in resnet18.items() if not k.startswith('fc.'))
    assert model.fc.out_features == 2
    with pytest.raises(ConfigError, match=r"missing 96 keys \['layer1\.2\.bn1\.bias'"):
        load_initial_checkpoint(timm.create_model('momentum_resnet34', num_classes=2), str(tmp_path / 'resnet18.safetensors'))
    headless = {k: v for k, v in resnet18.items() if not k.startswith('fc.')}
    save_file(headless, tmp_path / 'headless.safetensors')
    with pytest.raises(ConfigError, match=r"missing 2 keys \['fc\.bias', 'fc\.weight'\]"):
        load_initial_checkpoint(timm.create_model('momentum_resnet18'), str(tmp_path / 'headless.safetensors'))
    save_file(timm.create_model('test_vit').state_dict(), tmp_path / 'vit.safetensors')
    with pytest.raises(ConfigError, match=r'does not match MomentumResNet.*missing \d+ keys.*unexpected \d+ keys'):
        train(_tiny(tmp_path, initial_checkpoint=str(tmp_path / 'vit.safetensors')))


def test_a_diverged_model_is_neither_best_nor_a_good_checkpoint(tmp_path):
    # one SGD step of lr 1e38 per epoch: the step's loss is finite, the model it leaves computes NaN
    with pytest.raises(FloatingPointError, match='diverged in epoch 0.*no checkpoint to resume from'):
        train(_tiny(tmp_path, opt='sgd', lr=1e38, batch_size=512))
    out = tmp_path / 'run'
    assert not (out / 'best').exists() and not (out / 'last.pth.tar').exists()
    row = list(csv.DictReader(open(out / 'metrics.csv')))[0]
    assert row['val_loss'] == 'nan'


def test_exported_json_is_strict(tmp_path):
    from timm_momentum.tools.convert import write_model_folder

    model = timm.create_model('momentum_resnet18', num_classes=2)
    write_model_folder(tmp_path / 'out', model, {'num_classes': 2}, {}, {'metrics': {'val_loss': float('nan')}})

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')

    config = json.loads((tmp_path / 'out' / 'config.json').read_text(), parse_constant=refuse)
    assert config['metrics']['val_loss'] is None


def test_without_matplotlib_training_skips_the_plots_with_one_message(tmp_path, monkeypatch, capsys):
    hide_package(monkeypatch, 'matplotlib')
    train(_tiny(tmp_path, batch_size=512))
    out = tmp_path / 'run'
    assert capsys.readouterr().err.count('matplotlib is not installed') == 1  # once for two epochs
    assert not list(out.glob('*.png')) and len(list(csv.DictReader(open(out / 'metrics.csv')))) == 2


def test_without_scikit_learn_the_digits_name_the_extra(monkeypatch):
    from timm_momentum.tools.data import DigitsDataset

    hide_package(monkeypatch, 'sklearn')
    with pytest.raises(ConfigError, match=r'needs scikit-learn: pip install "timm-momentum\[train\]"'):
        DigitsDataset('train')


def test_a_local_dir_model_trains_in_the_configured_mode(tmp_path):
    """local-dir: names hide the architecture (this path holds no word "momentum"); gamma and
    memory_efficient must still reach the model."""
    from timm_momentum.tools.convert import write_model_folder

    saved = timm.create_model('momentum_resnet18', num_classes=2, gamma=0.9, memory_efficient=False)
    folder = write_model_folder(tmp_path / 'saved', saved, dict(saved.momentum_cfg), dict(saved.pretrained_cfg))
    result = train(_tiny(tmp_path, model=f'local-dir:{folder}', pretrained=True, epochs=1, gamma=0.5,
                         memory_efficient=True, plots=False, checkpoints=False))
    model = result['model']
    assert model.momentum_cfg['memory_efficient'] is True and model.momentum_cfg['gamma'] == [0.5] * 4
    assert all(stage.memory_efficient and stage.gamma == 0.5 for stage in model.stages)


def test_plots_name_the_run_have_legends_and_a_log_loss_axis():
    from timm_momentum.tools.finetune import _curves_figure

    rows = [{'epoch': e, 'train_loss': 2.0 / (e + 1) ** 3, 'val_loss': 1.5 / (e + 1) ** 2, 'train_acc': 50.0 + 10 * e,
             'val_acc': 55.0 + 9 * e} for e in range(4)]
    fig = _curves_figure(rows, 'momentum_resnet18 on sklearn/digits, output/run')
    ax_loss, ax_acc = fig.axes
    assert ax_loss.get_yscale() == 'log' and ax_acc.get_yscale() == 'linear'
    for ax in (ax_loss, ax_acc):
        assert 'momentum_resnet18 on sklearn/digits, output/run' in ax.get_title()
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train', 'val']  # as the epoch lines say
    # loss.png and accuracy.png are figures of their own, not crops of this one that caught its neighbour's labels
    for panel, ylabel in (('loss', 'loss (log scale)'), ('accuracy', 'accuracy (%)')):
        (ax,) = _curves_figure(rows, 'run', (panel,)).axes
        assert ax.get_ylabel() == ylabel and ax.get_title() == f'{panel}: run'
    # a demo's run names a long local-dir path: each title line fits over its panel instead of running off the figure
    run = f"local-dir:/tmp/{'x' * 70}/converted on sklearn/digits, /tmp/{'y' * 40}/finetune"
    for ax, panel in zip(_curves_figure(rows, run).axes, ('loss', 'accuracy')):
        lines = ax.get_title().splitlines()
        assert len(lines) > 1 and max(len(line) for line in lines) <= 60
        assert ''.join(lines).replace(' ', '') == f'{panel}: {run}'.replace(' ', '')


def test_finetune_says_what_it_will_train_before_it_starts(tmp_path, capsys):
    from timm_momentum.tools.finetune import describe_config

    first, second = describe_config(load_config()).splitlines()
    assert re.fullmatch(r'finetune momentum_resnet50 on sklearn/digits for 10 epochs, batch 64, sgd lr 0.01, gamma '
                        r"the model's own, memory_efficient True, output (output/finetune/\d{8}-\d{6}-momentum_resnet50) "
                        r'\(all keys: \1/args\.yaml\)', first), first
    assert second == 'changed from the defaults: nothing'
    out = tmp_path / 'run'
    assert main(['finetune', '--model', 'momentum_resnet18', '--classes', '[0, 1]', '--img_size', '16',
                 '--epochs', '1', '--batch_size', '512', '--progress', 'false', '--output', str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('finetune momentum_resnet18 on sklearn/digits classes [0, 1] for 1 epoch, batch 512')
    assert lines[1] == (f"changed from the defaults: model='momentum_resnet18', img_size=16, classes=[0, 1], "
                        f"batch_size=512, epochs=1, progress=False")
    assert lines[2] == 'gamma per stage: 0.9, 0.9, 0.9, 0.9'  # built from scratch: the paper's gamma
    assert lines[3].startswith('epoch 0: ')
    # the closing line sums the run up (no raw dict); its accuracy and loss are those in metrics.csv
    row = list(csv.DictReader(open(out / 'metrics.csv')))[-1]
    acc, loss = float(row['val_acc']), float(row['val_loss'])
    summary = re.fullmatch(r'trained momentum_resnet18 on sklearn/digits for 1 epoch in (\d+ s|\d+ min \d\d s): (.*)',
                           lines[-1])
    assert summary, lines[-1]
    assert summary[2] == (f"val top-1 {acc:.2f}% (best {acc:.2f}% at epoch 0), val loss {loss:.4f}; "
                          f"exported to {out / 'best'} and {out / 'final'}")
