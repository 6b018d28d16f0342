"""Loading momentum models from model folders, and errors that name the fix when a name is unknown.

timm and transformers build a folder's model by the architecture its config.json names; a ``momentum_*`` name is
known to timm only once ``import timm_momentum`` has registered it. ``from_folder`` (also torch.hub's entry point)
and finetune's checks use ``architecture_problem`` to say so, or that the name needs a newer timm-momentum.
"""
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch.nn as nn

from .. import __version__
from .errors import ConfigError

__all__ = ['architecture_problem', 'folder_architecture', 'from_folder']


def architecture_problem(name: str) -> Optional[str]:
    """Why timm cannot build ``name``, with the fix; None when it can."""
    import timm

    if timm.is_model(name):
        return None
    if name.startswith('momentum_'):
        return (f'timm knows no model {name!r}. The momentum_* models register with timm on `import timm_momentum`; '
                f'this is timm-momentum {__version__}, which registers {", ".join(timm.list_models("momentum_*"))}, '
                f'so {name!r} needs a newer timm-momentum (pip install -U timm-momentum)')
    return (f'timm {timm.__version__} knows no model {name!r}: a newer timm may (pip install -U timm), or the '
            f'package that registers it must be imported first')


def folder_architecture(folder: Union[str, Path], name: Optional[str] = None) -> str:
    """The architecture a model folder's config.json names; ConfigError naming what is missing or unknown, and
    the folder as ``name`` (default: its path)."""
    folder = Path(folder)
    config_path = folder / 'config.json'
    name = name or str(folder)
    if not folder.is_dir():
        raise ConfigError(f'{name}: no such folder')
    if not config_path.is_file():
        raise ConfigError(f'{name}: the folder holds no config.json (write one with timm-momentum convert)')
    try:
        config = json.loads(config_path.read_text())
        architecture = config.get('architecture') or config['pretrained_cfg']['architecture']
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f'{name}: its config.json is not a timm model config (no architecture)') from None
    if not isinstance(architecture, str):
        raise ConfigError(f'{name}: config.json: architecture must be a model name, got {architecture!r:.80}')
    problem = architecture_problem(architecture)
    if problem:
        raise ConfigError(f'{name}: config.json: {problem}')
    return architecture


def from_folder(path: Union[str, Path], pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The model in a model folder (``timm-momentum convert`` or finetune's ``best/``/``final/``), with its
    weights, at the gamma it records: ``timm.create_model('local-dir:PATH', pretrained=True, **kwargs)`` after
    checking the folder names a model timm knows."""
    import timm

    folder_architecture(path)
    return timm.create_model(f'local-dir:{path}', pretrained=pretrained, **kwargs)
