"""The timm-momentum command line."""
import argparse
import subprocess
import sys

from timm_momentum.cli import build_parser, main
from timm_momentum.example import compare_saved_activations


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
    proc = subprocess.run([sys.executable, '-m', 'timm_momentum.cli', '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and 'example' in proc.stdout
