"""timm-momentum study: the plain-vs-momentum comparison, and the digits features it needs."""
import csv
import json
import sys

import numpy as np
import pytest
import torch
import yaml

from timm_momentum.tools.convert import strict_json
from timm_momentum.tools.data import DigitsDataset
from timm_momentum.tools.errors import ConfigError
from timm_momentum.tools.finetune import DEFAULTS, validate_config


def test_digits_few_shot_draws_per_class_by_seed_and_leaves_the_test_split_whole():
    full = DigitsDataset('train', [5, 6, 7], 8)
    few = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=1)
    again = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=1)
    other = DigitsDataset('train', [5, 6, 7], 8, per_class=4, seed=2)
    assert np.bincount(few.targets.numpy()).tolist() == [4, 4, 4]
    assert (few.images == again.images).all()
    assert not (few.images == other.images).all()
    # every drawn image is a training image
    assert all(bool((full.images == image).all(dim=(1, 2, 3)).any()) for image in few.images)
    test = DigitsDataset('validation', [5, 6, 7], 8, per_class=4, seed=1)
    assert len(test) == len(DigitsDataset('validation', [5, 6, 7], 8))
    with pytest.raises(ConfigError, match='train_per_class=1000, but digit 5 has only'):
        DigitsDataset('train', [5, 6, 7], 8, per_class=1000)


def test_train_per_class_is_checked():
    with pytest.raises(ConfigError, match='train_per_class must be >= 1, got 0'):
        validate_config(dict(DEFAULTS, train_per_class=0))
    with pytest.raises(ConfigError, match='train_per_class is supported for sklearn/digits and torch/fashion_mnist only'):
        validate_config(dict(DEFAULTS, dataset='folder', data_dir='/tmp', train_per_class=5))


def test_grad_checkpointing_key_turns_on_timm_checkpointing(tmp_path):
    from timm_momentum.tools.finetune import train

    result = train(dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16,
                        epochs=1, batch_size=32, progress=False, device='cpu', grad_checkpointing=True,
                        output=str(tmp_path / 'run')))
    assert result['model'].grad_checkpointing


def test_plots_and_checkpoints_can_be_turned_off(tmp_path):
    from timm_momentum.tools.finetune import train

    train(dict(DEFAULTS, model='resnet18', dataset='sklearn/digits', classes=[0, 1], img_size=16, epochs=2,
               batch_size=32, progress=False, device='cpu', plots=False, checkpoints=False,
               output=str(tmp_path / 'run')))
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['args.yaml', 'final', 'metrics.csv']
    with pytest.raises(ConfigError, match='resume needs checkpoints: true'):
        validate_config(dict(DEFAULTS, resume=True, checkpoints=False))


def _need_fashion_mnist():
    import os

    from timm_momentum.tools.data import FASHION_MNIST_DIR

    if not (FASHION_MNIST_DIR / 't10k-labels-idx1-ubyte.gz').is_file():
        if os.environ.get('TIMM_MOMENTUM_REQUIRE_FASHION_MNIST'):
            pytest.fail(f'Fashion-MNIST is required here and missing from {FASHION_MNIST_DIR}')
        pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')


def _csv_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('task', ['digits', 'fashion-mnist'])
def test_quick_study_reports_exactly_what_its_runs_wrote(task, tmp_path, monkeypatch):
    from timm_momentum.tools.study import REGIMES, run_study, study_arms

    if task == 'fashion-mnist':
        _need_fashion_mnist()

    # two threads on a busy 2-core machine run many times slower than one
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        study = run_study(str(tmp_path / 'study'), quick=True, log=lambda message: None, task=task)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / 'study'
    assert json.loads((out / 'study.json').read_text()) == json.loads(strict_json(study))
    assert (out / 'study.png').stat().st_size > 0
    arms = study_arms(('resnet18',), task)
    by_key = {arm.key: arm for arm in arms}
    # every arm the issue names, on either task
    assert {(arm.kind, arm.gamma) for arm in arms} >= {('plain', None), ('checkpointed', None), ('momentum', 'auto'),
                                                       ('momentum', 0.9), ('healed', 0.9), ('scratch', 0.9)}
    assert sorted((r['arm_key'], r['regime'], r['seed']) for r in study['records']) == \
        sorted((arm.key, regime, 0) for arm in arms for regime in REGIMES)
    before = {row['start']: float(row['accuracy']) for row in _csv_rows(out / 'before.csv')}
    memory = {(row['model'], row['mode']): int(row['peak_bytes']) for row in _csv_rows(out / 'memory.csv')}
    for record in study['records']:
        rows = _csv_rows(out / record['metrics_csv'])
        accuracies = [float(row['val_acc']) for row in rows]
        assert record['test_acc'] == accuracies[-1]  # the last epoch, not the best
        assert record['best_epoch'] == int(rows[accuracies.index(max(accuracies))]['epoch'])
        assert record['epochs'] == len(rows) == 1
        speeds = [float(row['images_per_s']) for row in rows]
        assert record['images_per_s'] == pytest.approx(sum(speeds) / len(speeds), rel=1e-12)
        trained = record['train_images'] - record['train_images'] % 64 if record['regime'] == 'full' else 25
        assert record['seconds_per_epoch'] == pytest.approx(trained / speeds[0], rel=1e-12)
        mode = {'plain': 'plain', 'checkpointed': 'checkpoint'}.get(record['kind'], 'memory_efficient')
        assert record['peak_step_mib'] == memory[(record['model'], mode)] / 2 ** 20
        start = by_key[record['arm_key']].start
        assert record['acc_before'] == (before[start] if start else None)
        if record['kind'] in ('momentum', 'healed', 'scratch'):
            assert len(record['gamma_per_stage']) == 4
            if record['gamma'] == 0.9:
                assert record['gamma_per_stage'] == [0.9] * 4
        args = yaml.safe_load((out / record['metrics_csv']).with_name('args.yaml').read_text())
        assert args['train_per_class'] == (5 if record['regime'] == 'few-shot' else None)
        assert args['grad_checkpointing'] == (record['kind'] == 'checkpointed')
        assert args['memory_efficient'] or record['kind'] in ('plain', 'checkpointed')
    # the plain arms start from the upstream: its accuracy before fine-tuning is the upstream run's last epoch
    upstream = _csv_rows(out / 'upstream' / 'resnet18' / 'metrics.csv')
    assert before['resnet18'] == pytest.approx(float(upstream[-1]['val_acc']), abs=1e-9)
    # the healed arm starts from the gamma 0.9 conversion, healed by finetune's distillation mode, whose own
    # record says so; healing moved it toward the source
    healed = 'momentum_resnet18-gamma0.9-healed'
    heal_rows = _csv_rows(out / 'heal' / healed / 'metrics.csv')
    assert len(heal_rows) == 1 and 'val_kl' in heal_rows[0]
    assert json.loads((out / 'heal' / healed / 'final' / 'verify.json').read_text())['healing']['method'] == 'distillation'
    agreement = {row['start']: row['agreement_with_source'] for row in _csv_rows(out / 'before.csv')}
    assert float(agreement[healed]) == pytest.approx(float(heal_rows[0]['val_agreement']), abs=1e-9)
    if task == 'fashion-mnist':
        assert study['settings']['train_limit'] == 320 and study['train_images']['full'] == 320
    assert {row['arm_key'] for row in study['comparisons']} == {arm.key for arm in arms if arm.kind != 'plain'}
    assert len(study['summary']) == len(arms) * len(REGIMES)
    for row in study['summary']:
        group = [r for r in study['records'] if (r['arm_key'], r['regime']) == (row['arm_key'], row['regime'])]
        assert row['test_acc_mean'] == group[0]['test_acc'] and row['test_acc_std'] is None
        if row['kind'] == 'plain':
            assert row['peak_ratio_vs_plain'] == row['time_ratio_vs_plain'] == 1.0
    table = (out / 'study.md').read_text()
    assert 'last epoch' in table
    for row in study['summary']:
        assert f"| {row['arm']} | {row['regime']} | 1 | {row['test_acc_mean']:.2f} |" in table


def test_summary_mean_std_and_ratios_against_plain():
    from timm_momentum.tools.study import summarize

    def record(key, kind, seed, acc, mib, seconds):
        return dict(arm=key, arm_key=key, depth='resnet18', kind=kind, regime='full', seed=seed, test_acc=acc,
                    best_epoch=2, acc_before=None, peak_step_mib=mib, seconds_per_epoch=seconds)

    summary = summarize([record('resnet18-plain', 'plain', 0, 98.0, 100.0, 2.0),
                         record('resnet18-plain', 'plain', 1, 99.0, 100.0, 4.0),
                         record('m', 'momentum', 0, 96.0, 40.0, 4.5), record('m', 'momentum', 1, 97.0, 40.0, 4.5)])
    momentum = summary[1]
    assert (momentum['test_acc_mean'], momentum['test_acc_std']) == (96.5, pytest.approx(0.5 ** 0.5))
    assert (momentum['peak_ratio_vs_plain'], momentum['time_ratio_vs_plain']) == (0.4, 1.5)


def test_no_matplotlib_skips_the_png(tmp_path, monkeypatch):
    from timm_momentum.tools.study import plot_study

    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert plot_study({'summary': []}, tmp_path / 'study.png') is False
    assert not (tmp_path / 'study.png').exists()


@pytest.mark.parametrize('args, message', [
    (['--seeds', '0'], 'error: --seeds must be >= 1, got 0'),
    (['--seeds', '-2'], 'error: --seeds must be >= 1, got -2'),
])
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, capsys):
    from timm_momentum.tools.cli import main

    assert main(['study', '--out', str(tmp_path / 'study')] + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'study').exists()


def test_an_output_path_that_is_a_file_exits_2(tmp_path, capsys):
    from timm_momentum.tools.cli import main

    (tmp_path / 'taken').write_text('keep me')
    assert main(['study', '--quick', '--out', str(tmp_path / 'taken')]) == 2
    assert 'exists and is not a folder' in capsys.readouterr().err
    assert (tmp_path / 'taken').read_text() == 'keep me'
