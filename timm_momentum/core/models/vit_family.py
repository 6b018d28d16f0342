"""The drop-in Momentum Vision Transformers of timm's ViT family, derived from timm's registry.

Every architecture of ``timm.models.vision_transformer`` that builds timm's ``VisionTransformer`` from its
pre-norm ``Block`` (vit_tiny/small/base/large/huge, every patch size and resolution, DeiT-style, register tokens,
MAP heads, SigLIP/CLIP trunks, ...) becomes ``momentum_<name>``: that ViT with its blocks as one momentum chain
(``momentum_vit.MomentumVisionTransformer``), with one pretrained tag per timm tag of the source, pointing at the
source's weights, which load strictly at the faithful gamma. Architectures built from another block
(ResPostBlock, the parallel blocks) are not in the family: their blocks have no single pre-norm residual form
for the split block function, and asking for one raises ValueError naming why.
"""
from typing import Any, Callable, Dict, List, Sequence

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, checkpoint_filter_fn

from ..chain import PAPER_GAMMA
from .derive import architectures_built_by, builder_args, momentum_cfgs, momentum_name, pretrained_tags
from .momentum_model import resolve_gamma
from .momentum_vit import MomentumVisionTransformer

__all__ = ['SOURCE_MODULE', 'source_architectures', 'check_source', 'source_model_args', 'chain_length',
           'family_table']

SOURCE_MODULE = 'vision_transformer'
_BUILDER = '_create_vision_transformer'


def _builds_block(source: str) -> bool:
    return builder_args(source, _BUILDER, 'Vision Transformer').get('block_fn', Block) is Block


def source_architectures() -> List[str]:
    """timm's ViT-family architectures, in timm's order: those of ``timm.models.vision_transformer`` that build
    with its ``_create_vision_transformer`` from timm's ``Block``."""
    return [name for name in architectures_built_by(SOURCE_MODULE, _BUILDER) if _builds_block(name)]


def check_source(source: str) -> str:
    """``source`` if it is an architecture of the family; else ValueError naming why."""
    args = source_model_args(source)  # raises for an unknown name or another builder
    if args.get('block_fn', Block) is not Block:
        raise ValueError(f'{source!r} is not in timm-momentum\'s Vision Transformer family: it builds its blocks '
                         f'from {args["block_fn"].__name__}, not timm\'s pre-norm Block')
    if source not in source_architectures():
        raise ValueError(f'{source!r} is not in timm\'s Vision Transformer family '
                         f'(timm.list_models(module={SOURCE_MODULE!r}))')
    return source


def source_model_args(source: str) -> Dict[str, Any]:
    """The arguments timm's entry point for ``source`` builds its VisionTransformer with (patch_size, embed_dim,
    depth, num_heads, ...); ValueError for a name outside the family's builder."""
    return builder_args(source, _BUILDER, 'Vision Transformer')


def chain_length(source: str, block_fn: str = 'dropin') -> int:
    """Steps in the momentum chain: the depth, twice over for the split block function."""
    return int(source_model_args(source)['depth']) * (2 if block_fn == 'split' else 1)


def _create(name: str, source: str, pretrained: bool, **kwargs: Any) -> MomentumVisionTransformer:
    """What timm's ``_create_vision_transformer`` does for ``source`` (its checkpoint filter, strict loading,
    feature getter), building a MomentumVisionTransformer."""
    args = dict(source_model_args(source), default_gamma='auto' if pretrained else PAPER_GAMMA)
    args.pop('block_fn', None)
    kwargs = dict(args, **kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        MomentumVisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=True, feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


def _pretrained_cfgs(source: str) -> Dict[str, Dict[str, Any]]:
    gamma = resolve_gamma('auto', [chain_length(source)])[0][0]

    def note(tag: str, cfg: Dict[str, Any]) -> str:
        return (f'Weights of {source}.{tag} (hf_hub_id {cfg.get("hf_hub_id")}) loaded unchanged into the drop-in '
                f'Momentum ViT at the faithful gamma (gamma=\'auto\': {gamma:g} for its chain of '
                f'{chain_length(source)} blocks). At gamma > 0 the network does not compute its source\'s function '
                f'exactly; benchmarks/fidelity_vit.py measures the drift on a ViT trained on Fashion-MNIST.')

    return momentum_cfgs(source, note)


def _entrypoint(source: str) -> Callable[..., MomentumVisionTransformer]:
    name = momentum_name(source)

    def create(pretrained: bool = False, **kwargs: Any) -> MomentumVisionTransformer:
        return _create(name, source, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"Momentum {source}: timm's {source} with its blocks as one momentum chain and the drop-in "
                      f"block function (loads {source}'s weights unchanged; gamma 'auto' with pretrained=True, "
                      f"else 0.9).")
    return create


def family_table(sources: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """One row per family architecture: its momentum name, timm source, pretrained tags, chain length and the
    faithful policy's gamma, for both block functions."""
    rows = []
    for source in sources or source_architectures():
        lengths = [chain_length(source)]
        rows.append({'name': momentum_name(source), 'source': source, 'tags': pretrained_tags(source),
                     'chain_lengths': lengths, 'auto_gamma': resolve_gamma('auto', lengths)[0]})
    return rows


SOURCES = source_architectures()
default_cfgs = generate_default_cfgs({k: v for source in SOURCES for k, v in _pretrained_cfgs(source).items()})
for _source in SOURCES:
    globals()[momentum_name(_source)] = register_model(_entrypoint(_source))
