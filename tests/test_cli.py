"""The timm-momentum command line: ``timm_momentum_cli``, which imports only the standard library, and the
installed console script."""
import argparse
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

import timm_momentum_cli
from timm_momentum.tools.example import compare_saved_activations
from timm_momentum_cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


SUBCOMMANDS = list(_subcommands(build_parser()))


def _console_script() -> str:
    """The installed ``timm-momentum``: the one beside this interpreter (its virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / 'timm-momentum'
    found = str(beside) if beside.exists() else shutil.which('timm-momentum')
    assert found, 'the timm-momentum console script is not installed: pip install -e .'
    return found


def _imported(importtime_log: str) -> Set[str]:
    """The top-level packages of every module that ``python -X importtime`` logged in ``importtime_log``."""
    return {line.rpartition('|')[2].strip().split('.')[0]
            for line in importtime_log.splitlines() if line.startswith('import time:')}


def test_example_reports_less_stored_activation(capsys):
    assert main(['example', '--depths', '50', '--img-size', '32']) == 0
    out = capsys.readouterr().out
    assert 'resnet50' in out and 'bytes saved for backward' in out
    row = compare_saved_activations('50', batch_size=2, img_size=32)['resnet50']
    assert row['momentum_memory_efficient'] < row['plain']


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert 'usage: timm-momentum' in capsys.readouterr().out


def test_every_option_of_every_subcommand_has_help_and_shows_its_default():
    subcommands = _subcommands(build_parser())
    assert list(subcommands) == ['finetune', 'demo', 'example', 'convert', 'bench', 'study', 'models']
    for name, subcommand in subcommands.items():
        formatter = subcommand._get_formatter()
        for action in subcommand._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip() and '\n' not in action.help, (name, action.dest)
            if action.option_strings and not action.required:  # a required option has no default to show
                assert 'default' in formatter._get_help_string(action), (name, action.dest)
        assert 'default' in subcommand.format_help(), name


@pytest.mark.parametrize('command', [[]] + [[name] for name in SUBCOMMANDS],
                         ids=['timm-momentum'] + SUBCOMMANDS)
def test_the_installed_script_shows_help_without_importing_torch_or_timm(command: List[str]):
    done = subprocess.run([_console_script(), *command, '--help'], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPROFILEIMPORTTIME='1'))
    assert done.returncode == 0, '\n'.join(line for line in done.stderr.splitlines()
                                           if not line.startswith('import time:'))[-2000:]
    assert done.stdout.startswith(' '.join(['usage: timm-momentum', *command, '[-h]'])), done.stdout
    imported = _imported(done.stderr)
    assert 'timm_momentum_cli' in imported, 'the script does not run timm_momentum_cli'
    heavy = sorted(imported & {'torch', 'timm', 'timm_momentum'})
    # a script installed before timm_momentum_cli existed runs timm_momentum.tools.cli: pip install -e . again
    assert not heavy, f'{_console_script()} --help imported {heavy}'


def test_the_installed_script_runs_a_command():
    done = subprocess.run([_console_script(), 'example', '--depths', '18', '--img-size', '32'],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == 'bytes saved for backward, batch 2, 32x32:'
    name, plain, momentum, ratio = lines[2].split()
    assert name == 'resnet18' and float(momentum) < float(plain) and 0 < float(ratio) < 1, done.stdout


@pytest.mark.parametrize('name', SUBCOMMANDS)
def test_each_subcommand_runs_its_tool(name: str, monkeypatch, capsys):
    tool = importlib.import_module(f'timm_momentum.tools.{name}')
    seen = []
    monkeypatch.setattr(tool, 'run_cli', lambda args: seen.append(args) or 7)
    argv = ['convert', 'resnet18', '--out', 'out'] if name == 'convert' else [name]
    if name == 'finetune':  # only finetune takes --key value overrides
        assert main(argv + ['--lr', '0.1']) == 7
        assert seen[0].overrides == ['--lr', '0.1']
    else:
        with pytest.raises(SystemExit):
            main(argv + ['--lr', '0.1'])
        assert 'unrecognized arguments: --lr 0.1' in capsys.readouterr().err
        assert main(argv) == 7
    assert [args.command for args in seen] == [name]


def test_the_command_line_copies_of_tool_values_match_the_tools():
    """timm_momentum_cli repeats a few values of the tools as literals, so that --help imports none of them."""
    from timm_momentum.tools import bench, convert, finetune, memory

    assert repr(timm_momentum_cli.FINETUNE_DEFAULTS) == repr(finetune.DEFAULTS)  # keys, order, values and types
    keys = ', '.join(f'{k} ({v})' for k, v in finetune.DEFAULTS.items())
    assert _subcommands(build_parser())['finetune'].epilog.endswith(keys)
    assert list(timm_momentum_cli.BENCH_AMP_DTYPES) == sorted(memory.AMP_DTYPES)
    assert list(timm_momentum_cli.BENCH_COMPILED_CONFIGS) == list(bench.COMPILED_CONFIGS)
    assert set(timm_momentum_cli.BENCH_DEFAULT_COMPILED) <= set(bench.COMPILED_CONFIGS)
    assert timm_momentum_cli.CONVERT_DRIFT_IMAGES == convert.DRIFT_IMAGES


def test_the_old_module_is_the_command_line():
    from timm_momentum.tools import cli

    assert cli.main is main and cli.build_parser is build_parser


def test_user_errors_become_one_line_and_bugs_still_raise(capsys):
    import errno

    from timm_momentum.tools.errors import ConfigError, run_reporting_user_errors, user_error_message

    full = OSError(errno.ENOSPC, 'No space left on device', '/out/metrics.csv')
    assert user_error_message(full) == 'cannot write: no space left on device (/out/metrics.csv)'
    assert user_error_message(ConfigError('lr must be a number')) == 'lr must be a number'
    assert user_error_message(FileNotFoundError(errno.ENOENT, 'gone')) is None  # not the disk's state: a bug
    assert user_error_message(RuntimeError('shape mismatch')) is None

    def fail(error: BaseException):
        def run():
            raise error
        return run

    assert run_reporting_user_errors(fail(full)) is None
    assert capsys.readouterr().err == 'error: cannot write: no space left on device (/out/metrics.csv)\n'
    with pytest.raises(RuntimeError, match='shape mismatch'):
        run_reporting_user_errors(fail(RuntimeError('shape mismatch')))
    assert run_reporting_user_errors(lambda: 7) == 7
