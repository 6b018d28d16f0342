"""The drop-in Momentum ResNets of timm's whole ResNet family, derived from timm's registry.

Every architecture timm registers in ``timm.models.resnet`` (resnet*, resnet*d/t/s/c, resnext, seresnet,
seresnext, ecaresnet, wide_resnet, resnetrs, resnetblur, resnetaa, resnet*_gn, senet154, ...) becomes
``momentum_<name>``: timm's own ``ResNet`` with that architecture's arguments, as a ``MomentumResNet`` with the
drop-in block function, and one pretrained tag per timm tag of the source, pointing at the source's weights,
which load unchanged (strict) at the faithful per-stage gamma. Nothing here lists architectures or tags: both
are read from timm's registry when this module is imported, so a timm release that adds a ResNet adds its
momentum model too.

An architecture's arguments are those its timm entry point passes to timm's ``_create_resnet``, read by running
that entry point with a builder that records them instead of building (``source_model_args``). An entry point
that builds its network any other way is not part of the family, and asking for it raises ValueError naming why.
"""
import functools
from typing import Any, Callable, Dict, List, Sequence

from timm.layers import BlurPool2d, EcaModule, SEModule
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg
from timm.models import list_pretrained, register_model
from timm.models._prune import adapt_model_from_file  # what build_model_with_cfg prunes with (pruned=True)

from ..chain import PAPER_GAMMA, register_deterministic
from .derive import PREFIX, architectures_built_by, builder_args, momentum_cfgs, momentum_name, source_name
from .momentum_resnet import MomentumResNet, resolve_gamma

__all__ = ['SOURCE_MODULE', 'PREFIX', 'source_architectures', 'check_source', 'source_model_args', 'momentum_name',
           'source_name', 'chain_lengths', 'family_table']

SOURCE_MODULE = 'resnet'  # the timm module whose architectures are the family
_BUILDER = '_create_resnet'  # the function timm.models.resnet's entry points build with

# the attention and anti-aliasing modules the family's blocks hold draw no random numbers in training
register_deterministic(SEModule, EcaModule, BlurPool2d)


def source_architectures() -> List[str]:
    """timm's ResNet-family architectures, in timm's order: those of ``timm.models.resnet`` that build with its
    ``_create_resnet``."""
    return architectures_built_by(SOURCE_MODULE, _BUILDER)


def check_source(source: str) -> str:
    """``source`` if it is an architecture of the family; else ValueError naming why (unknown to timm, built
    another way, or outside ``timm.models.resnet``)."""
    if source in source_architectures():
        return source
    source_model_args(source)  # raises for an unknown name or another builder
    raise ValueError(f'{source!r} is not in timm\'s ResNet family (timm.list_models(module={SOURCE_MODULE!r}))')


def source_model_args(source: str) -> Dict[str, Any]:
    """The arguments timm's entry point for ``source`` builds its ResNet with (block, layers, stem_type,
    block_args, ...), plus ``pruned=True`` for the pruned architectures; ValueError for one outside the family."""
    args = builder_args(source, _BUILDER, 'ResNet')
    if 'layers' not in args:
        raise ValueError(f'{source!r}: its entry point passed no layers to {_BUILDER}')
    return args


def chain_lengths(source: str) -> List[int]:
    """Blocks per momentum chain of each stage: every block of the stage but its first."""
    return [int(n) - 1 for n in source_model_args(source)['layers']]


def _pruned_momentum_resnet(source: str, **kwargs: Any) -> MomentumResNet:
    """A MomentumResNet with ``source``'s pruned channel counts (timm's pruning file for it), as timm builds it."""
    model = MomentumResNet(**kwargs)
    # the pruning keeps the input channels of the cfg's first_conv (in_chans); build_model_with_cfg sets the
    # model's own cfg once this returns
    model.pretrained_cfg = get_pretrained_cfg(source).to_dict()
    return adapt_model_from_file(model, source)


def _create(name: str, source: str, pretrained: bool, **kwargs: Any) -> MomentumResNet:
    args = source_model_args(source)
    pruned = args.pop('pruned', False)
    model_cls: Callable[..., MomentumResNet] = \
        functools.partial(_pruned_momentum_resnet, source) if pruned else MomentumResNet
    model_args = dict(args, default_gamma='auto' if pretrained else PAPER_GAMMA)
    return build_model_with_cfg(model_cls, name, pretrained, **dict(model_args, **kwargs))


def _pretrained_cfgs(source: str) -> Dict[str, Dict[str, Any]]:
    """One momentum tag per pretrained timm tag of ``source`` (``derive.momentum_cfgs``), with what loading
    its weights at the faithful gamma does."""
    gammas, _ = resolve_gamma('auto', chain_lengths(source))
    exact = all(g == 0.0 for g in gammas)

    def note(tag: str, cfg: Dict[str, Any]) -> str:
        return (f'Weights of {source}.{tag} (hf_hub_id {cfg.get("hf_hub_id")}) loaded unchanged into the drop-in '
                f'Momentum ResNet at the faithful per-stage gamma (gamma=\'auto\': {tuple(gammas)} for layer1-4). ' +
                ('Every chain stores its inputs at gamma 0, so the network computes its source\'s function.'
                 if exact else
                 'Chains at gamma > 0 do not compute their source\'s function exactly; the drift on these '
                 'ImageNet weights has not been measured (benchmarks/fidelity measures it on Fashion-MNIST).'))

    return momentum_cfgs(source, note)


def _entrypoint(source: str) -> Callable[..., MomentumResNet]:
    name = momentum_name(source)

    def create(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
        return _create(name, source, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"Momentum {source}: timm's {source} with momentum stages and the drop-in block function "
                      f"(loads {source}'s weights unchanged; gamma 'auto' with pretrained=True, else 0.9).")
    return create


def family_table(sources: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """One row per family architecture: its momentum name, timm source, pretrained tags, chain lengths and the
    faithful policy's gamma per stage (what README's models table shows)."""
    rows = []
    for source in sources or source_architectures():
        lengths = chain_lengths(source)
        rows.append({'name': momentum_name(source), 'source': source,
                     'tags': sorted(n.split('.', 1)[1] for n in list_pretrained(f'{source}.*')),
                     'chain_lengths': lengths, 'auto_gamma': resolve_gamma('auto', lengths)[0]})
    return rows


SOURCES = source_architectures()
default_cfgs = generate_default_cfgs({k: v for source in SOURCES for k, v in _pretrained_cfgs(source).items()})
for _source in SOURCES:
    globals()[momentum_name(_source)] = register_model(_entrypoint(_source))
