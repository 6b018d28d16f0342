"""timm-momentum bench at tiny sizes: schema, table, plot, gradient errors, bad input. No timing asserts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from timm_momentum.bench import CONFIGS, format_table, plot_results, run_benchmark
from timm_momentum.cli import main


@pytest.fixture(scope='module')
def results():
    return run_benchmark(['momentum_resnet50'], batch_size=2, img_size=32, time_batch_size=2, warmup=1, steps=1,
                         measure_peak=False)  # peaks: one fresh subprocess each, exercised by the gpu_check test


def test_every_configuration_is_measured(results):
    rows = results['rows']
    assert [r['config'] for r in rows] == [c[0] for c in CONFIGS]
    for row in rows:
        assert row['saved_bytes'] > 0 and row['step_seconds'] > 0
    by = {r['config']: r for r in rows}
    assert by['resnet']['time_ratio'] == 1.0
    assert by['momentum memory-efficient']['saved_bytes'] < 0.2 * by['momentum']['saved_bytes']
    assert by['momentum memory-efficient']['grad_rel_error'] <= 1e-5
    assert by['momentum memory-efficient']['grad_reference'] == 'momentum'
    stored = by['momentum memory-efficient, transitions stored']
    assert stored['grad_rel_error'] <= 1e-5 and stored['saved_bytes'] > by['momentum memory-efficient']['saved_bytes']
    assert by['resnet+checkpointing']['grad_rel_error'] <= 1e-5
    assert results['environment']['torch'] and results['environment']['timm']
    json.dumps(results)


def test_table_and_plot(results, tmp_path):
    table = format_table(results)
    assert 'momentum memory-efficient' in table and 'peak MiB' in table
    plot = tmp_path / 'bench.png'
    plot_results(results, str(plot))
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_targets_report_margins():
    from timm_momentum.bench import check_targets
    rows = []
    for depth, (plain, ckpt, eff, saved) in {50: (1373, 600, 680, 11.3), 101: (1999, 807, 753, 11.3),
                                             152: (2771, 1000, 813, 11.6)}.items():
        rows += [{'depth': depth, 'config': 'resnet', 'peak_bytes': plain, 'time_ratio': 1.0, 'saved_bytes': 1},
                 {'depth': depth, 'config': 'resnet+checkpointing', 'peak_bytes': ckpt, 'time_ratio': 1.3,
                  'saved_bytes': 1},
                 {'depth': depth, 'config': 'momentum memory-efficient', 'peak_bytes': eff, 'time_ratio': 1.5,
                  'saved_bytes': saved}]
    targets = {t['target'].split(' (')[0]: t for t in check_targets(rows, 'cpu')}
    assert targets['peak memory momentum_resnet101 / resnet101']['pass']
    assert not targets['step time momentum_resnet101 memory-efficient / resnet101']['pass']
    assert targets['step time momentum_resnet101 memory-efficient / resnet101']['margin'] == pytest.approx(-0.15)
    assert not targets['peak memory depth 50: memory-efficient / timm checkpointing']['pass']
    assert not targets['peak memory growth depth 50 -> 152, memory-efficient']['pass']
    assert targets['bytes saved for backward depth 152 / depth 50, memory-efficient']['pass']


@pytest.mark.parametrize('argv, message', [
    (['--models', 'resnet_nope'], 'unknown model'),
    (['--amp', 'fp8'], 'invalid choice'),
    (['--device', 'tpu'], 'invalid choice'),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) if 'invalid' in message else _no_raise():
        code = main(['bench'] + argv)
        assert code == 2
    assert message in capsys.readouterr().err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cuda_request_without_cuda_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(ValueError, match='cuda'):
        run_benchmark(['momentum_resnet50'], device='cuda')


def test_gpu_check_script_runs_its_cpu_form(tmp_path):
    script = Path(__file__).parent.parent / 'benchmarks' / 'gpu_check.sh'
    import torch
    if torch.cuda.is_available():
        pytest.skip('the CPU form runs only without CUDA')
    proc = subprocess.run(['bash', str(script)], capture_output=True, text=True, env={**__import__('os').environ, 'OUT': str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / 'cpu_smoke.json').read_text())['rows']
    assert rows and all(row['peak_bytes'] > 0 for row in rows)
