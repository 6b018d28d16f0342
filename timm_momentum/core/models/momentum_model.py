"""What every momentum model family shares: its gamma spec, its record in the state dict, and how it is set.

A momentum model is a timm network some of whose blocks run as momentum chains (``core.chain``): the ResNets
one chain per stage, the Vision Transformers one chain over their blocks. Each chain is a module with
``check_momentum`` / ``apply_momentum`` (what ``set_momentum`` sets), ``chain_length(block_fn)`` and the
attributes ``gamma``, ``block_fn`` and ``memory_efficient``; the model lists its chains, by name, in
``momentum_chains()``. ``MomentumModel`` then gives it, once for every family:

* ``set_momentum``: gamma (one number, one per chain, or a policy), the block function and the memory mode,
  checked on every chain before any changes;
* the record (``RECORD_KEYS``): the gamma per chain and the block function the weights compute with, as buffers
  written after the network's own keys, so that every way of saving a state dict carries them, and taken back
  on loading wherever the caller chose none.
"""
import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..chain import faithful_gamma, validate_gamma

__all__ = ['PAPER', 'GAMMA_KEY', 'BLOCK_FN_KEY', 'RECORD_KEYS', 'BLOCK_FN_BYTES', 'GammaSpec', 'GAMMA_POLICIES',
           'MomentumModel', 'parse_gamma', 'resolve_gamma', 'read_record', 'source_state_dict',
           'register_block_fns', 'naming_chain']

PAPER = 'arXiv:2102.07870'
# The state-dict entries that record the momentum settings the weights were trained at, so that every way of
# saving and loading a state dict (timm's load_checkpoint and pretrained_cfg_overlay=dict(file=...), train.py's
# checkpoints, a bare model.safetensors, transformers) carries them: gamma per chain (float64) and the block
# function's name (ASCII, zero-padded to BLOCK_FN_BYTES, uint8). They come after the network's keys, and a state
# dict without them (a plain timm network's) still loads with strict=True.
GAMMA_KEY, BLOCK_FN_KEY = 'momentum_gamma', 'momentum_block_fn'
RECORD_KEYS = (GAMMA_KEY, BLOCK_FN_KEY)
BLOCK_FN_BYTES = 8

# gamma: one number for every chain, one number per chain, or the name of a policy that picks one per chain
GammaSpec = Union[float, Sequence[float], str]
# The faithful policy: per chain, the gamma closest to the source network's function at which the chain still
# trains memory-efficiently and exactly, storing no more than at gamma 0.9, or a few per cent more to keep the
# source's function (``chain.faithful_gamma``): 0 where a chain stores its inputs, and there the net is the source,
# exactly. Measured to hold for float32 and half-precision training alike, so one policy serves both.
GAMMA_POLICIES = ('auto',)

# The block functions of every family, by name: what a record may name (each family checks its own).
_BLOCK_FN_NAMES: List[str] = []


def register_block_fns(*names: str) -> None:
    """Declare block-function names a family's models record."""
    for name in names:
        if len(name.encode('ascii')) > BLOCK_FN_BYTES:
            raise ValueError(f'block function name {name!r} is longer than {BLOCK_FN_BYTES} ASCII bytes')
        if name not in _BLOCK_FN_NAMES:
            _BLOCK_FN_NAMES.append(name)


def parse_gamma(gamma: GammaSpec, stage_names: Optional[Sequence[str]] = None) -> Union[float, List[float], str]:
    """Check the form of a gamma spec and return it as a float, a list of floats or a policy name.

    Accepts a number in [0, 1), a sequence of them (one per chain: a ResNet's stages), the policy name ``'auto'``,
    or the same written as text: ``'0.9'``, ``'0,0,0.036,0'``, ``'[0, 0, 0.036, 0]'``, ``'auto'``. How many chains
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
    """One gamma per chain for chains of ``chain_lengths`` blocks, and the policy that chose them (None for
    numbers). Raises ValueError naming the chain whose value is bad."""
    names = list(stage_names or [f'stage {i + 1}' for i in range(len(chain_lengths))])
    spec = parse_gamma(gamma, names)
    if isinstance(spec, str):
        return [faithful_gamma(n) for n in chain_lengths], spec
    if isinstance(spec, float):
        return [spec] * len(chain_lengths), None
    if len(spec) != len(chain_lengths):
        what = 'stage' if len(chain_lengths) > 1 else 'chain'
        raise ValueError(f'gamma: give one number, one per {what} ({len(chain_lengths)}: {", ".join(names)}), or '
                         f"'auto'; got {len(spec)} values {spec}")
    return spec, None


def read_record(state: Dict[str, Any], prefix: str = '', num_chains: Optional[int] = None,
                chain_names: Optional[Sequence[str]] = None, block_fns: Optional[Sequence[str]] = None,
                ) -> Dict[str, Any]:
    """The momentum settings a state dict records (``GAMMA_KEY``, ``BLOCK_FN_KEY`` under ``prefix``) as
    ``{'gamma': [per chain], 'block_fn': name}``, each only where recorded; ValueError naming a malformed entry
    (with ``num_chains``, also a gamma of another length; ``chain_names`` name a bad value's chain; ``block_fns``
    are the names the model takes, by default every registered one)."""
    record: Dict[str, Any] = {}
    gamma = state.get(prefix + GAMMA_KEY)
    if gamma is not None:
        if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1 or not gamma.is_floating_point() or \
                gamma.numel() < 1 or (num_chains is not None and gamma.numel() != num_chains):
            count = f'{num_chains} floating-point values, one per chain' if num_chains else \
                'floating-point values, one per chain'
            raise ValueError(f'{prefix + GAMMA_KEY}: the recorded gamma must be {count}, got {gamma!r:.80}')
        record['gamma'] = parse_gamma([float(g) for g in gamma.tolist()], chain_names)
    block_fn = state.get(prefix + BLOCK_FN_KEY)
    if block_fn is not None:
        try:
            name = bytes(block_fn.tolist()).rstrip(b'\0').decode('ascii') if isinstance(block_fn, torch.Tensor) \
                and block_fn.dtype == torch.uint8 and block_fn.dim() == 1 else None
        except (UnicodeDecodeError, ValueError):
            name = None
        known = sorted(block_fns or _BLOCK_FN_NAMES)
        if name not in known:
            raise ValueError(f'{prefix + BLOCK_FN_KEY}: the recorded block function must be the ASCII bytes of one '
                             f'of {known}, got {block_fn!r:.80}')
        record['block_fn'] = name
    return record


def source_state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` without the momentum record (``RECORD_KEYS``, under any prefix): what the plain timm network
    loads with strict=True. Only at gamma 0 with the drop-in block function does that network compute the same
    function."""
    return {k: v for k, v in state.items() if k.rpartition('.')[2] not in RECORD_KEYS}


def _block_fn_bytes(name: str) -> List[int]:
    return list(name.encode('ascii').ljust(BLOCK_FN_BYTES, b'\0'))


@contextlib.contextmanager
def naming_chain(name: str) -> Iterator[None]:
    """Prefix a refused setting's error with the chain (stage) it was refused for."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f'{name}: {e}') from None


class MomentumModel:
    """The momentum settings of a model whose chains ``momentum_chains()`` lists: ``set_momentum``, the record in
    the state dict and its loading. Mixed in before the timm network class (``class M(MomentumModel, ResNet)``)."""
    momentum_block_fns: Tuple[str, ...] = ()  # the block functions the model takes
    momentum_cfg: Dict[str, Any]
    momentum_chosen: Dict[str, bool]
    gamma_policy: Optional[str]

    def momentum_chains(self) -> List[Tuple[str, nn.Module]]:
        """The model's momentum chains, in order, each with its name."""
        raise NotImplementedError

    def _init_momentum(self, gamma: GammaSpec, chosen: Dict[str, bool]) -> None:
        """Once the chains are built (each at its gamma): the settings, their record as buffers, and the hook that
        writes the record. ``gamma`` is the spec the chains were built from, ``chosen`` what the caller gave."""
        self.momentum_chosen = dict(chosen)
        chains = [chain for _, chain in self.momentum_chains()]
        spec = parse_gamma(gamma)
        self.gamma_policy = spec if isinstance(spec, str) else None
        self.momentum_cfg = dict(gamma=[chain.gamma for chain in chains], block_fn=chains[0].block_fn,
                                 memory_efficient=chains[0].memory_efficient)
        # the record as buffers, which loaders that set tensors by name (transformers) fill too; the state-dict
        # hook writes them after the network's keys, from momentum_cfg's exact values (model.half() casts buffers)
        device = next(self.parameters()).device  # where timm's device= put the network (meta included)
        self.register_buffer(GAMMA_KEY, torch.tensor(self.momentum_cfg['gamma'], dtype=torch.float64, device=device))
        self.register_buffer(BLOCK_FN_KEY, torch.tensor(_block_fn_bytes(self.momentum_cfg['block_fn']),
                                                        dtype=torch.uint8, device=device))
        # register_state_dict_post_hook is the public name; torch versions without it have _register_state_dict_hook
        (getattr(self, 'register_state_dict_post_hook', None) or self._register_state_dict_hook)(_record_momentum)

    @torch.jit.ignore
    def set_momentum(self, gamma: Optional[GammaSpec] = None, block_fn: Optional[str] = None,
                     memory_efficient: Optional[bool] = None) -> None:
        """Change gamma (a number, one per chain, or a policy name), the block function or the memory mode of
        every chain; None keeps a value. A policy's gamma follows a change of block function (which may change the
        chains' lengths).

        Every chain is checked before any changes, so a refused setting leaves the model as it was.
        """
        chains = self.momentum_chains()
        names = [name for name, _ in chains]
        gammas: List[Optional[float]] = [None] * len(chains)
        policy = self.gamma_policy
        spec = gamma
        if spec is None and policy and block_fn is not None and block_fn != self.momentum_cfg['block_fn']:
            spec = policy
        if spec is not None:
            target = self.momentum_cfg['block_fn'] if block_fn is None else block_fn
            lengths = [chain.chain_length(target) for _, chain in chains]
            gammas, policy = resolve_gamma(spec, lengths, names)
        settings = []
        for (name, chain), chain_gamma in zip(chains, gammas):
            with naming_chain(name):
                settings.append(chain.check_momentum(chain_gamma, block_fn, memory_efficient))
        for (_, chain), setting in zip(chains, settings):
            chain.apply_momentum(*setting)
        self.gamma_policy = policy
        first = chains[0][1]
        self.momentum_cfg = dict(gamma=[chain.gamma for _, chain in chains], block_fn=first.block_fn,
                                 memory_efficient=first.memory_efficient)
        with torch.no_grad():
            getattr(self, GAMMA_KEY).copy_(torch.tensor(self.momentum_cfg['gamma'], dtype=torch.float64))
            getattr(self, BLOCK_FN_KEY).copy_(torch.tensor(_block_fn_bytes(self.momentum_cfg['block_fn']),
                                                           dtype=torch.uint8))
        self.momentum_chosen = {'gamma': self.momentum_chosen['gamma'] or gamma is not None,
                                'block_fn': self.momentum_chosen['block_fn'] or block_fn is not None}

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        """Load as the timm network does; where the state dict records momentum settings (``RECORD_KEYS``), take
        those the caller left at their defaults, and warn where a chosen one differs. A plain network's state
        dict, which records none, leaves the settings as they are."""
        try:
            names = [name for name, _ in self.momentum_chains()]
            record = read_record(state_dict, prefix, len(names), names, self.momentum_block_fns)
        except ValueError as e:
            record = {}
            error_msgs.append(str(e))
        for key in RECORD_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[misc]
                                      unexpected_keys, error_msgs)
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
            if 'block_fn' in taken and 'gamma' not in taken:
                taken['gamma'] = self.momentum_cfg['gamma']  # the recorded block function, at the current gamma
            self.set_momentum(**taken)
            self.momentum_chosen = chosen  # taken from the weights, not chosen: the next weights may record another


@torch.jit.ignore
def _record_momentum(model: MomentumModel, state: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict hook: the model's gamma per chain and block function (``RECORD_KEYS``), exact whatever
    dtype its buffers were cast to, after the network's keys."""
    device = getattr(model, GAMMA_KEY).device
    state[prefix + GAMMA_KEY] = torch.tensor(model.momentum_cfg['gamma'], dtype=torch.float64, device=device)
    state[prefix + BLOCK_FN_KEY] = torch.tensor(_block_fn_bytes(model.momentum_cfg['block_fn']), dtype=torch.uint8,
                                                device=device)
    if hasattr(state, 'move_to_end'):
        for key in RECORD_KEYS:
            state.move_to_end(prefix + key)
