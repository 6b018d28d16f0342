"""The timm-momentum command line."""
import argparse
import subprocess
import sys

import pytest

from timm_momentum.tools.cli import build_parser, main
from timm_momentum.tools.example import compare_saved_activations


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
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {'finetune', 'demo', 'example', 'convert', 'bench'} <= set(subcommands)
    for name, subcommand in subcommands.items():
        formatter = subcommand._get_formatter()
        for action in subcommand._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip() and '\n' not in action.help, (name, action.dest)
            if action.option_strings and not action.required:  # a required option has no default to show
                assert 'default' in formatter._get_help_string(action), (name, action.dest)
        assert 'default' in subcommand.format_help(), name


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, '-m', 'timm_momentum.tools.cli', '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and 'example' in proc.stdout


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
