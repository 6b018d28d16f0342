"""timm-momentum bench at tiny sizes: schema, table, plot, gradient errors, compiled rows, targets, bad input.
No timing asserts."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import timm_momentum.tools.bench as bench
from timm_momentum.tools.bench import CONFIGS, check_targets, format_table, plot_results, run_benchmark
from timm_momentum.tools.cli import main

from conftest import hide_package


@pytest.fixture(scope='module')
def results():
    return run_benchmark(['momentum_resnet50'], batch_size=2, img_size=32, time_batch_size=2, warmup=1, steps=1,
                         measure_peak=False)  # peaks: one fresh subprocess each, exercised by the gpu_check test


def test_every_configuration_is_measured(results):
    rows = results['rows']
    assert [r['config'] for r in rows] == [c.label for c in CONFIGS]
    for row in rows:
        assert 'failed' not in row
        assert row['saved_bytes'] > 0 and row['step_seconds'] > 0 and row['param_bytes'] > 0
        assert row['page_faults'] >= 0  # on CPU each row counts the pages its timed steps mapped anew
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


def test_small_run_judges_no_size_bound_target(results):
    assert results['targets'] == []  # one depth at 32²: nothing here was set for this size
    not_judged = '\n'.join(results['targets_not_judged'])
    assert 'set for batch 16, 224²' not in not_judged  # peaks were not measured, and it says that instead
    assert 'peaks were not measured' in not_judged
    assert 'step-time targets: set for cpu fp32, batch 4, 224² (this run: cpu fp32, batch 2, 32²)' in not_judged
    table = format_table(results)
    assert '[PASS]' not in table and '[MISS]' not in table and '[not judged] step-time targets' in table


def test_table_and_plot(results, tmp_path):
    table = format_table(results)
    assert table.splitlines()[0].startswith('bench r50, cpu fp32, peak at batch 2, time at batch 2, 32²')
    assert 'momentum memory-efficient' in table and 'peak MiB' in table and ' faults' in table.splitlines()[1]
    plot = tmp_path / 'bench.png'
    plot_results(results, str(plot))
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _rows(sizes_ok: bool = True):
    rows = []
    for depth, (plain, ckpt, eff, saved, t_ckpt, t_eff, t_mom) in {
            50: (1373, 600, 680, 11.3, 1.5, 1.6, 1.1), 101: (1999, 807, 753, 11.3, 1.3, 1.44, 1.16),
            152: (2771, 1000, 813, 11.6, 1.2, 1.22, 1.04)}.items():
        params = {50: 98, 101: 170, 152: 230}[depth]
        rows += [
            {'depth': depth, 'config': 'resnet', 'peak_bytes': plain, 'time_ratio': 1.0, 'step_seconds': 1.0,
             'saved_bytes': 1, 'param_bytes': params},
            {'depth': depth, 'config': 'resnet+checkpointing', 'peak_bytes': ckpt, 'time_ratio': t_ckpt,
             'step_seconds': t_ckpt, 'saved_bytes': 1, 'param_bytes': params},
            {'depth': depth, 'config': 'momentum', 'peak_bytes': 2 * plain, 'time_ratio': t_mom,
             'step_seconds': t_mom, 'saved_bytes': 1, 'param_bytes': params},
            {'depth': depth, 'config': 'momentum memory-efficient', 'peak_bytes': eff, 'time_ratio': t_eff,
             'step_seconds': t_eff, 'saved_bytes': saved, 'param_bytes': params}]
    return rows


def _args(**changes):
    return dict(dict(models=[], batch_size=16, img_size=224, device='cpu', amp=None, time_batch_size=4, steps=3,
                     measure_peak=True), **changes)


def test_targets_at_their_sizes_report_margins():
    targets, not_judged = check_targets(_rows(), _args())
    targets = {t['target'].split(' (')[0]: t for t in targets}
    assert not_judged == []
    assert targets['peak memory momentum_resnet101 memory-efficient / resnet101']['pass']
    assert not targets['peak memory depth 50: memory-efficient / timm checkpointing']['pass']
    # 152: 813 - 230 = 583, 50: 680 - 98 = 582: flat once parameter gradients are set apart
    assert targets['peak memory less parameter gradients, depth 152 / depth 50, memory-efficient']['pass']
    assert targets['bytes saved for backward depth 152 / depth 50, memory-efficient']['pass']
    step = targets['step time depth 101: memory-efficient / timm checkpointing']
    assert not step['pass'] and step['value'] == pytest.approx(1.44 / 1.3)
    assert targets['step time depth 152: memory-efficient / timm checkpointing']['pass']
    assert not targets['step time depth 101: momentum standard / resnet']['pass']
    assert targets['step time depth 152: momentum standard / resnet']['margin'] == pytest.approx(0.01)
    assert not any('depth 50' in name and 'step time' in name for name in targets)  # set for 101 and 152 only


@pytest.mark.parametrize('changes, judged, why', [
    (dict(batch_size=2, img_size=64), ['bytes saved'], ['peak memory targets: set for batch 16, 224² (this run: '
                                                        'batch 2, 64²)', 'step-time targets: set for cpu fp32']),
    (dict(time_batch_size=8), ['peak memory', 'bytes saved'], ['step-time targets: set for cpu fp32, batch 4']),
    (dict(amp='bf16'), ['peak memory', 'bytes saved'], ['step-time targets: set for cpu fp32, batch 4, 224² '
                                                        '(this run: cpu bf16']),
])
def test_targets_are_judged_only_at_the_sizes_they_were_set_for(changes, judged, why):
    targets, not_judged = check_targets(_rows(), _args(**changes))
    assert targets and all(t['target'].startswith(tuple(judged)) for t in targets)
    for line in why:
        assert any(n.startswith(line) for n in not_judged), not_judged


def test_failed_rows_are_left_out_of_targets():
    rows = [r if r['config'] != 'momentum memory-efficient' or r['depth'] != 101 else
            {'depth': 101, 'config': r['config'], 'failed': 'compile: boom'} for r in _rows()]
    names = [t['target'] for t in check_targets(rows, _args())[0]]
    assert not any('101' in n and 'memory-efficient' in n for n in names)
    assert 'step time depth 101: momentum standard / resnet (<= 1.05)' in names


@pytest.fixture
def two_configs(monkeypatch):
    """Only plain resnet and momentum standard beside the compiled rows, to keep subprocesses few."""
    monkeypatch.setattr(bench, 'CONFIGS', tuple(c for c in CONFIGS if c.label in ('resnet', 'momentum')))


def test_compiled_rows_are_measured_like_the_rest(two_configs):
    # aot_eager: the bench's compiled path without inductor's code generation, which takes minutes on CPU
    results = run_benchmark(['momentum_resnet18'], batch_size=2, img_size=32, time_batch_size=2, warmup=1,
                            steps=2, compiled=['standard', 'memory-efficient'], compile_backend='aot_eager')
    by = {r['config']: r for r in results['rows']}
    standard = by['momentum, compiled']
    assert 'failed' not in standard, standard
    assert standard['compiled'] == 'aot_eager' and standard['warmup_steps'] >= 2 and standard['compilations'] >= 1
    assert standard['graph_breaks'] >= 0 and standard['grad_reference'] == 'momentum'
    assert standard['grad_rel_error'] <= 1e-5
    assert standard['peak_bytes'] > 0 and standard['saved_bytes'] > 0 and standard['step_seconds'] > 0
    assert by['momentum']['peak_bytes'] > 0  # eager rows: the step after a warm-up too, in their subprocess
    # the compiled row's peak came from peak_step_memory(..., compile_backend='aot_eager') in a fresh subprocess
    # aot_eager needs no C compiler: the memory-efficient row must compile here too, not fail or run eager
    efficient = by['momentum memory-efficient, compiled']
    assert 'failed' not in efficient, efficient
    assert efficient['compiled'] == 'aot_eager' and efficient['warmup_steps'] >= 2 and efficient['compilations'] >= 1
    assert efficient['grad_reference'] == 'momentum' and efficient['grad_rel_error'] <= 1e-5
    assert 'aot_eager, warmed up' in format_table(results)


def test_a_failing_configuration_is_a_row_not_a_crash(two_configs, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise NotImplementedError('checkpoint not implemented for context_fn\nlong traceback text')

    monkeypatch.setattr(bench, 'warm_up_compiled', broken)
    results = run_benchmark(['momentum_resnet18'], batch_size=2, img_size=32, time_batch_size=2, warmup=1, steps=1,
                            measure_peak=False, compiled=['standard'])
    failed = results['rows'][-1]
    assert failed['config'] == 'momentum, compiled'
    assert failed['failed'] == 'compile: NotImplementedError: checkpoint not implemented for context_fn'
    assert [r['config'] for r in results['rows'][:-1]] == ['resnet', 'momentum']
    assert 'failed: compile: NotImplementedError: checkpoint not implemented' in format_table(results)
    plot_results(results, str(tmp_path / 'bench.png'))  # failed rows are left out of the figure


def test_one_process_timing_steps_every_configuration_here(two_configs, monkeypatch):
    def apart(*args, **kwargs):
        raise AssertionError('timed in processes of their own')

    monkeypatch.setattr(bench, 'time_steps_apart', apart)
    results = run_benchmark(['momentum_resnet18'], batch_size=2, img_size=32, time_batch_size=2, warmup=0, steps=1,
                            measure_peak=False, timing_processes=False)
    assert results['command_args']['timing'] == 'one process'
    assert all('failed' not in r and r['step_seconds'] > 0 for r in results['rows'])
    assert '(1 steps x 1 repeats, one process)' in format_table(results).splitlines()[0]


def test_repeats_report_each_ratio_and_their_range(tmp_path):
    results = run_benchmark(['momentum_resnet18'], batch_size=2, img_size=32, time_batch_size=2, warmup=1, steps=1,
                            measure_peak=False, repeats=3, arms=['checkpointing', 'standard', 'memory-efficient'])
    results = json.loads(json.dumps(results))  # what --out writes
    assert results['command_args']['repeats'] == 3
    rows = {r['config']: r for r in results['rows']}
    assert list(rows) == ['resnet', 'resnet+checkpointing', 'momentum', 'momentum memory-efficient']
    plain = rows['resnet']['repeat_step_seconds']
    assert rows['resnet']['time_ratios'] == [1.0] * 3
    for row in rows.values():
        ratios = row['time_ratios']
        assert len(ratios) == len(row['repeat_step_seconds']) == 3
        assert ratios == pytest.approx([mine / theirs for mine, theirs in zip(row['repeat_step_seconds'], plain)])
        assert row['time_ratio'] == sorted(ratios)[1]  # the median of 3
        assert (row['time_ratio_min'], row['time_ratio_max']) == (min(ratios), max(ratios))
        assert row['step_seconds'] == sorted(row['repeat_step_seconds'])[1]
    assert results['command_args']['timing'] == 'fresh processes per configuration and repeat'  # on CPU, by default
    first_line = format_table(results).splitlines()[0]
    assert '(1 steps x 3 repeats, fresh processes per configuration and repeat)' in first_line
    plot_results(results, str(tmp_path / 'bench.png'))


def test_step_time_targets_carry_the_range_over_repeats():
    rows = [dict(r, time_ratios=[r['time_ratio'] * f for f in (0.98, 1.0, 1.03)]) if r['config'] == 'momentum'
            else dict(r, time_ratios=[r['time_ratio']] * 3) for r in _rows()]
    targets = {t['target'].split(' (')[0]: t for t in check_targets(rows, _args(repeats=3))[0]}
    standard = targets['step time depth 152: momentum standard / resnet']
    assert standard['value'] == pytest.approx(1.04) and standard['spread'] == pytest.approx([1.04 * 0.98, 1.04 * 1.03])
    assert targets['step time depth 101: memory-efficient / timm checkpointing']['spread'] == \
        pytest.approx([1.44 / 1.3] * 2)
    assert 'spread' not in targets['peak memory momentum_resnet101 memory-efficient / resnet101']


@pytest.mark.parametrize('kwargs, message', [
    (dict(arms=['fast']), "unknown arm 'fast'"),
    (dict(repeats=0), 'steps and repeats must be at least 1'),
    (dict(steps=0), 'steps and repeats must be at least 1'),
])
def test_bad_timing_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_benchmark(['momentum_resnet18'], **kwargs)


@pytest.mark.parametrize('argv, message', [
    (['--models', 'resnet_nope'], 'unknown model'),
    (['--models', ','], 'no models given'),
    (['--compile', 'fastest'], "unknown compiled configuration 'fastest'"),
    (['--models', 'momentum_resnet50', '--max-batch-models', 'momentum_resnet101'], 'max_batch_models must be'),
    (['--amp', 'fp8'], 'invalid choice'),
    (['--device', 'tpu'], 'invalid choice'),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    if 'invalid' in message:
        with pytest.raises(SystemExit) as exit_info:
            main(['bench'] + argv)
        assert exit_info.value.code == 2
    else:
        assert main(['bench'] + argv) == 2
    assert message in capsys.readouterr().err


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(['bench', '--help'])
    text = capsys.readouterr().out
    for option in ('--compile', '--compile-backend', '--no-peak', '--max-batch-models', '--max-batch-limit'):
        assert option in text
    assert '(default: 4)' in text  # --time-batch-size shows its default


def test_cuda_request_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(ValueError, match='cuda'):
        run_benchmark(['momentum_resnet50'], device='cuda')


def test_gpu_check_script_runs_its_cpu_form(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('the CPU form runs only without CUDA')
    script = Path(__file__).parent.parent / 'benchmarks' / 'gpu_check.sh'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # the script sets it to its own tree
    proc = subprocess.run(['bash', str(script)], capture_output=True, text=True,
                          env={**env, 'OUT': str(tmp_path), 'PYTHON': __import__('sys').executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / 'gpu_bench.json').read_text())['rows']
    assert rows and all(row['peak_bytes'] > 0 for row in rows)
    summary = (tmp_path / 'gpu_summary.txt').read_text()
    assert 'reduced CPU form' in summary and 'bench: exit 0' in summary and 'tests: exit 0' in summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in tmp_path.iterdir())  # what the device tool brings back


def test_readme_links_stay_inside_the_repository():
    import re
    root = Path(__file__).parent.parent
    links = re.findall(r'\]\(([^)#]+)\)', (root / 'README.md').read_text())
    local = [link for link in links if not link.startswith(('http://', 'https://'))]
    assert 'benchmarks/MEASURE.md' in local
    for link in local:
        assert not link.startswith(('..', '/')), link
        assert (root / link).is_file(), link


def test_plot_without_matplotlib_is_one_clear_message_before_measuring(tmp_path, monkeypatch, capsys):
    hide_package(monkeypatch, 'matplotlib')
    monkeypatch.setattr(bench, 'run_benchmark', lambda *a, **k: pytest.fail('measured although it cannot plot'))
    assert main(['bench', '--models', 'momentum_resnet18', '--plot', str(tmp_path / 'r.png')]) == 2
    err = capsys.readouterr().err
    assert 'error: --plot needs matplotlib' in err and 'timm-momentum[train]' in err and 'Traceback' not in err
    assert not (tmp_path / 'r.png').exists()


def test_a_family_model_is_refused_by_bench_with_the_reason():
    from timm_momentum.tools.bench import run_benchmark

    with pytest.raises(ValueError, match="'momentum_resnet50d': bench takes the plain-depth drop-in models"):
        run_benchmark(['momentum_resnet50d'])


def test_vit_rows_are_judged_by_model_against_timms_vit():
    """A ViT's rows are keyed by model, not depth (ViT-S and ViT-B are both 12 blocks deep): peak below
    checkpointing at every size, <= 0.5x plain at ViT-B/384, step time <= 1.05x checkpointing on cpu fp32."""
    def rows(model, plain, ckpt, eff, t_ckpt, t_eff):
        base = {'model': model, 'family': 'vit', 'depth': 12, 'saved_bytes': 1, 'param_bytes': 1, 'compiled': None,
                'step_seconds': 1.0, 'time_ratio_min': 1.0, 'time_ratio_max': 1.0}
        return [dict(base, config='resnet', peak_bytes=plain, time_ratio=1.0, time_ratios=[1.0]),
                dict(base, config='resnet+checkpointing', peak_bytes=ckpt, time_ratio=t_ckpt, time_ratios=[t_ckpt]),
                dict(base, config='momentum memory-efficient', peak_bytes=eff, time_ratio=t_eff, time_ratios=[t_eff])]

    args = dict(models=['momentum_vit_small_patch16_224', 'momentum_vit_base_patch16_224'], batch_size=16,
                img_size=384, device='cpu', amp=None, time_batch_size=4, measure_peak=True)
    judged, _ = check_targets(rows('momentum_vit_small_patch16_224', 100, 30, 20, 1.2, 1.3)
                              + rows('momentum_vit_base_patch16_224', 100, 30, 40, 1.2, 1.25), args)
    targets = {t['target'].rsplit(' (', 1)[0]: t for t in judged}
    assert targets['peak memory vit_small_patch16_224 at 384²: memory-efficient / timm checkpointing']['pass']
    assert not targets['peak memory vit_base_patch16_224 at 384²: memory-efficient / timm checkpointing']['pass']
    assert targets['peak memory vit_base_patch16_224 at 384²: memory-efficient / plain']['value'] == 0.4
    assert 'peak memory vit_small_patch16_224 at 384²: memory-efficient / plain' not in targets  # ViT-B's alone
    assert not targets['step time vit_small_patch16_224 at 384²: memory-efficient / timm checkpointing']['pass']
    assert targets['step time vit_base_patch16_224 at 384²: memory-efficient / timm checkpointing']['value'] == \
        pytest.approx(1.25 / 1.2)
    assert not any('depth' in t['target'] for t in judged)  # no ResNet rows, no ResNet targets
