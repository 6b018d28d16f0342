"""pytest plugin that runs timm's own tests/test_models.py against the momentum models.

It only chooses models and sets the memory mode; timm's tests and assertions run unchanged.

  * imports timm_momentum, so the momentum models are registered before timm's tests list models;
  * keeps the tests parametrized by one of the chosen models (``--momentum-models``), deselects the rest,
    and deselects the tests that download pretrained weights (by default: the plain depths, the paper's CIFAR
    model, a sample of timm's ResNet family and two ViT sizes);
  * with ``--momentum-memory-efficient``, builds every momentum model with ``memory_efficient=True``;
  * lists a momentum model where timm's ``list_models`` lists its source (``momentum_vit_small_patch16_224`` where
    ``vit_small_patch16_224`` is): timm's name filters (``NON_STD_FILTERS = ['vit_*', ...]``, which send ViTs to
    their own tests) then treat it as they treat its source; a model without a timm source is listed as before;
  * lists the momentum models under their source's timm module name ('resnet', 'vision_transformer') as well,
    because timm chooses the models for its forward_intermediates tests by module name and ours are not on
    its list.
"""
import functools
from typing import Any, Callable, List

import pytest
from timm.models import _registry

import timm
import timm.models
import timm_momentum
from timm_momentum.core.models.derive import PREFIX

# the plain depths, the paper's CIFAR model, the sample of timm's ResNet family that issue 22 names and the two
# ViT sizes issue 23 names
DEFAULT_MODELS = ('momentum_resnet18,momentum_resnet50,momentum_mresnet18_cifar,momentum_resnet50d,'
                  'momentum_seresnext26d_32x4d,momentum_wide_resnet50_2,momentum_resnet50_gn,momentum_resnetrs101,'
                  'momentum_vit_tiny_patch16_224,momentum_vit_small_patch16_224')
# the modules timm_momentum registers its models from, and the timm module of their sources
MOMENTUM_MODULES = {'momentum_resnet': 'resnet', 'resnet_family': 'resnet', 'vit_family': 'vision_transformer'}
# These tests fetch weights or reference tensors from the Hugging Face Hub.
DOWNLOADING_TESTS = ('test_model_inference', 'test_model_load_pretrained', 'test_model_features_pretrained')


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup('timm-momentum')
    group.addoption('--momentum-models', default=DEFAULT_MODELS,
                    help=f'comma-separated momentum models to test (default: {DEFAULT_MODELS})')
    group.addoption('--momentum-memory-efficient', action='store_true',
                    help='build every momentum model with memory_efficient=True')


def _with_memory_efficient(entrypoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(entrypoint)
    def build(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault('memory_efficient', True)
        return entrypoint(*args, **kwargs)
    return build


def _listed_as_their_sources(list_models: Callable[..., List[str]]) -> Callable[..., List[str]]:
    @functools.wraps(list_models)
    def listed(*args: Any, **kwargs: Any) -> List[str]:
        names = list_models(*args, **kwargs)
        listed_names = set(names)
        known = set(_registry._model_entrypoints)

        def has_source(name: str) -> bool:
            return name.startswith(PREFIX) and name[len(PREFIX):].split('.')[0] in known

        options = {k: kwargs[k] for k in ('pretrained', 'include_tags') if k in kwargs}
        momentum = [name for name in list_models(PREFIX + '*', **options) if has_source(name)
                    and name[len(PREFIX):] in listed_names]
        return [name for name in names if not has_source(name)] + momentum
    return listed


def _chosen(config: pytest.Config) -> List[str]:
    return [name.strip() for name in config.getoption('--momentum-models').split(',') if name.strip()]


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin('timeout'):  # timm marks its tests for pytest-timeout
        config.addinivalue_line('markers', 'timeout(seconds): per-test time limit, for pytest-timeout')
    chosen = _chosen(config)
    unknown = [name for name in chosen if _registry._model_to_module.get(name) not in MOMENTUM_MODULES]
    if unknown:
        raise pytest.UsageError(f'--momentum-models: not momentum models: {", ".join(unknown)}')
    listed = _listed_as_their_sources(_registry.list_models)
    for namespace in (timm, timm.models, _registry):  # timm's tests import list_models from timm
        namespace.list_models = listed
    for name in chosen:
        _registry._module_to_models[MOMENTUM_MODULES[_registry._model_to_module[name]]].add(name)
    if config.getoption('--momentum-memory-efficient'):
        for name in chosen:
            _registry._model_entrypoints[name] = _with_memory_efficient(_registry._model_entrypoints[name])


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    chosen = set(_chosen(config))
    kept, deselected = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        model_name = callspec.params.get('model_name') if callspec is not None else None
        selected = (isinstance(model_name, str) and model_name.split('.')[0] in chosen
                    and item.originalname not in DOWNLOADING_TESTS)
        (kept if selected else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = kept
