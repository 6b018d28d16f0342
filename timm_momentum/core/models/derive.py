"""Deriving a momentum family from timm's registry: what an entry point builds with, and its pretrained tags.

A family is the architectures of one timm module that build with one builder function (``_create_resnet``,
``_create_vision_transformer``). ``builder_args`` reads the arguments an architecture's entry point passes to
that builder by running the entry point's own code with a recorder in the builder's place, so that nothing is
built and nothing lists architectures by hand; ``momentum_cfgs`` gives a momentum architecture one pretrained
tag per timm tag of its source, pointing at the source's weights.
"""
import functools
import types
from typing import Any, Callable, Dict, List, Tuple

from timm.models import get_pretrained_cfg, list_models, list_pretrained, model_entrypoint

from .momentum_model import PAPER

__all__ = ['PREFIX', 'architectures_built_by', 'builder_args', 'momentum_name', 'source_name', 'momentum_cfgs',
           'pretrained_tags']

PREFIX = 'momentum_'


def architectures_built_by(module: str, builder: str) -> List[str]:
    """The architectures of ``timm.models.<module>`` whose entry points build with ``builder``, in timm's order."""
    return [name for name in list_models(module=module) if builder in model_entrypoint(name).__code__.co_names]


@functools.lru_cache(maxsize=None)
def _recorded(source: str, builder: str, family: str) -> Tuple[Tuple[str, Any], ...]:
    try:
        entrypoint = model_entrypoint(source)
    except (KeyError, RuntimeError):  # timm raises KeyError for a name it does not know
        raise ValueError(f'{source!r} is not a timm architecture') from None
    code = entrypoint.__code__
    if builder not in code.co_names:
        raise ValueError(f'{source!r} is not in timm\'s {family} family: its entry point ({entrypoint.__module__}) '
                         f'does not build with {builder}')
    recorded: Dict[str, Any] = {}

    def record(variant: str, pretrained: bool = False, **kwargs: Any) -> None:
        recorded.update(kwargs)

    # the entry point's own code, reading its names from its own module, except the builder
    probe = types.FunctionType(code, {**entrypoint.__globals__, builder: record}, code.co_name,
                               entrypoint.__defaults__, entrypoint.__closure__)
    probe(pretrained=False)
    return tuple(recorded.items())


def builder_args(source: str, builder: str, family: str) -> Dict[str, Any]:
    """The keyword arguments timm's entry point for ``source`` passes to ``builder``; ValueError naming why for
    a name timm does not know or one that builds another way (``family`` names the family in the message)."""
    return dict(_recorded(source, builder, family))


def momentum_name(source: str) -> str:
    """The momentum architecture of a timm architecture: resnet50d -> momentum_resnet50d."""
    return PREFIX + source


def source_name(momentum: str) -> str:
    """The timm architecture a drop-in momentum architecture comes from: momentum_resnet50d -> resnet50d."""
    if not momentum.startswith(PREFIX):
        raise ValueError(f'{momentum!r} is not a momentum architecture (they start with {PREFIX!r})')
    return momentum[len(PREFIX):]


def pretrained_tags(source: str) -> List[str]:
    """The pretrained tags timm has for ``source``, sorted."""
    return sorted(name.split('.', 1)[1] for name in list_pretrained(f'{source}.*'))


def momentum_cfgs(source: str, note: Callable[[str, Dict[str, Any]], str]) -> Dict[str, Dict[str, Any]]:
    """One momentum tag per pretrained timm tag of ``source``, default tag first, pointing at the source's
    weights (an architecture without weights gets its default cfg, untrained). ``note(tag, cfg)`` says, for a
    tag with weights, what the momentum model does with them."""
    default = get_pretrained_cfg(source)
    tags = [default.tag] + [tag for tag in pretrained_tags(source) if tag != default.tag]
    cfgs = {}
    for tag in tags:
        cfg = get_pretrained_cfg(f'{source}.{tag}' if tag else source).to_dict()
        cfg.pop('architecture', None)
        cfg.pop('tag', None)
        cfg['paper_ids'] = ', '.join(filter(None, [cfg.get('paper_ids'), PAPER]))
        if cfg.get('hf_hub_id') or cfg.get('url'):
            cfg['notes'] = note(tag, cfg)
        cfgs[f'{momentum_name(source)}.{tag}' if tag else momentum_name(source)] = cfg
    return cfgs
