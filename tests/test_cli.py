"""The timm-momentum command line."""
import subprocess
import sys

from timm_momentum.cli import main
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


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, '-m', 'timm_momentum.cli', '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and 'example' in proc.stdout
