"""Momentum ResNets for timm.

Sander, Ablin, Blondel, Peyré, "Momentum Residual Neural Networks", ICML 2021, arXiv:2102.07870.

Each stage keeps its first block (which changes width and stride) as an ordinary block and runs the
remaining blocks as a momentum chain, with the velocity reset to 0 at every stage::

    v <- gamma * v + (1 - gamma) * f(x);   x <- x + v

Two block functions f:
  * ``'dropin'``: f(x) = block(x) - x, the whole timm block with its final activation. With
    gamma = 0 the network is the source ResNet, so pretrained ResNet weights load unchanged.
  * ``'paper'``: f is the residual branch only (no identity, no final activation), as in the
    paper's MResNet models trained from scratch.

The models are timm's own ``ResNet`` with only the stage rule changed: every timm ResNet option
works and every parameter and buffer keeps its timm name, so ResNet state dicts load with strict=True. A momentum
model's state dict adds, after those, the gamma and block function it computes with (``RECORD_KEYS``), which
loading gives back wherever the caller chose none.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model, register_notrace_module
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..chain import BlockFn, check_invertible, checkpoint_blocks, dropin_fn, momentum_chain
from ..chain import PAPER_GAMMA, register_deterministic, validate_gamma
from ..kernels import forward_step
from .momentum_model import (BLOCK_FN_KEY, GAMMA_KEY, GAMMA_POLICIES, PAPER, RECORD_KEYS, GammaSpec, MomentumModel,
                             naming_chain, parse_gamma, read_record, register_block_fns, resolve_gamma,
                             source_state_dict)

__all__ = ['MomentumResNet', 'MomentumStage', 'residual_branch', 'BLOCK_FNS', 'GammaSpec', 'GAMMA_POLICIES',
           'GAMMA_KEY', 'BLOCK_FN_KEY', 'RECORD_KEYS', 'parse_gamma', 'resolve_gamma', 'read_record',
           'resnet_state_dict']

# what a plain timm ResNet loads of a Momentum ResNet's state dict (the record left out)
resnet_state_dict = source_state_dict


def residual_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) for the paper's block function: a timm block's forward without identity and final activation."""
    if isinstance(block, Bottleneck):
        x = block.act1(block.bn1(block.conv1(x)))
        x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
        x = block.bn3(block.conv3(x))
    elif isinstance(block, BasicBlock):
        x = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
        x = block.bn2(block.conv2(x))
    else:
        raise TypeError(f'the paper block function needs a timm BasicBlock or Bottleneck, got {type(block).__name__}')
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


BLOCK_FNS: Dict[str, BlockFn] = {'dropin': dropin_fn, 'paper': residual_branch}
register_block_fns(*BLOCK_FNS)

# timm's blocks draw random numbers only in their children (drop_block, drop_path), which are checked
# apart: a chain without those replays no RNG state in its recompute.
register_deterministic(BasicBlock, Bottleneck)


def _block_fn(name: str) -> BlockFn:
    if name not in BLOCK_FNS:
        raise ValueError(f'block_fn must be one of {sorted(BLOCK_FNS)}, got {name!r}')
    return BLOCK_FNS[name]


class MomentumStage(nn.Sequential):
    """A ResNet stage: an ordinary first block, then a momentum chain over the remaining blocks.

    The blocks stay direct children ('0', '1', ...), so state-dict keys are those of a plain stage.
    """

    def __init__(self, *blocks: nn.Module, gamma: float = 0.9, block_fn: str = 'dropin',
                 memory_efficient: bool = False, checkpoint_first: bool = True) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False
        # in memory-efficient mode, recompute the first (transition) block instead of storing its activations
        self.checkpoint_first = bool(checkpoint_first)
        self.apply_momentum(*self.check_momentum(gamma, block_fn, memory_efficient))

    def set_momentum(self, gamma: Optional[float] = None, block_fn: Optional[str] = None,
                     memory_efficient: Optional[bool] = None) -> None:
        """Change gamma, the block function or the memory mode; None keeps the current value."""
        self.apply_momentum(*self.check_momentum(gamma, block_fn, memory_efficient))

    def check_momentum(self, gamma: Optional[float] = None, block_fn: Optional[str] = None,
                       memory_efficient: Optional[bool] = None) -> Tuple[float, str, bool]:
        """The (gamma, block_fn, memory_efficient) that ``set_momentum`` would set; raises before anything changes."""
        gamma = self.gamma if gamma is None else validate_gamma(gamma)
        block_fn = self.block_fn if block_fn is None else block_fn
        _block_fn(block_fn)
        if memory_efficient is None:
            memory_efficient = self.memory_efficient
        elif not isinstance(memory_efficient, bool):
            raise TypeError(f'memory_efficient must be True or False, got {memory_efficient!r}')
        if memory_efficient and len(self) > 1:
            check_invertible(gamma, len(self) - 1)
        return gamma, block_fn, memory_efficient

    def chain_length(self, block_fn: Optional[str] = None) -> int:
        """Blocks in the stage's momentum chain: every block but the first, whatever the block function."""
        return max(len(self) - 1, 0)

    def apply_momentum(self, gamma: float, block_fn: str, memory_efficient: bool) -> None:
        """Set values that ``check_momentum`` returned."""
        self.gamma, self.block_fn, self.memory_efficient = gamma, block_fn, memory_efficient

    def recomputes_first_block(self) -> bool:
        """Whether a training step recomputes the first block in backward instead of storing its activations
        (and, for layer1, the stem before it)."""
        return (self.memory_efficient and self.checkpoint_first) or self.grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the first block, then the momentum chain.

        Training with gradients takes the memory mode and checkpointing set on the stage; eval and
        no-grad forwards are ``forward_plain``. TorchScript compiles only ``forward_plain``: the
        memory-efficient and checkpointed training paths are Python-only (eager, torch.compile, fx).
        """
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        return momentum_stage_forward(self, x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's forward with nothing stored or recomputed: eval, no-grad and TorchScript.

        The same arithmetic as the training forward; ``residual_branch`` is spelled out again here
        because TorchScript cannot pass a module to a function.
        """
        velocity: Optional[torch.Tensor] = None
        # the drop-in f at gamma 0: v = f(x) and x + v = block(x), so the stage is its source, bit for bit
        plain = self.block_fn == 'dropin' and self.gamma == 0.0
        for index, block in enumerate(self):
            if index == 0 or plain:
                x = block(x)
            else:
                if self.block_fn == 'paper':
                    if hasattr(block, 'conv3'):  # Bottleneck
                        fx = block.act1(block.bn1(block.conv1(x)))
                        fx = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(fx)))))
                        fx = block.bn3(block.conv3(fx))
                    else:  # BasicBlock
                        fx = block.aa(block.act1(block.drop_block(block.bn1(block.conv1(x)))))
                        fx = block.bn2(block.conv2(fx))
                    if block.se is not None:
                        fx = block.se(fx)
                    if block.drop_path is not None:
                        fx = block.drop_path(fx)
                else:
                    fx = block(x) - x
                x, velocity = forward_step(x, velocity, fx, self.gamma, False)
        return x

    def extra_repr(self) -> str:
        return f'gamma={self.gamma}, block_fn={self.block_fn!r}, memory_efficient={self.memory_efficient}'


def momentum_stage_forward(stage: MomentumStage, x: torch.Tensor) -> torch.Tensor:
    """A MomentumStage's eager forward; fx tracers record it as one call, so traced models keep its
    memory-efficient backward."""
    if not (stage.training and torch.is_grad_enabled()) or len(stage) == 0:
        return stage.forward_plain(x)
    first, *chain = list(stage)
    if stage.recomputes_first_block():
        x = checkpoint_blocks(first, x, [first])
    else:
        x = first(x)
    return momentum_chain(
        x, chain, stage.gamma, _block_fn(stage.block_fn),
        memory_efficient=stage.memory_efficient, grad_checkpointing=stage.grad_checkpointing)


# fx tracers that trace through the stage (torchvision's by default) record one call to this function;
# timm's tracers keep the whole stage as a leaf module.
torch.fx.wrap('momentum_stage_forward')
register_notrace_module(MomentumStage)


_STAGES = ('layer1', 'layer2', 'layer3', 'layer4')


class MomentumResNet(MomentumModel, ResNet):
    """timm's ResNet whose stages run the momentum rule of Sander et al. (2021, arXiv:2102.07870).

    Accepts every ``timm.models.resnet.ResNet`` argument, plus the momentum ones below.
    """
    __jit_unused_properties__ = ['stages']
    momentum_block_fns = tuple(BLOCK_FNS)

    def __init__(
            self,
            *args: Any,
            gamma: Optional[GammaSpec] = None,
            block_fn: Optional[str] = None,
            default_gamma: GammaSpec = PAPER_GAMMA,
            default_block_fn: str = 'dropin',
            memory_efficient: bool = False,
            checkpoint_transitions: bool = True,
            cifar_stem: bool = False,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            *args: Positional ResNet arguments (block, layers).
            gamma: Momentum in [0, 1): one number for every stage, one per stage, or 'auto', the faithful
                policy (``GAMMA_POLICIES``). 0 with block_fn='dropin' gives the plain ResNet; 1 would ignore
                the chains' blocks. None: ``default_gamma``, replaced by the gamma that loaded weights record
                (``GAMMA_KEY``); a gamma given here is kept, with a warning naming both where weights record
                another.
            block_fn: 'dropin' (f = block(x) - x) or 'paper' (f = residual branch). None: ``default_block_fn``,
                replaced by the one loaded weights record, as for gamma.
            default_gamma: The gamma without one given or recorded. The drop-in ``momentum_resnet*`` models pass
                'auto' with ``pretrained=True``, the paper's 0.9 otherwise.
            default_block_fn: The block function without one given or recorded.
            memory_efficient: Train with invertible chains and checkpointed stem and stage transitions,
                so stored activations do not grow with depth.
            checkpoint_transitions: In memory-efficient mode, also recompute the stem and each stage's
                first block in backward instead of storing their activations (their shapes change, so
                they cannot be inverted). False trades memory for speed (benchmarks/RESULTS.md).
            cifar_stem: The paper's CIFAR stem: one 3x3 stride-1 conv, no max-pool.
            **kwargs: Keyword ResNet arguments (num_classes, stem_type, drop_path_rate, ...).
        """
        # what the caller chose, as against defaults: loaded weights replace defaults with what they record
        chosen = {'gamma': gamma is not None, 'block_fn': block_fn is not None}
        gamma = default_gamma if gamma is None else gamma
        block_fn = default_block_fn if block_fn is None else block_fn
        parse_gamma(gamma, _STAGES)  # a malformed gamma fails before the network is built
        _block_fn(block_fn)
        for name, flag in (('memory_efficient', memory_efficient), ('checkpoint_transitions', checkpoint_transitions),
                           ('cifar_stem', cifar_stem)):
            if not isinstance(flag, bool):
                raise TypeError(f'{name} must be True or False, got {flag!r}')
        super().__init__(*args, **kwargs)
        if cifar_stem:
            self._make_cifar_stem()
        gammas, _ = resolve_gamma(gamma, [len(getattr(self, n)) - 1 for n in _STAGES], _STAGES)
        for name, stage_gamma in zip(_STAGES, gammas):
            with naming_chain(name):
                stage = MomentumStage(*getattr(self, name), gamma=stage_gamma, block_fn=block_fn,
                                      memory_efficient=memory_efficient, checkpoint_first=checkpoint_transitions)
            setattr(self, name, stage)
        self._init_momentum(gamma, chosen)

    def _make_cifar_stem(self) -> None:
        conv = self.conv1
        if not isinstance(conv, nn.Conv2d):
            raise ValueError('cifar_stem replaces the single-conv stem; it cannot combine with a deep stem_type')
        self.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False,
                               device=conv.weight.device, dtype=conv.weight.dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info['reduction'] = max(1, info['reduction'] // 4)

    @property
    def stages(self) -> List[MomentumStage]:
        """The four stages, in order."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @torch.jit.ignore
    def momentum_chains(self) -> List[Tuple[str, MomentumStage]]:
        """The four stages, each a momentum chain after its first block, with their names."""
        return list(zip(_STAGES, self.stages))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the stem and every block (standard mode); memory-efficient chains need none."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            if isinstance(stage, MomentumStage):
                stage.grad_checkpointing = enable

    def _checkpoint_stem(self) -> bool:
        # the stem is recomputed when layer1's first block is, as that block's input
        return self.grad_checkpointing or (isinstance(self.layer1, MomentumStage)
                                           and self.layer1.recomputes_first_block())

    def _stem_modules(self) -> List[nn.Module]:
        return [self.conv1, self.bn1, self.act1, self.maxpool]

    def _stem_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self._stem_activation(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns intermediates (stem activation and each stage's output).

        Args:
            x: Input image tensor.
            indices: Take last n features if int, all if None, those listed if a sequence.
            norm: Unused (ResNets have no final norm); kept for the timm API.
            stop_early: Stop after the last requested intermediate.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.

        Returns:
            The final features and the intermediates, or only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = _take_indices(5, indices)
        x = self._stem_activation(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four momentum stages; under TorchScript, the plain forward only (no checkpointing)."""
        # fx tracers trace through this checkpoint (recording the stem's activations as stored), since
        # timm's feature extractors take the stem's act1 output as a graph node
        if not torch.jit.is_scripting() and self.training and torch.is_grad_enabled() and self._checkpoint_stem():
            x = checkpoint_blocks(self._stem, x, self._stem_modules())
        else:
            x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x


def _take_indices(num_features: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """The feature indices ``forward_intermediates`` takes, as timm reads its ``indices`` argument (None: all;
    an int n: the last n; a list: those, negative ones counted from the end), and the largest."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f'cannot take the last {indices} of {num_features} features')
        take = list(range(num_features - indices, num_features))
    else:
        take = [num_features + i if i < 0 else i for i in indices]
        if not all(0 <= i < num_features for i in take):
            raise ValueError(f'feature indices {list(indices)} out of range for {num_features} features')
    return take, max(take)


def _create_momentum_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    return build_model_with_cfg(MomentumResNet, variant, pretrained, **kwargs)


def _paper_cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'conv1', 'classifier': 'fc', 'license': 'mit', 'paper_ids': PAPER,
        'origin_url': 'https://github.com/michaelsdr/momentumnet',
        **kwargs,
    }


def _cifar_cfg(**kwargs: Any) -> Dict[str, Any]:
    return _paper_cfg(**dict(
        num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), **kwargs))


default_cfgs = generate_default_cfgs({
    **{f'momentum_mresnet{depth}': _paper_cfg() for depth in (18, 34, 50, 101, 152)},
    **{f'momentum_mresnet{depth}_cifar': _cifar_cfg() for depth in (18, 34, 50, 101, 152)},
})


@register_model
def momentum_mresnet18(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's Momentum ResNet-18 (f = residual branch), ImageNet stem."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), default_block_fn='paper')
    return _create_momentum_resnet('momentum_mresnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet34(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's Momentum ResNet-34 (f = residual branch), ImageNet stem."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), default_block_fn='paper')
    return _create_momentum_resnet('momentum_mresnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet50(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's Momentum ResNet-50 (f = residual branch), ImageNet stem."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), default_block_fn='paper')
    return _create_momentum_resnet('momentum_mresnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet101(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's Momentum ResNet-101 (f = residual branch), ImageNet stem."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3), default_block_fn='paper')
    return _create_momentum_resnet('momentum_mresnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet152(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's Momentum ResNet-152 (f = residual branch), ImageNet stem."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3), default_block_fn='paper')
    return _create_momentum_resnet('momentum_mresnet152', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet18_cifar(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's CIFAR Momentum ResNet-18: residual-branch f, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), default_block_fn='paper', cifar_stem=True,
                      num_classes=10)
    return _create_momentum_resnet('momentum_mresnet18_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet34_cifar(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's CIFAR Momentum ResNet-34: residual-branch f, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), default_block_fn='paper', cifar_stem=True,
                      num_classes=10)
    return _create_momentum_resnet('momentum_mresnet34_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet50_cifar(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's CIFAR Momentum ResNet-50: residual-branch f, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), default_block_fn='paper', cifar_stem=True,
                      num_classes=10)
    return _create_momentum_resnet('momentum_mresnet50_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet101_cifar(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's CIFAR Momentum ResNet-101: residual-branch f, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3), default_block_fn='paper', cifar_stem=True,
                      num_classes=10)
    return _create_momentum_resnet('momentum_mresnet101_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def momentum_mresnet152_cifar(pretrained: bool = False, **kwargs: Any) -> MomentumResNet:
    """The paper's CIFAR Momentum ResNet-152: residual-branch f, 3x3 stride-1 stem, no max-pool."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3), default_block_fn='paper', cifar_stem=True,
                      num_classes=10)
    return _create_momentum_resnet('momentum_mresnet152_cifar', pretrained, **dict(model_args, **kwargs))
