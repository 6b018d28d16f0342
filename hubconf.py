"""torch.hub entry points for timm-momentum.

    torch.hub.load('ORG/timm-momentum', 'momentum_resnet50', pretrained=True)    # from GitHub
    torch.hub.load('path/to/timm-momentum', 'momentum_resnet18', source='local')  # from a clone
    torch.hub.load('path/to/timm-momentum', 'from_folder', 'path/to/model-folder', source='local')

Each ``momentum_*`` entry point is ``timm.create_model`` of that name (every timm and momentum argument works);
``from_folder`` loads a folder that ``timm-momentum convert`` or ``finetune`` wrote, at the gamma it records.
"""
import typing as _typing

import timm as _timm

import timm_momentum as _timm_momentum  # noqa: F401  registers the momentum_* models with timm
from timm_momentum.tools.loading import from_folder  # noqa: F401  an entry point

dependencies = ['torch', 'timm']


def _entrypoint(name: str) -> _typing.Callable[..., _typing.Any]:
    def create(pretrained: bool = False, **kwargs: _typing.Any) -> _typing.Any:
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"timm.create_model('{name}', pretrained=pretrained, **kwargs)"
    return create


for _name in _timm.list_models('momentum_*'):
    globals()[_name] = _entrypoint(_name)
