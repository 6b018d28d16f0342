"""Convert pretrained ResNet and Vision Transformer checkpoints into momentum model repos that timm loads.

Sources: a timm model name or tag (timm's ResNet family or its Block-based ViTs), an ``hf-hub:`` repo, a local
``.safetensors``/``.pth``/``.bin`` file (timm or torchvision ResNet keys, timm ViT keys, or a timm ``train.py``
checkpoint), a momentum model's own weights
(they record the gamma they were trained at), or a checkpoint of the official ``momentumnet`` package in
either of its layouts. The output folder holds ``config.json``, ``model.safetensors``, a model card
``README.md`` and ``verify.json``; it is built in a temporary folder and renamed into place.
"""
import argparse
import contextlib
import functools
import hashlib
import html
import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

import torch
import torch.nn as nn

from .. import __version__
from .errors import ConversionError, describe_os_error, first_line, load_failure
from .files import (MARKER, FolderInUseError, file_in_the_way, folder_lock, marked_files, protected_by,
                    recover_interrupted_folder, write_folder_atomically, write_marker)
from .heal import HELD_OUT_SPLITS, distill, load_images, recalibrate_batchnorm
from ..core.chain import PAPER_GAMMA
from ..core.models.momentum_resnet import (BLOCK_FN_KEY, GAMMA_KEY, RECORD_KEYS, GammaSpec, parse_gamma, read_record,
                              resnet_state_dict)
from ..core.models import vit_family
from ..core.models.momentum_vit import MomentumVisionTransformer
from ..core.models.resnet_family import (check_source, momentum_name, source_architectures, source_model_args,
                                         source_name)

__all__ = ['ConvertResult', 'SourceCheckpoint', 'load_source', 'infer_architecture', 'family_architecture', 'convert',
           'write_model_folder', 'folder_config', 'safetensors_metadata', 'strict_json', 'validate_repo_id',
           'plan_upload', 'upload_to_hub']

EQUIVALENCE_TOL = 1e-4
MAX_INPUT_SIDE = 2048  # pixels; verification runs 2 images, and a 40000 px side asked for 38 GB
DRIFT_IMAGES = 256  # enough real images for top-1 agreement to mean something, few enough for a CPU
_DEPTHS = {('basic', (2, 2, 2, 2)): 18, ('basic', (3, 4, 6, 3)): 34, ('bottleneck', (3, 4, 6, 3)): 50,
           ('bottleneck', (3, 4, 23, 3)): 101, ('bottleneck', (3, 8, 36, 3)): 152}
_TRANSFORM_KEY = re.compile(r'^(layer\d)\.1\.0\.network\.(\d+)\.(.*)$')   # transform_to_momentumnet
_MRESNET_KEY = re.compile(r'^(layer\d)\.1\.network\.(\d+)\.(.*)$')         # MResNet
# What the Hub accepts as a license or dataset id; anything else in a source's metadata is not copied into cards
_LICENSE_ID = re.compile(r'^[a-z0-9][a-z0-9.+-]{0,63}$')
_DATASET_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$')
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# What an earlier convert wrote, before folders carried the MARKER: --force may replace exactly these
_LEGACY_FILES = ('config.json', 'model.safetensors', 'README.md', 'verify.json')


@dataclass
class SourceCheckpoint:
    """A ResNet state dict in timm's key layout, with where it came from."""
    state_dict: Dict[str, torch.Tensor]
    source: str
    block_fn: str = 'dropin'
    layout: str = 'timm'
    sha256: str = ''
    revision: Optional[str] = None
    pretrained_cfg: Dict[str, Any] = field(default_factory=dict)
    card_metadata: Dict[str, Any] = field(default_factory=dict)  # the YAML header of the source's model card
    record: Dict[str, Any] = field(default_factory=dict)  # the momentum settings a momentum checkpoint records

    def license(self) -> str:
        """The source's license as its metadata states it (a license identifier such as ``apache-2.0``), 'other'
        where the metadata holds something else, and 'unknown' where it names none."""
        value = self.pretrained_cfg.get('license') or self.card_metadata.get('license')
        if not value:
            return 'unknown'
        return str(value).strip().lower() if isinstance(value, str) and _LICENSE_ID.match(value.strip().lower()) \
            else 'other'

    def datasets(self) -> List[str]:
        """The datasets the source's model card names, those that are dataset identifiers; empty when none."""
        datasets = self.card_metadata.get('datasets') or []
        datasets = [datasets] if isinstance(datasets, str) else datasets
        if not isinstance(datasets, list):
            return []
        return [d.strip() for d in datasets if isinstance(d, str) and _DATASET_ID.match(d.strip())]


@dataclass
class ConvertResult:
    """What ``convert`` wrote."""
    out_dir: Path
    arch: str
    model_args: Dict[str, Any]
    verify: Dict[str, Any]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tensors(state: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_file(path: Path) -> Dict[str, Any]:
    """Load a checkpoint file without running code from it."""
    if not path.is_file():
        raise ConversionError(f'{path}: no such file')
    if path.stat().st_size == 0:
        raise ConversionError(f'{path}: the file is empty (0 bytes)')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ConversionError(f'{path}: corrupt or truncated safetensors file ({e})') from None
    try:
        # timm's train.py saves its arguments as an argparse.Namespace: that class, and no other, is allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:
        raise ConversionError(f'{path}: cannot read as a weights-only PyTorch checkpoint '
                              f'(corrupt, truncated, or it holds code): {load_failure(e)}') from None


def _wrapped_state(checkpoint: Any) -> Any:
    """What a common training-checkpoint wrapper holds as its state dict (the checkpoint itself if none)."""
    for key in ('state_dict', 'model_state_dict', 'model', 'module', 'state_dict_ema'):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _unwrap(checkpoint: Any, where: str) -> Dict[str, torch.Tensor]:
    """The state dict inside common training-checkpoint wrappers, without 'module.' prefixes and without the
    momentum record (``_record_of`` reads it)."""
    checkpoint = _wrapped_state(checkpoint)
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ConversionError(f'{where}: holds no state dict')
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f'{where}: entry {key!r} is a {type(value).__name__}, not a tensor')
        key = key[len('module.'):] if key.startswith('module.') else key
        if key not in RECORD_KEYS:
            _check_weight(str(key), value, where)
            state[key] = value
    return state


def _record_of(checkpoint: Any, where: str) -> Dict[str, Any]:
    """The momentum settings a checkpoint was trained at: its state dict's record (``RECORD_KEYS``) or, for a
    timm train.py checkpoint of an earlier version, its ``args.model_kwargs``; {} for a plain ResNet."""
    if not isinstance(checkpoint, dict):
        return {}
    state = _wrapped_state(checkpoint)
    prefix = 'module.' if any(str(k).startswith('module.') for k in state) else ''
    try:
        record = read_record(state, prefix)
        if not record and isinstance(checkpoint.get('args'), argparse.Namespace):
            kwargs = getattr(checkpoint['args'], 'model_kwargs', None) or {}
            if isinstance(kwargs, dict) and 'gamma' in kwargs:
                record['gamma'] = parse_gamma(kwargs['gamma'])
            if isinstance(kwargs, dict) and kwargs.get('block_fn') is not None:
                record['block_fn'] = str(kwargs['block_fn'])
    except ValueError as e:
        raise ConversionError(f'{where}: {e}') from None
    return record


def _source_state(checkpoint: Any, where: str) -> Tuple[Dict[str, torch.Tensor], str, str, Dict[str, Any]]:
    """A checkpoint's state dict in timm's layout, the layout it came in, its block function, and the momentum
    settings it records. A state dict that records them is a momentum model in timm's layout ('timm-momentum')."""
    record = _record_of(checkpoint, where)
    state, layout, block_fn = _to_timm_layout(_unwrap(checkpoint, where), where)
    if record and layout == 'timm':
        layout, block_fn = 'timm-momentum', record.get('block_fn', block_fn)
    return state, layout, block_fn, record


def _check_weight(key: str, value: torch.Tensor, where: str) -> None:
    """Refuse a tensor that cannot be a ResNet weight: one without values (meta), a sparse or quantized one, and
    one that is not floating point, except the integer BatchNorm ``num_batches_tracked`` counters."""
    if value.is_meta:
        raise ConversionError(f'{where}: entry {key!r} is a meta tensor (a shape without values)')
    if value.layout != torch.strided:
        raise ConversionError(f'{where}: entry {key!r} is a {value.layout} tensor; weights are dense tensors')
    counter = key.endswith('num_batches_tracked') and value.dtype in _INTEGER_DTYPES
    if not value.is_floating_point() and not counter:
        raise ConversionError(f'{where}: entry {key!r} has dtype {value.dtype}; ResNet weights are floating point '
                              f'(only the num_batches_tracked counters are integers)')


def _check_input_size(value: Any, key: str, where: str) -> List[int]:
    """A pretrained_cfg input size as [channels, height, width] of positive integers, sides at most
    MAX_INPUT_SIDE, else ConversionError naming it."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConversionError(f'{where}: {key} must be [channels, height, width] of positive integers, got '
                              f'{_clipped(value)}')
    if max(value[1:]) > MAX_INPUT_SIDE:
        raise ConversionError(f'{where}: {key} {list(value)} has a side over {MAX_INPUT_SIDE} px, too large to '
                              f'verify on')
    return list(value)


def _clipped(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _to_timm_layout(state: Dict[str, torch.Tensor], where: str) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """Map the official momentumnet layouts onto timm's keys; returns (state, layout, block_fn)."""
    if any(_TRANSFORM_KEY.match(k) for k in state):
        pattern, layout, block_fn = _TRANSFORM_KEY, 'momentumnet.transform_to_momentumnet', 'dropin'
    elif any(_MRESNET_KEY.match(k) for k in state):
        pattern, layout, block_fn = _MRESNET_KEY, 'momentumnet.MResNet', 'paper'
    else:
        return state, 'timm', 'dropin'
    if any('.network.init.' in k or '.init_function.' in k for k in state):
        raise ConversionError(f'{where}: checkpoints with an init_speed block are not supported')
    out = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            key = f'{match.group(1)}.{int(match.group(2)) + 1}.{match.group(3)}'
        out[key] = value
    return out, layout, block_fn


def _hub_error(source: str, repo_id: str, error: Exception) -> ConversionError:
    """Why the Hub gave no weights, and how to convert without it."""
    from huggingface_hub import constants

    mode = ('HF_HUB_OFFLINE=1 is set, so only the local Hugging Face cache was searched' if constants.HF_HUB_OFFLINE
            else 'offline, or no such repo? Without network, set HF_HUB_OFFLINE=1 to skip the retries')
    return ConversionError(
        f'{source}: cannot fetch weights from the Hugging Face Hub ({mode}): {first_line(error)}. '
        f'To convert offline, pass a local weights file (.safetensors/.pth/.bin) or a folder holding one '
        f'(local-dir:PATH, e.g. from `huggingface-cli download {repo_id} --local-dir PATH` on a machine with '
        f'network), or fill the cache ({constants.HF_HUB_CACHE}) with that repo first')


def _metadata_from(config_path: Optional[Path], card_path: Optional[Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The pretrained_cfg of a config.json and the YAML header of a model card, each {} when absent or unreadable."""
    from huggingface_hub import metadata_load

    pretrained_cfg: Dict[str, Any] = {}
    card: Dict[str, Any] = {}
    if config_path is not None and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
            pretrained_cfg = dict(config.get('pretrained_cfg') or {})
            if isinstance(config.get('label_names'), list):  # timm keeps them at the root
                pretrained_cfg['label_names'] = config['label_names']
            if isinstance(config.get('architecture'), str):  # so does timm's save_config_for_hf
                pretrained_cfg['architecture'] = config['architecture']
        except (ValueError, AttributeError, TypeError):
            pass
    for key in ('input_size', 'test_input_size'):
        if key in pretrained_cfg:
            pretrained_cfg[key] = _check_input_size(pretrained_cfg[key], key, str(config_path))
    if card_path is not None and card_path.is_file():
        try:
            card = metadata_load(card_path) or {}
        except Exception:  # a card without a valid YAML header says nothing about the weights
            pass
    return pretrained_cfg, card


def _load_hub(repo_id: str, source: str) -> SourceCheckpoint:
    from huggingface_hub import hf_hub_download
    revision = None
    if '@' in repo_id:
        repo_id, revision = repo_id.split('@', 1)
    try:
        try:
            path = Path(hf_hub_download(repo_id, 'model.safetensors', revision=revision))
        except Exception:
            path = Path(hf_hub_download(repo_id, 'pytorch_model.bin', revision=revision))
    except Exception as e:
        raise _hub_error(source, repo_id, e) from None

    def optional(name: str) -> Optional[Path]:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception:
            return None

    pretrained_cfg, card = _metadata_from(optional('config.json'), optional('README.md'))
    state, layout, block_fn, record = _source_state(_read_file(path), source)
    return SourceCheckpoint(state, source, block_fn, layout, _sha256_file(path),
                            revision or path.parent.name, pretrained_cfg, card, record)


def _load_folder(folder: Path, source: str) -> SourceCheckpoint:
    """A model folder (a Hub repo's files on disk): its weights, config.json and model card."""
    weights = [folder / n for n in ('model.safetensors', 'pytorch_model.bin') if (folder / n).is_file()]
    if not weights:
        raise ConversionError(f'{source}: the folder holds neither model.safetensors nor pytorch_model.bin')
    state, layout, block_fn, record = _source_state(_read_file(weights[0]), source)
    pretrained_cfg, card = _metadata_from(folder / 'config.json', folder / 'README.md')
    return SourceCheckpoint(state, source, block_fn, layout, _sha256_file(weights[0]), None, pretrained_cfg, card,
                            record)


def load_source(source: str) -> SourceCheckpoint:
    """Load SOURCE: a local file or model folder (``local-dir:PATH``), ``hf-hub:ORG/NAME``, or a timm ResNet
    name/tag (``resnet50.a1_in1k``)."""
    import timm

    path = Path(source[len('local-dir:'):] if source.startswith('local-dir:') else source)
    if path.is_dir():
        return _load_folder(path, source)
    if source.startswith('local-dir:'):
        raise ConversionError(f'{source}: no such folder')
    if path.suffix in ('.safetensors', '.pth', '.bin', '.pt') or path.exists():
        state, layout, block_fn, record = _source_state(_read_file(path), source)
        return SourceCheckpoint(state, str(path), block_fn, layout, _sha256_file(path), record=record)
    if source.startswith('hf-hub:'):
        return _load_hub(source[len('hf-hub:'):], source)
    name = source[len('timm/'):] if source.startswith('timm/') else source
    if name.split('.')[0] not in timm.list_models():
        raise ConversionError(f'{source}: not a file, an hf-hub: repo or a timm ResNet-family or ViT name')
    try:
        check_family_source(name.split('.')[0])
    except ValueError as e:
        raise ConversionError(f'{source}: {e}') from None
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know: 'Invalid pretrained tag (bogus) for resnet18.'
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")
        raise ConversionError(f'{source}: timm has no pretrained weights under this tag; it has '
                              f'{", ".join(tags[:8]) or "none"}{" ..." if len(tags) > 8 else ""}') from None
    if cfg is None or not cfg.hf_hub_id:
        raise ConversionError(f'{source}: timm has no pretrained weights under this name')
    checkpoint = _load_hub(cfg.hf_hub_id, source)
    checkpoint.pretrained_cfg = {**cfg.to_dict(), **checkpoint.pretrained_cfg}
    return checkpoint


def check_family_source(source: str) -> str:
    """``source`` if it is an architecture of timm's ResNet family or of its Block-based ViTs; else ValueError
    naming why (the family's own reason where the name is in timm's resnet or vision_transformer module)."""
    import timm

    if source in timm.list_models(module=vit_family.SOURCE_MODULE):
        return vit_family.check_source(source)
    try:
        return check_source(source)
    except ValueError as e:
        raise ValueError(f'{e}; the converter takes timm\'s ResNet family and its Block-based Vision '
                         f'Transformers') from None


def is_vit_state(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has a timm Vision Transformer's keys (a patch embedding and blocks)."""
    return 'patch_embed.proj.weight' in state and any(k.startswith('blocks.') for k in state)


def infer_architecture(state: Dict[str, torch.Tensor], block_fn: str = 'dropin',
                       architecture: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """The momentum architecture and model kwargs that match a timm-layout ResNet state dict.

    ``architecture`` is what the source's metadata names (a timm ResNet-family architecture, or a momentum one);
    the drop-in block function then takes its momentum model. Without one, the state dict's keys and shapes pick
    the family architecture that has exactly those (``family_architecture``); one that none has exactly is
    described by its depth, stem and downsampling (``momentum_resnet<depth>`` with those options), and one with
    the CIFAR stem or the paper's block function is a ``momentum_mresnet``. A timm ViT state dict takes
    ``vit_architecture``.
    """
    if is_vit_state(state):
        return vit_architecture(state, architecture)
    if 'conv1.weight' not in state and 'conv1.0.weight' not in state:
        raise ConversionError('unsupported architecture: no ResNet stem (conv1.weight or conv1.0.weight)')
    if 'fc.weight' not in state:
        raise ConversionError('unsupported architecture: no classifier fc.weight')
    layers = []
    for stage in range(1, 5):
        indices = {int(k.split('.')[1]) for k in state if k.startswith(f'layer{stage}.')}
        if not indices or indices != set(range(len(indices))):
            raise ConversionError(f'unsupported architecture: layer{stage} blocks {sorted(indices)}')
        layers.append(len(indices))
    stem = state['conv1.0.weight'] if 'conv1.0.weight' in state else state['conv1.weight']
    args: Dict[str, Any] = {'num_classes': int(state['fc.weight'].shape[0])}
    if int(stem.shape[1]) != 3:
        args['in_chans'] = int(stem.shape[1])
    cifar = 'conv1.weight' in state and state['conv1.weight'].shape[-1] == 3
    if block_fn == 'dropin' and not cifar:
        if architecture:
            return _named_architecture(architecture), args
        family = family_architecture(state, layers, args)
        if family:
            return momentum_name(family), args
    return _described_architecture(state, block_fn, layers, args, cifar)


def _named_architecture(architecture: str) -> str:
    """The drop-in momentum architecture of a name a source's metadata gives."""
    import timm

    if architecture in timm.list_models('momentum_*'):
        return architecture
    try:
        return momentum_name(check_family_source(architecture))
    except ValueError as e:
        raise ConversionError(f'unsupported architecture {architecture!r} (named by the source\'s config): {e}') \
            from None


def _vit_grid_args(source: str, state: Dict[str, torch.Tensor], args: Dict[str, Any]) -> Dict[str, Any]:
    """``args`` with the ``img_size`` that ``state``'s position embedding was made for, where it is not the
    source's default."""
    import timm

    if 'pos_embed' not in state:
        return args
    default = timm.create_model(source, **args, device='meta')
    prefix = default.pos_embed.shape[1] - default.patch_embed.num_patches  # tokens with a position embedding
    patches = int(state['pos_embed'].shape[1]) - prefix
    grid = math.isqrt(max(patches, 0))
    if grid * grid != patches or grid == 0:
        raise ConversionError(f'pos_embed has {state["pos_embed"].shape[1]} positions, which is no square grid of '
                              f'patches after {prefix} prefix tokens for {source}')
    if patches == default.patch_embed.num_patches:
        return args
    return {**args, 'img_size': grid * default.patch_embed.patch_size[0]}


def vit_architecture(state: Dict[str, torch.Tensor], architecture: Optional[str] = None
                     ) -> Tuple[str, Dict[str, Any]]:
    """The Momentum ViT and model kwargs (num_classes, in_chans, img_size) of a timm ViT state dict.

    ``architecture`` (the source's metadata) names it; without one, the Block-based timm ViT whose state dict has
    ``state``'s keys and shapes (the position embedding's grid aside, which sets img_size) is taken, and two that
    differ raise ConversionError naming both.
    """
    proj = state['patch_embed.proj.weight']
    args: Dict[str, Any] = {'num_classes': int(state['head.weight'].shape[0]) if 'head.weight' in state else 0}
    if int(proj.shape[1]) != 3:
        args['in_chans'] = int(proj.shape[1])
    if architecture:
        arch = _named_architecture(architecture)
        return arch, _vit_grid_args(source_name(arch), state, args)
    depth = len({int(k.split('.')[1]) for k in state if k.startswith('blocks.')})
    shapes = sorted((k, tuple(v.shape)) for k, v in state.items() if k != 'pos_embed')
    matches = []
    for source in vit_family.source_architectures():
        model_args = vit_family.source_model_args(source)
        if int(model_args.get('depth', 12)) != depth or int(model_args.get('embed_dim', 768)) != proj.shape[0] \
                or int(model_args.get('patch_size', 16)) != proj.shape[-1]:
            continue
        if sorted(kv for kv in _family_shapes(source, args['num_classes'], args.get('in_chans', 3))
                  if kv[0] != 'pos_embed') == shapes:
            try:  # and a position embedding for a square grid after its prefix tokens (with a class token or not)
                matches.append((source, _vit_grid_args(source, state, args)))
            except ConversionError:
                pass
    if not matches:
        raise ConversionError(f'unsupported architecture: a ViT of depth {depth}, width {proj.shape[0]} and patch '
                              f'{proj.shape[-1]} whose keys and shapes match no Block-based timm ViT; name it with '
                              f'arch')
    # ViTs that differ only in resolution (vit_base_patch16_224, _384) have the same weights but the position
    # embedding: the first in timm's order is taken, and img_size follows the position embedding
    if len({_without_resolution(m) for m, _ in matches}) > 1:
        names = ', '.join(m for m, _ in matches[:6])
        raise ConversionError(f'the checkpoint matches several timm ViTs ({names}) by its keys and shapes; name one '
                              f'with arch')
    return momentum_name(matches[0][0]), matches[0][1]


def _without_resolution(source: str) -> Tuple[Tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in vit_family.source_model_args(source).items() if k != 'img_size'))


@functools.lru_cache(maxsize=256)
def _family_shapes(source: str, num_classes: int, in_chans: int) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """The state-dict keys and shapes of timm's ``source`` (built on the meta device)."""
    import timm

    network = timm.create_model(source, num_classes=num_classes, in_chans=in_chans, device='meta')
    return tuple((k, tuple(v.shape)) for k, v in network.state_dict().items())


def family_architecture(state: Dict[str, torch.Tensor], layers: Sequence[int], args: Dict[str, Any]) -> Optional[str]:
    """The timm ResNet-family architecture whose state dict has exactly ``state``'s keys and shapes, or None.

    Architectures that differ only in parameter-free anti-aliasing (resnet50, resnetaa50 and resnetblur50 have
    the same keys) cannot be told apart by their weights: the one without anti-aliasing is taken, and the others
    need ``arch``. Two matches that differ otherwise raise ConversionError naming both.
    """
    shapes = sorted((k, tuple(v.shape)) for k, v in state.items())
    matches = [source for source in source_architectures()
               if tuple(source_model_args(source)['layers']) == tuple(layers)
               and sorted(_family_shapes(source, args['num_classes'], args.get('in_chans', 3))) == shapes]
    plain = [source for source in matches if source_model_args(source).get('aa_layer') is None]
    if len(plain) > 1:
        raise ConversionError(f'the checkpoint matches several timm architectures ({", ".join(plain)}) by its '
                              f'keys and shapes; name one with arch')
    return (plain or matches or [None])[0]


def _described_architecture(state: Dict[str, torch.Tensor], block_fn: str, layers: Sequence[int],
                            args: Dict[str, Any], cifar: bool) -> Tuple[str, Dict[str, Any]]:
    """A plain-depth momentum architecture with the stem and downsampling options that ``state`` has."""
    if 'layer1.0.conv1.weight' not in state or 'layer1.0.conv2.weight' not in state:
        raise ConversionError('unsupported architecture: blocks without conv1/conv2 weights (selective-kernel or '
                              'other custom blocks) match no architecture of timm\'s ResNet family')
    block = 'bottleneck' if 'layer1.0.conv3.weight' in state else 'basic'
    depth = _DEPTHS.get((block, tuple(layers)))
    if depth is None:
        raise ConversionError(f'unsupported architecture: {block} blocks per stage {tuple(layers)} match no '
                              f'architecture of timm\'s ResNet family by keys and shapes, and no '
                              f'ResNet-18/34/50/101/152 with another stem')
    conv2 = state['layer1.0.conv2.weight']
    if state['layer1.0.conv1.weight'].shape[0] != 64 or conv2.shape[1] != conv2.shape[0]:
        raise ConversionError('unsupported architecture: grouped or widened blocks that match no architecture of '
                              'timm\'s ResNet family by keys and shapes')
    args = dict(args)
    if 'conv1.0.weight' in state:
        first, second = state['conv1.0.weight'].shape[0], state['conv1.3.weight'].shape[0]
        args.update(stem_type='deep_tiered' if first != second else 'deep', stem_width=int(second))
    if 'layer2.0.downsample.2.weight' in state:
        args['avg_down'] = True
    arch = f'momentum_resnet{depth}' if block_fn == 'dropin' else f'momentum_mresnet{depth}'
    if cifar:
        arch = f'momentum_mresnet{depth}_cifar'
        args['cifar_stem'] = True
        if block_fn == 'dropin':
            args['block_fn'] = 'dropin'
    return arch, args


def _with_batch_counters(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Add the BatchNorm ``num_batches_tracked`` counters older torchvision checkpoints lack (as 0, as torch does)."""
    counters = {k: v for k, v in model.state_dict().items() if k.endswith('.num_batches_tracked') and k not in state}
    if counters and any(k[:-len('num_batches_tracked')] + 'running_mean' in state for k in counters):
        return {**state, **{k: torch.zeros_like(v) for k, v in counters.items()}}
    return state


def strict_json(data: Any) -> str:
    """JSON that strict parsers accept: NaN and infinities become null."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False, default=str)


def _check_finite(state: Dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConversionError(f'{key} holds NaN or inf values')


def _load_strict(model: nn.Module, state: Dict[str, torch.Tensor], arch: str) -> None:
    expected = resnet_state_dict(model.state_dict())  # the source's record, if any, was read apart
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape:
            raise ConversionError(f'shape mismatch for {key}: checkpoint {tuple(value.shape)}, '
                                  f'{arch} {tuple(expected[key].shape)}')
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f'checkpoint does not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}')
    model.load_state_dict(state, strict=True)


def _verify(model: nn.Module, plain: Optional[nn.Module], block_fn: str, input_size: Tuple[int, ...]) -> Dict[str, Any]:
    """Parameter and buffer counts, and the gamma = 0 equivalence with the plain ResNet ``plain`` on a random batch."""
    torch.manual_seed(0)
    x = torch.randn(2, *input_size)
    report: Dict[str, Any] = {
        'num_params': sum(p.numel() for p in model.parameters()),
        'num_buffers': sum(b.numel() for b in model.buffers()),
        'input_size': list(input_size),
    }
    if block_fn == 'dropin' and plain is not None:
        diff = float((_logits_at(model, x, 0.0) - _logits_at(plain, x)).abs().max())
        report['equivalence'] = {'max_abs_logit_diff_gamma0': diff, 'tolerance': EQUIVALENCE_TOL,
                                 'passed': diff <= EQUIVALENCE_TOL, 'input': 'synthetic random normal, 2 images'}
    else:
        report['equivalence'] = {'skipped': 'no plain timm ResNet has this block function and stem'}
    return report


def _plain_arch(arch: str) -> str:
    """The timm ResNet a momentum architecture has the blocks of: momentum_resnet50 and momentum_mresnet50 -> resnet50,
    momentum_resnet50d -> resnet50d."""
    if arch.startswith('momentum_mresnet'):
        return 'resnet' + arch[len('momentum_mresnet'):].split('_')[0]
    return source_name(arch)


def _plain_args(model_args: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in model_args.items() if k not in ('gamma', 'block_fn', 'memory_efficient', 'cifar_stem')}


def _plain_resnet(arch: str, model_args: Dict[str, Any], state: Dict[str, torch.Tensor]) -> Optional[nn.Module]:
    """The plain timm ResNet with the converted net's blocks, holding ``state``; None with the CIFAR stem, which
    timm has no plain model for."""
    if model_args.get('cifar_stem'):
        return None
    import timm

    network = timm.create_model(_plain_arch(arch), **_plain_args(model_args))
    network.load_state_dict(state, strict=True)
    return network.eval()


def _source_network(checkpoint: SourceCheckpoint, state: Dict[str, torch.Tensor], arch: str, model_args: Dict[str, Any],
                    source_gamma: List[float], plain: Optional[nn.Module]) -> Tuple[nn.Module, str]:
    """The source as the network it is, with its weights, and what that network is (for verify.json and the card).

    A timm/torchvision checkpoint is a plain timm ResNet; one with the CIFAR stem, which timm has no plain model
    for, is the drop-in momentum model at gamma 0 with that stem, which computes the plain ResNet's blocks bit for
    bit. The official momentumnet layouts are that package's momentum networks at the gamma they were trained at
    (``source_gamma``), with their own block function. ``plain`` is the plain ResNet (``_plain_resnet``), if built.
    """
    import timm

    if checkpoint.layout == 'timm' and plain is not None:
        return plain, f'the source {_family_words(network_kind(arch))[1]}, run as timm {_plain_arch(arch)}'
    if checkpoint.layout == 'timm':
        network = timm.create_model(arch, **{**model_args, 'gamma': 0.0, 'block_fn': 'dropin'})
        what = 'the source ResNet with the CIFAR stem (timm has no plain model for it: the drop-in momentum model at gamma 0)'
    else:
        network = timm.create_model(arch, **{**model_args, 'gamma': source_gamma, 'block_fn': checkpoint.block_fn})
        what = (f'the source {checkpoint.layout} model at its gamma {_format_gamma(source_gamma)}, as timm-momentum '
                f'computes it')
    network.load_state_dict(state, strict=True)
    return network.eval(), what


def _format_gamma(gammas: List[float]) -> str:
    """Per-stage gammas for people: one number when all stages share it, else the tuple."""
    return f'{gammas[0]:g}' if len(set(gammas)) == 1 else '(' + ', '.join(f'{g:g}' for g in gammas) + ')'


def _logits_at(model: nn.Module, images: torch.Tensor, gamma: Optional[GammaSpec] = None,
               batch_size: int = 32) -> torch.Tensor:
    """The eval-mode logits of ``model`` on ``images`` (at ``gamma`` when given), in batches."""
    model.eval()
    if gamma is not None:
        model.set_momentum(gamma=gamma)
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _drift_images(spec: Optional[str], heal_images: Optional[str], input_size: Tuple[int, ...]) -> Tuple[torch.Tensor, str]:
    """The images drift is measured on, and what they are: real ones when given, else 2 of random noise."""
    if spec is None:
        torch.manual_seed(0)
        return torch.randn(2, *input_size), 'synthetic random normal, 2 images'
    role = 'healing images' if spec == heal_images else 'evaluation images'
    images = load_images(spec, input_size[0], input_size[-1], limit=DRIFT_IMAGES, split='validation', role=role)
    if spec in HELD_OUT_SPLITS:
        where = 'the held-out split, not the healing images'
    else:
        where = 'the healing images' if spec == heal_images else 'not the healing images'
    return images, f'{spec} ({where}), {len(images)} images'


def _drift(at_gamma: torch.Tensor, reference: torch.Tensor, against: str, input_description: str,
           healed: bool) -> Dict[str, Any]:
    """How far the converted net's logits are from the source's; top-1 agreement and KL only on real images."""
    drift: Dict[str, Any] = {
        'against': against,
        'after_healing': healed,
        'input': input_description,
        'images': len(reference),
        'max_abs_logit_diff': float((at_gamma - reference).abs().max()),
        'relative_logit_diff': float((at_gamma - reference).norm() / reference.norm().clamp_min(1e-12)),
    }
    if not input_description.startswith('synthetic'):  # on noise, the top-1 class means nothing
        drift['top1_agreement'] = float((at_gamma.argmax(-1) == reference.argmax(-1)).float().mean())
        drift['kl_source_to_converted'] = float(nn.functional.kl_div(
            at_gamma.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction='batchmean'))
    return drift


class _CardDumper(yaml.SafeDumper):
    """YAML as Hub model cards write it: list items indented under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _card_text(value: Any) -> str:
    """A value from a source's metadata or the command line as one line of card text: no markup, no code spans."""
    return html.escape(' '.join(str(value).split())).replace('`', "'")


def network_kind(arch: str) -> str:
    """'vit' for a Momentum Vision Transformer architecture, else 'resnet'."""
    from timm.models import is_model

    if is_model(arch) and arch.startswith('momentum_') and \
            source_name(arch).split('.')[0] in vit_family.SOURCES:
        return 'vit'
    return 'resnet'


def _family_words(kind: str) -> Tuple[str, str, str, str]:
    """(the family, the source network, the chains, the chain sentence of the card) for people."""
    if kind == 'vit':
        return ('Momentum Vision Transformer', 'ViT', 'for the one chain (blocks)',
                'The transformer blocks run as one momentum chain (f(x) = block(x) − x per block, or attention and '
                'MLP as two steps with the split block function):')
    return ('Momentum ResNet', 'ResNet', 'per stage (layer1–layer4)',
            'Each ResNet stage keeps its first block; the remaining blocks follow')


def _gamma_sentence(gammas: List[float], policy: Optional[str], block_fn: str, kind: str = 'resnet') -> str:
    """What the config's gamma is and what it means for the source's function."""
    _, source_kind, chains, _ = _family_words(kind)
    if policy:
        text = (f'The config sets γ {chains} to {_format_gamma(gammas)}, chosen by the faithful '
                f'policy `{policy}`: γ = 0 where a chain stores its inputs, else the smallest γ at which the chain '
                f'still inverts exactly in training (γ^−N ≤ 2^8) while storing no more than at γ = 0.9 (a few per cent '
                f'more where γ = 0 keeps a 5-block chain\'s inputs).')
    else:
        text = f'The config sets γ = {_format_gamma(gammas)}' + (f' {chains}.' if len(set(gammas)) > 1 else '.')
    if block_fn == 'paper':
        return text + ' With the paper block function the network is not its source ResNet at any γ.'
    if all(g == 0.0 for g in gammas):
        where = 'in every stage ' if kind == 'resnet' else ''
        return text + f' At γ = 0 {where}the network computes its source {source_kind}\'s function.'
    chain = 'Stages' if kind == 'resnet' else 'Chains'
    return text + (f' {chain} at γ > 0 do not compute their source\'s function; the drift below says how far the '
                   'network is from it.')


def _model_card(arch: str, checkpoint: SourceCheckpoint, gammas: List[float], policy: Optional[str], block_fn: str,
                report: Dict[str, Any]) -> str:
    # package data: a copy of the repository's MODEL_CARD.md (tests/test_packaging.py keeps the two identical)
    template = resources.files(__package__).joinpath('MODEL_CARD.md').read_text()
    datasets = checkpoint.datasets()
    healing = report.get('healing')
    weights = 'The weights are the source\'s, unchanged.'
    if healing:
        steps = []
        images = f"{healing['num_images']} images of {_card_text(healing['images'])}"
        if healing['recalibrate_bn']:
            steps.append(f'BatchNorm statistics recalibrated at γ = {_format_gamma(gammas)} on {images}')
        if healing['distill_steps']:
            steps.append(f"distilled from the source for {healing['distill_steps']} steps on {images}")
        weights = 'The weights are the source\'s, healed: ' + '; then '.join(steps) + '.'
    drift = report['drift_at_gamma']
    kind = network_kind(arch)
    family, source_kind, _, chains = _family_words(kind)
    front_matter = {'library_name': 'timm', 'license': checkpoint.license(), 'pipeline_tag': 'image-classification',
                    'tags': ['image-classification', 'timm', 'timm-momentum', f'momentum-{kind}', 'invertible'],
                    **({'datasets': datasets} if datasets else {})}
    values = {
        'front_matter': '---\n' + yaml.dump(front_matter, Dumper=_CardDumper, sort_keys=False, allow_unicode=True) + '---',
        'model_name': arch, 'source': _card_text(checkpoint.source), 'source_layout': checkpoint.layout,
        'source_sha256': checkpoint.sha256, 'gamma': _format_gamma(gammas), 'license': checkpoint.license(),
        'datasets': ', '.join(datasets) if datasets else 'unknown (the source\'s metadata names none)',
        'weights': weights + ' ' + _gamma_sentence(gammas, policy, block_fn, kind),
        'family': family, 'source_kind': source_kind, 'chains': chains,
        'equivalence': json.dumps(report.get('equivalence')), 'against': _card_text(drift['against']),
        'drift_when': 'after healing' if healing else 'as converted', 'drift_input': _card_text(drift['input']),
        'drift': json.dumps({k: v for k, v in drift.items() if k not in ('against', 'input', 'after_healing')}),
    }
    # one pass, so that a value holding '{key}' is not filled in again
    return re.sub(r'\{(\w+)\}', lambda m: str(values.get(m.group(1), m.group(0))), template)


def _check_output(out_dir: Path, force: bool, sources: Sequence[Path] = ()) -> None:
    """Refuse an OUT that must never be replaced: '/', or a folder that is or holds the working directory or one of
    ``sources``. Then put back what an interrupted run left, and refuse a non-empty OUT unless ``force``, and even
    then unless timm-momentum wrote everything in it (its MARKER, or an earlier convert's layout)."""
    reason = protected_by(out_dir, sources)
    if reason:
        raise ConversionError(f'refusing to replace {out_dir}: {reason}')
    if out_dir.is_symlink():
        raise ConversionError(f'{out_dir} is a symbolic link; pass the folder it points to, or another --out')
    recover_interrupted_folder(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConversionError(f'{out_dir} exists and is not a folder; --force replaces only folders this tool wrote')
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise ConversionError(f'{out_dir} exists and is not empty; pass --force to replace it')
    ours = marked_files(out_dir) or _legacy_files(out_dir)
    if ours is None:
        raise ConversionError(f'{out_dir} was not written by timm-momentum (it has no {MARKER}), so --force does not '
                              f'replace it: move it away yourself, or choose another --out')
    foreign = [name for name in entries if name not in ours]
    if foreign:
        shown = ', '.join(foreign[:5]) + (f' and {len(foreign) - 5} more' if len(foreign) > 5 else '')
        raise ConversionError(f'{out_dir} holds files timm-momentum did not write ({shown}), which --force would '
                              f'delete: move them out, or choose another --out')


def _legacy_files(out_dir: Path) -> Optional[List[str]]:
    """The files of a folder an earlier convert wrote (config.json naming timm-momentum as its converter,
    model.safetensors and verify.json); None for any other folder."""
    config_path = out_dir / 'config.json'
    if not all((out_dir / name).is_file() for name in ('config.json', 'model.safetensors', 'verify.json')) \
            or config_path.stat().st_size > 1 << 20:
        return None
    try:
        converter = json.loads(config_path.read_text())['provenance']['converter']
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return list(_LEGACY_FILES) if isinstance(converter, str) and converter.startswith('timm-momentum ') else None


def _local_paths(source: str) -> List[Path]:
    """The local file or folder SOURCE names, if any: what OUT must never hold."""
    path = Path(source[len('local-dir:'):] if source.startswith('local-dir:') else source)
    return [path] if source.startswith('local-dir:') or path.exists() else []


def _locks_output(convert_fn: Callable[..., 'ConvertResult']) -> Callable[..., 'ConvertResult']:
    """Run ``convert`` holding the lock of its ``out_dir``: a second convert to the same folder at the same time
    stops with ConversionError instead of deleting the first one's files as stale."""
    signature = inspect.signature(convert_fn)

    @functools.wraps(convert_fn)
    def locked(*args: Any, **kwargs: Any) -> 'ConvertResult':
        bound = signature.bind(*args, **kwargs).arguments
        out_dir = Path(bound['out_dir'])
        reason = protected_by(out_dir, _local_paths(str(bound['source'])))  # before a lock file is made beside it
        if reason:
            raise ConversionError(f'refusing to replace {out_dir}: {reason}')
        blocking = file_in_the_way(out_dir.parent)
        if blocking is not None:
            raise ConversionError(f'cannot write {out_dir}: {blocking} is a file, not a folder')
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(folder_lock(out_dir, 'timm-momentum convert'))
            except FolderInUseError as e:
                raise ConversionError(str(e)) from None
            except OSError as e:
                raise ConversionError(f'cannot write {out_dir}: {describe_os_error(e)}; nothing was written') from None
            return convert_fn(*args, **kwargs)

    return locked


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` when it has the Hub's ORG/NAME form, else raise ConversionError."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate_repo_id

    try:
        if repo_id.count('/') != 1:
            raise HFValidationError('it needs exactly one /')
        hub_validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConversionError(f'{repo_id!r} is not a Hub repo id of the form ORG/NAME: {first_line(e)}') from None
    return repo_id


@_locks_output
def convert(source: str, out_dir: Union[str, os.PathLike], gamma: Optional[GammaSpec] = None,
            arch: Optional[str] = None, force: bool = False, push_to_hub: Optional[str] = None,
            heal_images: Optional[str] = None, recalibrate_bn: bool = False, distill_steps: int = 0,
            img_size: Optional[int] = None, eval_images: Optional[str] = None,
            source_gamma: Optional[GammaSpec] = None) -> ConvertResult:
    """Convert SOURCE into a Momentum ResNet model folder at OUT_DIR.

    Args:
        source: A local checkpoint file, ``hf-hub:ORG/NAME``, or a timm ResNet name or tag.
        out_dir: The folder to write (must not exist or be empty unless ``force``).
        gamma: The momentum stored in the model's config: a number, one per stage, or a policy name. Default:
            the faithful policy 'auto' for the drop-in block function from a timm/torchvision ResNet, the
            source's own gamma for the official momentumnet layouts and momentum checkpoints (which record it),
            and the paper's 0.9 for the paper block function from a plain ResNet.
        arch: Override the inferred momentum architecture.
        force: Replace a non-empty ``out_dir``.
        push_to_hub: Upload the folder to this Hub repo afterwards.
        heal_images: Unlabeled images for healing (``sklearn/digits``, ``torch/fashion_mnist`` or a folder).
        recalibrate_bn: Re-estimate BatchNorm statistics at the target gamma on ``heal_images``.
        distill_steps: Then distil the source into the momentum net for this many steps.
        img_size: Input resolution of verification and healing, and of the saved config (default: the source's).
        eval_images: Images to measure drift from the source on (up to DRIFT_IMAGES; default: ``heal_images``,
            its held-out split for ``sklearn/digits`` and ``torch/fashion_mnist``); without either, 2 images
            of random noise.
        source_gamma: The gamma an official momentumnet checkpoint was trained at (default 0.9, that package's
            default); a timm/torchvision ResNet is its own function and takes none, and a momentum checkpoint
            that records its gamma takes no other.

    Returns:
        The folder, architecture, model kwargs (gamma as one value per stage) and the verification report.
    """
    out_dir = Path(out_dir)
    checkpoint = _checked_source(source, out_dir, force, gamma, source_gamma, distill_steps, heal_images,
                                 recalibrate_bn, img_size, push_to_hub)
    model, arch, model_args, source_gamma = _momentum_model(checkpoint, arch, gamma, source_gamma)
    state = _with_batch_counters(checkpoint.state_dict, model)
    _load_strict(model, state, arch)
    gammas, policy, block_fn = model_args['gamma'], model.gamma_policy, model_args['block_fn']
    input_size = _input_size(model, checkpoint, model_args, img_size)
    pretrained_cfg = _converted_cfg(model, checkpoint, input_size, img_size, gammas, policy)
    # the plain ResNet, built once: the gamma = 0 equivalence check's reference and a timm source's own network
    plain = _plain_resnet(arch, model_args, state) if block_fn == 'dropin' or checkpoint.layout == 'timm' else None
    report = {**_verified(model, plain, block_fn, input_size), 'gamma': gammas, 'gamma_policy': policy}
    source_net, against = _source_network(checkpoint, state, arch, model_args, source_gamma, plain)
    drift_images, drift_input = _drift_images(eval_images or heal_images, heal_images, input_size)
    reference = _logits_at(source_net, drift_images)
    model.set_momentum(gamma=gammas)  # the equivalence check ran it at 0
    if recalibrate_bn or distill_steps:
        report['healing'] = _heal(model, source_net, heal_images, input_size, recalibrate_bn, distill_steps)
    report['drift_at_gamma'] = _drift(_logits_at(model, drift_images), reference, against, drift_input,
                                      'healing' in report)
    report['source'] = _source_report(checkpoint, source_gamma)
    labels = checkpoint.pretrained_cfg.get('label_names')
    write_model_folder(out_dir, model, model_args, pretrained_cfg,
                       {'provenance': _provenance(checkpoint, gammas, policy)},
                       _model_card(arch, checkpoint, gammas, policy, block_fn, report), force, {'verify.json': report},
                       label_names=labels if isinstance(labels, list) and len(labels) == model.num_classes else None)
    if push_to_hub:
        upload_to_hub(out_dir, push_to_hub)
    return ConvertResult(out_dir, arch, model_args, report)


def _check_arguments(gamma: Optional[GammaSpec], source_gamma: Optional[GammaSpec], distill_steps: int,
                     heal_images: Optional[str], recalibrate_bn: bool, img_size: Optional[int],
                     push_to_hub: Optional[str]) -> None:
    """Raise ConversionError naming the first of ``convert``'s arguments that is out of range."""
    for name, value in (('gamma', gamma), ('source_gamma', source_gamma)):
        try:
            if value is not None:
                parse_gamma(value)
        except ValueError as e:
            raise ConversionError(str(e) if str(e).startswith(name) else f'{name}: {e}') from None
    if distill_steps < 0:
        raise ConversionError(f'distill_steps must be >= 0, got {distill_steps}')
    if (recalibrate_bn or distill_steps) and not heal_images:
        raise ConversionError('healing (recalibrate_bn or distill_steps) needs heal_images')
    if img_size is not None and img_size < 1:
        raise ConversionError(f'img_size must be a positive number of pixels, got {img_size}')
    if img_size is not None and img_size > MAX_INPUT_SIDE:
        raise ConversionError(f'img_size {img_size} has a side over {MAX_INPUT_SIDE} px, too large to verify on')
    if push_to_hub:
        validate_repo_id(push_to_hub)


def _checked_source(source: str, out_dir: Path, force: bool, gamma: Optional[GammaSpec],
                    source_gamma: Optional[GammaSpec], distill_steps: int, heal_images: Optional[str],
                    recalibrate_bn: bool, img_size: Optional[int], push_to_hub: Optional[str]) -> SourceCheckpoint:
    """The source checkpoint with finite weights, once the arguments and the output folder are checked."""
    _check_arguments(gamma, source_gamma, distill_steps, heal_images, recalibrate_bn, img_size, push_to_hub)
    _check_output(out_dir, force, _local_paths(source))
    checkpoint = load_source(source)
    _check_finite(checkpoint.state_dict)
    return checkpoint


def _momentum_model(checkpoint: SourceCheckpoint, arch: Optional[str], gamma: Optional[GammaSpec],
                    source_gamma: Optional[GammaSpec]) -> Tuple[nn.Module, str, Dict[str, Any], List[float]]:
    """The momentum network to convert into (without weights), its architecture, its model_args with gamma per
    stage, and the gamma the source computes at."""
    import timm

    inferred, model_args = infer_architecture(checkpoint.state_dict, checkpoint.block_fn,
                                              None if arch else checkpoint.pretrained_cfg.get('architecture'))
    arch = arch or inferred
    if arch not in timm.list_models('momentum_*'):
        raise ConversionError(f'unsupported architecture {arch!r}: use a momentum architecture '
                              f'(timm.list_models("momentum_*"), {len(timm.list_models("momentum_*"))} of them)')
    block_fn = 'paper' if 'mresnet' in arch and model_args.get('block_fn') != 'dropin' else 'dropin'
    model_args = {**model_args, 'block_fn': block_fn}
    num_chains = 1 if network_kind(arch) == 'vit' else 4
    gamma, source_gammas = _conversion_gammas(checkpoint, block_fn, gamma, source_gamma, num_chains)
    try:
        model = timm.create_model(arch, **model_args, gamma=gamma)
    except ValueError as e:
        raise ConversionError(str(e) if str(e).startswith(('gamma', 'layer')) else f'gamma: {e}') from None
    model_args['gamma'] = list(model.momentum_cfg['gamma'])  # the config carries the values, whatever policy chose
    return model, arch, model_args, source_gammas


def _verified(model: nn.Module, plain: Optional[nn.Module], block_fn: str,
              input_size: Tuple[int, ...]) -> Dict[str, Any]:
    """``_verify``'s report; ConversionError when the gamma = 0 equivalence fails."""
    report = _verify(model, plain, block_fn, input_size)
    if report['equivalence'].get('passed') is False:
        raise ConversionError(f'gamma = 0 equivalence failed: max abs logit difference '
                              f'{report["equivalence"]["max_abs_logit_diff_gamma0"]:.3g} > {EQUIVALENCE_TOL}')
    return report


def _heal(model: nn.Module, source_net: nn.Module, heal_images: str, input_size: Tuple[int, ...],
          recalibrate_bn: bool, distill_steps: int) -> Dict[str, Any]:
    """Recalibrate BatchNorm and/or distil ``source_net`` into ``model`` on ``heal_images``; what was done."""
    images = load_images(heal_images, input_size[0], input_size[-1])
    if recalibrate_bn:
        recalibrate_batchnorm(model, images)
    if distill_steps:  # after recalibration: it fits the weights to the statistics the model keeps
        distill(model, source_net, images, distill_steps)
    return {'images': heal_images, 'num_images': len(images), 'recalibrate_bn': recalibrate_bn,
            'distill_steps': distill_steps}


def _source_report(checkpoint: SourceCheckpoint, source_gamma: List[float]) -> Dict[str, Any]:
    """verify.json's description of the source."""
    return {'id': checkpoint.source, 'layout': checkpoint.layout, 'revision': checkpoint.revision,
            'sha256': checkpoint.sha256, 'license': checkpoint.license(),
            'datasets': checkpoint.datasets() or 'unknown', 'gamma': source_gamma}


def _provenance(checkpoint: SourceCheckpoint, gammas: List[float], policy: Optional[str]) -> Dict[str, Any]:
    """config.json's provenance: the source, the converter and the gamma it converted at."""
    return {'source': checkpoint.source, 'layout': checkpoint.layout, 'revision': checkpoint.revision,
            'sha256': checkpoint.sha256, 'converter': f'timm-momentum {__version__}',
            'gamma': gammas, 'gamma_policy': policy}


def _conversion_gammas(checkpoint: SourceCheckpoint, block_fn: str, gamma: Optional[GammaSpec],
                       source_gamma: Optional[GammaSpec], num_chains: int = 4) -> Tuple[GammaSpec, List[float]]:
    """The gamma to convert at and the gamma the source computes at (per chain), defaults filled in."""
    official = checkpoint.layout != 'timm'
    if source_gamma is not None and not official:
        raise ConversionError(f'source_gamma: {checkpoint.source} is a {checkpoint.layout}-layout ResNet, which has '
                              f'no gamma (it is its own function); source_gamma is for the official momentumnet '
                              f'layouts')
    recorded = checkpoint.record.get('gamma')
    if recorded is not None and source_gamma is not None and \
            _stage_values(parse_gamma(source_gamma)) != _stage_values(recorded):
        raise ConversionError(f'source_gamma: {checkpoint.source} records the gamma it was trained at, '
                              f'{_format_gamma(_stage_values(recorded))}, and source_gamma says '
                              f'{_clipped(source_gamma)}; leave source_gamma out')
    if official:
        source_spec = (PAPER_GAMMA if recorded is None else recorded) if source_gamma is None \
            else parse_gamma(source_gamma)
        if isinstance(source_spec, str):
            raise ConversionError(f'source_gamma: the gamma the source was trained at, a number or one per stage, '
                                  f'not the policy {source_spec!r}')
        stages = list(_stage_values(source_spec))
        if len(stages) != 4:
            raise ConversionError(f'source_gamma: one number or one per stage (4), got {len(stages)} values')
        return (stages if gamma is None else gamma), stages
    default = 'auto' if block_fn == 'dropin' else PAPER_GAMMA
    return (default if gamma is None else gamma), [0.0] * num_chains


def _stage_values(spec: Any) -> Any:
    """A parsed gamma as one value per stage (a policy name stays a name)."""
    return [spec] * 4 if isinstance(spec, float) else spec


def _input_size(model: nn.Module, checkpoint: SourceCheckpoint, model_args: Dict[str, Any],
                img_size: Optional[int]) -> Tuple[int, ...]:
    """(channels, height, width) of the converted model's input: the source cfg's, or ``img_size`` square."""
    size = tuple({**model.pretrained_cfg, **checkpoint.pretrained_cfg}.get('input_size', (3, 224, 224)))
    if img_size is None and 'img_size' in model_args:  # a ViT's position embedding says its resolution
        img_size = int(model_args['img_size'])
    return (model_args.get('in_chans', 3),) + ((img_size, img_size) if img_size is not None else tuple(size[1:]))


def _converted_cfg(model: nn.Module, checkpoint: SourceCheckpoint, input_size: Tuple[int, ...],
                   img_size: Optional[int], gammas: List[float], policy: Optional[str]) -> Dict[str, Any]:
    """The folder's pretrained_cfg: the source's preprocessing and metadata, with what the conversion did."""
    cfg = {k: v for k, v in {**dict(model.pretrained_cfg), **checkpoint.pretrained_cfg}.items()
           if k in ('input_size', 'test_input_size', 'interpolation', 'crop_pct', 'test_crop_pct', 'crop_mode',
                    'mean', 'std', 'pool_size', 'first_conv', 'classifier', 'license', 'origin_url', 'paper_ids')}
    if checkpoint.pretrained_cfg.get('tag'):  # the source's pretrained tag: which weights these are
        cfg['tag'] = checkpoint.pretrained_cfg['tag']
    cfg['num_classes'] = model.num_classes
    cfg['license'] = checkpoint.license()  # the weights' license, not the momentum model's default
    chosen = f' (the faithful policy {policy!r})' if policy else ''
    per = 'chain' if isinstance(model, MomentumVisionTransformer) else 'stage'
    cfg['notes'] = (f'Converted by timm-momentum {__version__} from {checkpoint.source} at gamma '
                    f'{_format_gamma(gammas)} per {per}{chosen}; verify.json gives the drift from the source.')
    cfg['input_size'] = list(input_size)
    if img_size is not None:  # the source's test-time recommendations were for its own size
        for key in ('test_input_size', 'test_crop_pct', 'pool_size'):
            cfg.pop(key, None)
    return cfg


# model_args that are not the network's architecture: how it trains, or what the caller left to a default
_RUNTIME_ARGS = ('memory_efficient', 'checkpoint_transitions', 'default_gamma', 'default_block_fn')
# what a folder's pretrained_cfg takes from the model's own when the caller does not give it
_CFG_FROM_MODEL = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'first_conv', 'classifier',
                   'license')


def safetensors_metadata(model: nn.Module) -> Dict[str, str]:
    """The metadata of a momentum model's ``model.safetensors``: timm's architecture and the momentum settings the
    weights are trained at, so that the bare file says what it holds (the state dict records them too,
    ``RECORD_KEYS``, which is what loading reads)."""
    metadata = {'format': 'pt'}
    architecture = getattr(model, 'pretrained_cfg', {}).get('architecture')
    if architecture:
        metadata['architecture'] = architecture
    momentum_cfg = getattr(model, 'momentum_cfg', None)
    if momentum_cfg:
        metadata[GAMMA_KEY] = json.dumps(list(momentum_cfg['gamma']))
        metadata[BLOCK_FN_KEY] = momentum_cfg['block_fn']
    return metadata


def folder_config(model: nn.Module, model_args: Dict[str, Any], pretrained_cfg: Dict[str, Any],
                  data_config: Optional[Dict[str, Any]] = None, label_names: Optional[Sequence[str]] = None,
                  extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A model folder's config.json, laid out by timm's own ``save_config_for_hf``, with the momentum entries.

    ``pretrained_cfg`` describes the weights (filled from the model's for the keys it lacks, ``_CFG_FROM_MODEL``);
    ``data_config`` the preprocessing they were trained with (input_size, mean, std, crop_pct, interpolation),
    which replaces the cfg's. ``model_args`` (gamma per stage, block_fn, stem options) rebuild the network; how it
    trains (memory_efficient) is not recorded, and neither is ``num_classes`` there: the root holds it, and
    transformers passes its own to ``timm.create_model`` beside model_args.
    """
    import tempfile

    from timm.models._hub import save_config_for_hf  # what timm.models.save_for_hf writes config.json with

    saved_cfg = model.pretrained_cfg
    architecture = saved_cfg.get('architecture') or type(model).__name__
    # the preprocessing goes in as the weights' cfg, which every timm version's save_config_for_hf copies
    cfg = {'architecture': architecture, **{k: saved_cfg[k] for k in _CFG_FROM_MODEL if k in saved_cfg},
           **pretrained_cfg, **(data_config or {})}
    cfg.setdefault('input_size', (3, 224, 224))
    reduction = model.feature_info[-1]['reduction'] if getattr(model, 'feature_info', None) else None
    if reduction and 'pool_size' not in pretrained_cfg:  # the head's input for this input size
        cfg['pool_size'] = tuple(-(-side // reduction) for side in cfg['input_size'][1:])
    model_config = {'label_names': list(label_names)} if label_names else {}
    model.pretrained_cfg = cfg
    try:
        with tempfile.TemporaryDirectory() as tmp:
            save_config_for_hf(model, str(Path(tmp) / 'config.json'), model_config=model_config,
                               model_args=dict(model_args))
            config = json.loads((Path(tmp) / 'config.json').read_text())
    except ValueError as e:  # a model argument JSON cannot hold
        raise ConversionError(f'cannot describe {architecture} in config.json: {e}') from None
    finally:
        model.pretrained_cfg = saved_cfg
    config['model_args'] = {k: v for k, v in config.get('model_args', {}).items()
                            if k not in _RUNTIME_ARGS and k != 'num_classes'}
    return {**config, **(extra or {})}


def write_model_folder(out_dir: Union[str, os.PathLike], model: nn.Module, model_args: Dict[str, Any],
                       pretrained_cfg: Dict[str, Any], extra: Optional[Dict[str, Any]] = None,
                       card: Optional[str] = None, force: bool = True,
                       reports: Optional[Dict[str, Any]] = None, data_config: Optional[Dict[str, Any]] = None,
                       label_names: Optional[Sequence[str]] = None) -> Path:
    """Write a model folder that timm and transformers load (config.json, model.safetensors, README.md),
    atomically.

    Args:
        model_args, pretrained_cfg, data_config, label_names: What config.json records (``folder_config``).
        extra: More top-level config.json entries (provenance, metrics).
        card: The README.md model card (default: a title).
        force: Replace a non-empty ``out_dir``.
        reports: More JSON files by name, e.g. ``{'verify.json': report}``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    _check_output(out_dir, force)
    config = folder_config(model, model_args, pretrained_cfg, data_config, label_names, extra)

    def write(folder: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(folder / 'model.safetensors'), metadata=safetensors_metadata(model))
        (folder / 'config.json').write_text(strict_json(config))
        for name, report in (reports or {}).items():
            (folder / name).write_text(strict_json(report))
        (folder / 'README.md').write_text(card or f'---\nlibrary_name: timm\npipeline_tag: image-classification\n'
                                                  f'---\n\n# {config["architecture"]}\n')
        write_marker(folder, f'timm-momentum {__version__}')

    try:
        write_folder_atomically(out_dir, write)
    except OSError as e:
        raise ConversionError(f'cannot write {out_dir}: {describe_os_error(e)}; nothing was written') from None
    return out_dir


def plan_upload(out_dir: Union[str, os.PathLike], repo_id: str) -> Dict[str, Any]:
    """What ``upload_to_hub`` would upload: the repo id and the folder's files (not the local MARKER)."""
    validate_repo_id(repo_id)
    files = sorted(p.name for p in Path(out_dir).iterdir() if p.is_file() and p.name != MARKER)
    missing = {'config.json', 'model.safetensors', 'README.md'} - set(files)
    if missing:
        raise ConversionError(f'{out_dir} is not a complete model folder: missing {sorted(missing)}')
    return {'repo_id': repo_id, 'folder': str(out_dir), 'files': files}


def upload_to_hub(out_dir: Union[str, os.PathLike], repo_id: str, api: Any = None) -> Dict[str, Any]:
    """Upload a converted folder with huggingface_hub; the local folder stays complete either way."""
    plan = plan_upload(out_dir, repo_id)
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=plan['folder'], repo_id=repo_id, commit_message='Upload Momentum ResNet',
                          ignore_patterns=[MARKER])
    except Exception as e:
        raise ConversionError(f'upload to {repo_id} failed ({first_line(e)}); '
                              f'the converted folder {out_dir} is complete and can be uploaded later') from None
    return plan


def run_cli(args: argparse.Namespace) -> int:
    """``timm-momentum convert`` with its parsed arguments (``timm_momentum_cli``); the exit code."""
    try:
        result = convert(args.source, args.out, gamma=args.gamma, arch=args.arch, force=args.force,
                         push_to_hub=args.push_to_hub, heal_images=args.heal_images,
                         recalibrate_bn=args.recalibrate_bn, distill_steps=args.distill_steps, img_size=args.img_size,
                         eval_images=args.eval_images, source_gamma=args.source_gamma)
    except ConversionError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    policy = result.verify.get('gamma_policy')
    print(f"wrote {result.out_dir} ({result.arch}, gamma {_format_gamma(result.model_args['gamma'])} per stage"
          f"{f', policy {policy}' if policy else ''})")
    print(json.dumps(result.verify, indent=2))
    return 0
