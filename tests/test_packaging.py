"""What a non-editable install ships, and what the core needs: the model card travels as package data, and
``import timm_momentum``, ``create_model`` and ``convert`` work without the ``train`` extra."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import timm_momentum

ROOT = Path(timm_momentum.__file__).parent.parent
CARD = 'MODEL_CARD.md'


def test_the_packaged_model_card_is_the_repositorys():
    """timm_momentum/tools/MODEL_CARD.md is a copy of the top-level one; after editing that, copy it over."""
    assert (ROOT / 'timm_momentum' / 'tools' / CARD).read_text() == (ROOT / CARD).read_text(), \
        f'cp {CARD} timm_momentum/tools/{CARD}'


def test_a_wheel_install_finds_the_model_card(tmp_path):
    """``pip install .`` (not editable) into a folder; there importlib.resources finds the full card template."""
    pytest.importorskip('setuptools', reason='a build without isolation needs setuptools installed')
    source = tmp_path / 'source'
    source.mkdir()
    for name in ('pyproject.toml', 'README.md', CARD):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / 'timm_momentum', source / 'timm_momentum', ignore=shutil.ignore_patterns('__pycache__'))
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
                    '--disable-pip-version-check', '--target', str(site), str(source)],
                   check=True, cwd=tmp_path, capture_output=True)
    script = ('import importlib.resources, timm_momentum; '
              'print(timm_momentum.__file__); '
              f'print(importlib.resources.files("timm_momentum.tools").joinpath("{CARD}").read_text(), end="")')
    found = subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, 'PYTHONPATH': str(site)}).stdout
    where, card = found.split('\n', 1)
    assert Path(where).parent == site / 'timm_momentum'
    assert card == (ROOT / CARD).read_text()


def test_the_core_needs_no_training_extra(tmp_path):
    """With scikit-learn and matplotlib unimportable: import, create_model, and a conversion that writes the
    full model card."""
    script = f'''
import sys
sys.modules['sklearn'] = None
sys.modules['matplotlib'] = None
import timm, torch
import timm_momentum
from safetensors.torch import save_file
from timm_momentum.tools.convert import convert
model = timm.create_model('momentum_resnet18')
assert type(model).__name__ == 'MomentumResNet'
save_file(timm.create_model('resnet18', num_classes=3).state_dict(), r'{tmp_path / "r18.safetensors"}')
convert(r'{tmp_path / "r18.safetensors"}', r'{tmp_path / "out"}', img_size=32)
assert 'sklearn' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]
'''
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, env=env)
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert '## How this checkpoint was obtained' in card and 'r18.safetensors' in card
