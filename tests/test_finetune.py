"""Fine-tuning on CPU at tiny sizes: configs, outputs, exact resume after SIGKILL, DDP, bad input, demo."""
import csv
import hashlib
import os
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

from timm_momentum.cli import main
from timm_momentum.finetune import ConfigError, DEFAULTS, load_config, run_demo, train

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
    result = train(_tiny(tmp_path, model_ema=True, grad_accum_steps=2))
    out = result['output']
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'train_loss', 'val_acc', 'images_per_s', 'peak_memory_mib'} <= set(rows[0])
    assert yaml.safe_load((out / 'args.yaml').read_text())['memory_efficient'] is True
    for name in ('loss.png', 'accuracy.png', 'last.pth.tar'):
        assert (out / name).stat().st_size > 0
    state = torch.load(out / 'last.pth.tar', weights_only=False)
    assert {'model', 'optimizer', 'scheduler', 'scaler', 'ema', 'epoch'} <= set(state) and state['epoch'] == 1
    for folder in ('best', 'final'):
        model = timm.create_model(f'local-dir:{out / folder}', pretrained=True)
        assert model.num_classes == 2 and model.momentum_cfg['gamma'] == 0.9


def _run_cli(tmp_path: Path, output: Path, *extra: str) -> subprocess.Popen:
    args = ['--model', 'momentum_resnet18', '--classes', '[0,1]', '--img_size', '16', '--batch_size', '32',
            '--epochs', '2', '--opt', 'sgd', '--lr', '0.05', '--progress', 'false', '--output', str(output), *extra]
    return subprocess.Popen([sys.executable, '-m', 'timm_momentum.finetune', *args],
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
    assert resumed.wait() == 0, resumed.stderr.read()[-2000:]
    rows = [list(csv.DictReader(open(tmp_path / name / 'metrics.csv'))) for name in ('full', 'killed')]
    keys = ('epoch', 'train_loss', 'train_acc', 'val_loss', 'val_acc')
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
    with pytest.raises(FloatingPointError, match='loss is (nan|inf).*last good checkpoint'):
        train(_tiny(tmp_path, opt='sgd', lr=1e12, epochs=1))
    assert main(['finetune', '--epochs_typo', '3']) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_reduced_demo_pipeline(tmp_path):
    report = run_demo(str(tmp_path / 'demo'), epochs_source=1, epochs_target=1, img_size=16)
    assert (tmp_path / 'demo' / 'converted' / 'verify.json').exists()
    assert (tmp_path / 'demo' / 'finetune' / 'final' / 'model.safetensors').exists()
    assert 0 <= report['test_acc_digits5-9'] <= 100
    assert report['saved_activation_bytes_momentum'] < report['saved_activation_bytes_resnet18']
