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
import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model, register_notrace_module
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..chain import BlockFn, check_invertible, checkpoint_blocks, dropin_fn, faithful_gamma, momentum_chain
from ..chain import PAPER_GAMMA, register_deterministic, validate_gamma
from ..kernels import forward_step

__all__ = ['MomentumResNet', 'MomentumStage', 'residual_branch', 'BLOCK_FNS', 'GammaSpec', 'GAMMA_POLICIES',
           'GAMMA_KEY', 'BLOCK_FN_KEY', 'RECORD_KEYS', 'parse_gamma', 'resolve_gamma', 'read_record',
           'resnet_state_dict']

PAPER = 'arXiv:2102.07870'
# The state-dict entries that record the momentum settings the weights were trained at, so that every way of
# saving and loading a state dict (timm's load_checkpoint and pretrained_cfg_overlay=dict(file=...), train.py's
# checkpoints, a bare model.safetensors, transformers) carries them: gamma per stage (float64) and the block
# function's name (ASCII, zero-padded to BLOCK_FN_BYTES, uint8). They come after the ResNet's keys, and a state
# dict without them (a plain ResNet's) still loads with strict=True.
GAMMA_KEY, BLOCK_FN_KEY = 'momentum_gamma', 'momentum_block_fn'
RECORD_KEYS = (GAMMA_KEY, BLOCK_FN_KEY)
BLOCK_FN_BYTES = 8


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

# gamma: one number for every stage, one number per stage, or the name of a policy that picks one per stage
GammaSpec = Union[float, Sequence[float], str]
# The faithful policy: per stage, the gamma closest to the source ResNet's function at which the chain still trains
# memory-efficiently and exactly, storing no more than at gamma 0.9, or a few per cent more to keep the source's
# function (``invertible.faithful_gamma``): 0 where a chain stores its inputs, and there the net is the source,
# exactly. Measured to hold for float32 and half-precision training alike, so one policy serves both.
GAMMA_POLICIES = ('auto',)


def parse_gamma(gamma: GammaSpec, stage_names: Optional[Sequence[str]] = None) -> Union[float, List[float], str]:
    """Check the form of a gamma spec and return it as a float, a list of floats or a policy name.

    Accepts a number in [0, 1), a sequence of them (one per stage), the policy name ``'auto'``, or the same
    written as text: ``'0.9'``, ``'0,0,0.036,0'``, ``'[0, 0, 0.036, 0]'``, ``'auto'``. How many stages
    there are is checked when a model resolves it (``resolve_gamma``); ``stage_names`` name the values in errors.
    """
    if isinstance(gamma, str):
        text = gamma.strip()
        if text in GAMMA_POLICIES:
            return text
        parts = [p.strip() for p in text.strip('[]()').split(',')]
        if not text or not all(parts):
            raise ValueError(f"gamma must be a number in [0, 1), one per stage, or 'auto' (the faithful policy); "
                             f'got {gamma!r}')
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"gamma must be a number in [0, 1), one per stage (comma-separated), or 'auto' (the "
                             f'faithful policy); got {gamma!r}') from None
        gamma = numbers[0] if len(numbers) == 1 and not text.startswith(('[', '(')) else numbers
    if isinstance(gamma, (list, tuple)):
        if not gamma:
            raise ValueError("gamma: an empty list; give one number, one per stage, or 'auto'")
        values = []
        for index, value in enumerate(gamma):
            try:
                values.append(validate_gamma(value))
            except ValueError as e:
                where = stage_names[index] if stage_names and index < len(stage_names) else f'stage {index + 1}'
                raise ValueError(f'gamma for {where}: {e}') from None
        return values
    if isinstance(gamma, torch.Tensor) and gamma.numel() > 1:
        return parse_gamma(gamma.tolist(), stage_names)
    return validate_gamma(gamma)


def resolve_gamma(gamma: GammaSpec, chain_lengths: Sequence[int], stage_names: Optional[Sequence[str]] = None,
                  ) -> Tuple[List[float], Optional[str]]:
    """One gamma per stage for stages whose momentum chains have ``chain_lengths`` blocks, and the policy that
    chose them (None for numbers). Raises ValueError naming the stage whose value is bad."""
    names = list(stage_names or [f'stage {i + 1}' for i in range(len(chain_lengths))])
    spec = parse_gamma(gamma, names)
    if isinstance(spec, str):
        return [faithful_gamma(n) for n in chain_lengths], spec
    if isinstance(spec, float):
        return [spec] * len(chain_lengths), None
    if len(spec) != len(chain_lengths):
        raise ValueError(f'gamma: give one number, one per stage ({len(chain_lengths)}: {", ".join(names)}), or '
                         f"'auto'; got {len(spec)} values {spec}")
    return spec, None

# timm's blocks draw random numbers only in their children (drop_block, drop_path), which are checked
# apart: a chain without those replays no RNG state in its recompute.
register_deterministic(BasicBlock, Bottleneck)


def _block_fn(name: str) -> BlockFn:
    if name not in BLOCK_FNS:
        raise ValueError(f'block_fn must be one of {sorted(BLOCK_FNS)}, got {name!r}')
    return BLOCK_FNS[name]


def read_record(state: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """The momentum settings a state dict records (``GAMMA_KEY``, ``BLOCK_FN_KEY`` under ``prefix``) as
    ``{'gamma': [per stage], 'block_fn': name}``, each only where recorded; ValueError naming a malformed entry."""
    record: Dict[str, Any] = {}
    gamma = state.get(prefix + GAMMA_KEY)
    if gamma is not None:
        if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or not gamma.is_floating_point() or \
                gamma.numel() != len(_STAGES):
            raise ValueError(f'{prefix + GAMMA_KEY}: the recorded gamma must be {len(_STAGES)} floating-point '
                             f'values, one per stage, got {gamma!r:.80}')
        record['gamma'] = parse_gamma([float(g) for g in gamma.tolist()], _STAGES)
    block_fn = state.get(prefix + BLOCK_FN_KEY)
    if block_fn is not None:
        try:
            name = bytes(block_fn.tolist()).rstrip(b'\0').decode('ascii') if isinstance(block_fn, torch.Tensor) \
                and block_fn.dtype == torch.uint8 and block_fn.dim() == 1 else None
        except (UnicodeDecodeError, ValueError):
            name = None
        if name not in BLOCK_FNS:
            raise ValueError(f'{prefix + BLOCK_FN_KEY}: the recorded block function must be the ASCII bytes of one '
                             f'of {sorted(BLOCK_FNS)}, got {block_fn!r:.80}')
        record['block_fn'] = name
    return record


def resnet_state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` without the momentum record (``RECORD_KEYS``, under any prefix): what a plain timm ResNet loads
    with strict=True. Only at gamma 0 with the drop-in block function does that ResNet compute the same function."""
    return {k: v for k, v in state.items() if k.rpartition('.')[2] not in RECORD_KEYS}


def _block_fn_bytes(name: str) -> List[int]:
    return list(name.encode('ascii').ljust(BLOCK_FN_BYTES, b'\0'))


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


@contextlib.contextmanager
def _naming_stage(name: str) -> Iterator[None]:
    """Prefix a refused setting's error with the stage it was refused for."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f'{name}: {e}') from None


class MomentumResNet(ResNet):
    """timm's ResNet whose stages run the momentum rule of Sander et al. (2021, arXiv:2102.07870).

    Accepts every ``timm.models.resnet.ResNet`` argument, plus the momentum ones below.
    """
    __jit_unused_properties__ = ['stages']

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
        self.momentum_chosen = {'gamma': gamma is not None, 'block_fn': block_fn is not None}
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
        gammas, self.gamma_policy = resolve_gamma(gamma, [len(getattr(self, n)) - 1 for n in _STAGES], _STAGES)
        for name, stage_gamma in zip(_STAGES, gammas):
            with _naming_stage(name):
                stage = MomentumStage(*getattr(self, name), gamma=stage_gamma, block_fn=block_fn,
                                      memory_efficient=memory_efficient, checkpoint_first=checkpoint_transitions)
            setattr(self, name, stage)
        self.momentum_cfg = dict(gamma=gammas, block_fn=block_fn, memory_efficient=memory_efficient)
        # the record as buffers, which loaders that set tensors by name (transformers) fill too; the state-dict
        # hook writes them after the ResNet's keys, from momentum_cfg's exact values (model.half() casts buffers)
        device = next(self.parameters()).device  # where timm's device= put the network (meta included)
        self.register_buffer(GAMMA_KEY, torch.tensor(gammas, dtype=torch.float64, device=device))
        self.register_buffer(BLOCK_FN_KEY, torch.tensor(_block_fn_bytes(block_fn), dtype=torch.uint8, device=device))
        # register_state_dict_post_hook is the public name; torch versions without it have _register_state_dict_hook
        (getattr(self, 'register_state_dict_post_hook', None) or self._register_state_dict_hook)(_record_momentum)

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
    def set_momentum(self, gamma: Optional[GammaSpec] = None, block_fn: Optional[str] = None,
                     memory_efficient: Optional[bool] = None) -> None:
        """Change gamma (a number, one per stage, or a policy name), the block function or the memory mode of
        every stage; None keeps a value.

        Every stage is checked before any changes, so a refused setting leaves the model as it was.
        """
        gammas: List[Optional[float]] = [None] * len(_STAGES)
        policy = self.gamma_policy
        if gamma is not None:
            gammas, policy = resolve_gamma(gamma, [len(stage) - 1 for stage in self.stages], _STAGES)
        settings = []
        for name, stage, stage_gamma in zip(_STAGES, self.stages, gammas):
            with _naming_stage(name):
                settings.append(stage.check_momentum(stage_gamma, block_fn, memory_efficient))
        for stage, setting in zip(self.stages, settings):
            stage.apply_momentum(*setting)
        self.gamma_policy = policy
        self.momentum_cfg = dict(gamma=[stage.gamma for stage in self.stages], block_fn=self.layer1.block_fn,
                                 memory_efficient=self.layer1.memory_efficient)
        with torch.no_grad():
            getattr(self, GAMMA_KEY).copy_(torch.tensor(self.momentum_cfg['gamma'], dtype=torch.float64))
            getattr(self, BLOCK_FN_KEY).copy_(torch.tensor(_block_fn_bytes(self.momentum_cfg['block_fn']),
                                                           dtype=torch.uint8))
        self.momentum_chosen = {'gamma': self.momentum_chosen['gamma'] or gamma is not None,
                                'block_fn': self.momentum_chosen['block_fn'] or block_fn is not None}

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        """Load as timm's ResNet does; where the state dict records momentum settings (``RECORD_KEYS``), take
        those the caller left at their defaults, and warn where a chosen one differs. A plain ResNet's state
        dict, which records none, leaves the settings as they are."""
        try:
            record = read_record(state_dict, prefix)
        except ValueError as e:
            record = {}
            error_msgs.append(str(e))
        for key in RECORD_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[:] = [k for k in missing_keys if k not in {prefix + key for key in RECORD_KEYS}]
        if record:
            try:
                self._take_record(record)
            except ValueError as e:
                error_msgs.append(f'the weights record gamma {record.get("gamma")} and block_fn '
                                  f'{record.get("block_fn")!r}, which this model cannot take: {e}')

    def _take_record(self, record: Dict[str, Any]) -> None:
        """Set what a state dict records where the caller chose nothing; warn, keeping the choice, where the
        caller chose another value."""
        taken = {}
        for name, recorded in record.items():
            current = self.momentum_cfg[name]
            if recorded == current:
                continue
            if self.momentum_chosen[name]:
                warnings.warn(f'{self.pretrained_cfg.get("architecture", type(self).__name__)}: the weights were '
                              f'trained at {name} {recorded} (recorded in their state dict), but {name} {current} '
                              f'was given; keeping {current}. Give no {name} to use the recorded one.', stacklevel=5)
            else:
                taken[name] = recorded
        if taken:
            chosen = dict(self.momentum_chosen)
            self.set_momentum(**taken)
            self.momentum_chosen = chosen  # taken from the weights, not chosen: the next weights may record another

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


@torch.jit.ignore
def _record_momentum(model: 'MomentumResNet', state: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict hook: the model's gamma per stage and block function (``RECORD_KEYS``), exact whatever
    dtype its buffers were cast to, after the ResNet's keys."""
    device = getattr(model, GAMMA_KEY).device
    state[prefix + GAMMA_KEY] = torch.tensor(model.momentum_cfg['gamma'], dtype=torch.float64, device=device)
    state[prefix + BLOCK_FN_KEY] = torch.tensor(_block_fn_bytes(model.momentum_cfg['block_fn']), dtype=torch.uint8,
                                                device=device)
    if hasattr(state, 'move_to_end'):
        for key in RECORD_KEYS:
            state.move_to_end(prefix + key)


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
