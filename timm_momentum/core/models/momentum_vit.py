"""Momentum Vision Transformers for timm.

Sander, Ablin, Blondel, Peyré, "Momentum Residual Neural Networks", ICML 2021, arXiv:2102.07870.

A Vision Transformer's blocks all keep the token shape, so they run as one momentum chain, with the velocity
0 at its start::

    v <- gamma * v + (1 - gamma) * f(x);   x <- x + v

Two block functions f:
  * ``'dropin'``: f(x) = block(x) - x, one chain step per timm ``Block``. With gamma = 0 the network is the
    source ViT, bit for bit.
  * ``'split'``: attention and MLP as two steps, f the residual branch itself
    (``drop_path1(ls1(attn(norm1(x))))``, then ``drop_path2(ls2(mlp(norm2(x))))``), so a depth-12 ViT is a
    24-step chain. With gamma = 0 this too is the source ViT's arithmetic.

At gamma = 0 both are the source; at the faithful gamma (``chain.faithful_gamma``: 0.63 for 12 steps, 0.794 for
24) they differ from it in different ways, and which keeps a pretrained ViT's function better is measured
(benchmarks/fidelity_vit.py, benchmarks/RESULTS.md): the drop-in f is the default.

The models are timm's own ``VisionTransformer`` with only ``blocks`` replaced by ``MomentumBlocks``, which keeps
the blocks as its children ('0', '1', ...): every parameter and buffer keeps its timm name, so ViT state dicts
(timm's pretrained weights included) load with strict=True. The momentum record (``momentum_model.RECORD_KEYS``,
one gamma for the one chain) comes after the ViT's keys.
"""
import functools
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import GluMlp, LayerScale, Mlp, RmsNorm, SwiGLU
from timm.models import register_notrace_module
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..chain import BlockFn, check_invertible, dropin_fn, momentum_chain, PAPER_GAMMA, register_deterministic
from ..chain import validate_gamma
from ..kernels import forward_step
from .momentum_model import GammaSpec, MomentumModel, naming_chain, parse_gamma, register_block_fns, resolve_gamma

__all__ = ['MomentumVisionTransformer', 'MomentumBlocks', 'Branch', 'VIT_BLOCK_FNS', 'CHAIN_NAME']

CHAIN_NAME = 'blocks'  # the one chain's name, in errors and as the model's attribute
VIT_BLOCK_FNS = ('dropin', 'split')
register_block_fns(*VIT_BLOCK_FNS)
_BRANCH_PARTS = (('norm1', 'attn', 'ls1', 'drop_path1'), ('norm2', 'mlp', 'ls2', 'drop_path2'))


class Branch(nn.Module):
    """One residual branch of a timm ``Block`` as a chain step of its own: ``drop_path(ls(fn(norm(x))))``.

    It holds the block's own modules (not copies), and is not part of the model's module tree: the block
    stays the owner of its parameters and their names.
    """

    def __init__(self, norm: nn.Module, fn: nn.Module, ls: nn.Module, drop_path: nn.Module, attention: bool) -> None:
        super().__init__()
        self.norm, self.fn, self.ls, self.drop_path = norm, fn, ls, drop_path
        self.attention = attention

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if self.attention and (attn_mask is not None or is_causal):
            return self.drop_path(self.ls(self.fn(self.norm(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self.drop_path(self.ls(self.fn(self.norm(x))))


# timm's ViT modules draw random numbers only in their children (attn_drop, proj_drop, drop_path), which are
# checked apart: a chain without those replays no RNG state in its recompute.
register_deterministic(Block, Attention, Branch, LayerScale, Mlp, GluMlp, SwiGLU, RmsNorm)


def _branch_fn(branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) for the split block function: the residual branch itself."""
    return branch(x)


def _masked_dropin_fn(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
    return block(x, attn_mask=attn_mask, is_causal=is_causal) - x


def _masked_branch_fn(branch: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
    return branch(x, attn_mask=attn_mask, is_causal=is_causal)


def _check_block_fn(name: str) -> str:
    if name not in VIT_BLOCK_FNS:
        raise ValueError(f'block_fn must be one of {list(VIT_BLOCK_FNS)} for a Vision Transformer, got {name!r}')
    return name


class MomentumBlocks(nn.Sequential):
    """A ViT's blocks as one momentum chain. The blocks stay direct children ('0', '1', ...), so state-dict keys
    are those of timm's ``blocks``; slicing (``prune_intermediate_layers``) keeps the momentum settings."""

    def __init__(self, *blocks: Any, gamma: float = PAPER_GAMMA, block_fn: str = 'dropin',
                 memory_efficient: bool = False) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False
        self.apply_momentum(*self.check_momentum(gamma, block_fn, memory_efficient))

    def __getitem__(self, idx: Union[slice, int]) -> nn.Module:
        if isinstance(idx, slice):
            sliced = MomentumBlocks(OrderedDict(list(self._modules.items())[idx]), gamma=self.gamma,
                                    block_fn=self.block_fn, memory_efficient=self.memory_efficient)
            sliced.grad_checkpointing = self.grad_checkpointing
            return sliced
        return super().__getitem__(idx)

    def chain_length(self, block_fn: Optional[str] = None) -> int:
        """Steps in the chain: one per block for the drop-in f, two (attention, MLP) for the split one."""
        return len(self) * (2 if (block_fn or self.block_fn) == 'split' else 1)

    def set_momentum(self, gamma: Optional[float] = None, block_fn: Optional[str] = None,
                     memory_efficient: Optional[bool] = None) -> None:
        """Change gamma, the block function or the memory mode; None keeps the current value."""
        self.apply_momentum(*self.check_momentum(gamma, block_fn, memory_efficient))

    def check_momentum(self, gamma: Optional[float] = None, block_fn: Optional[str] = None,
                       memory_efficient: Optional[bool] = None) -> Tuple[float, str, bool]:
        """The (gamma, block_fn, memory_efficient) that ``set_momentum`` would set; raises before anything changes."""
        gamma = self.gamma if gamma is None else validate_gamma(gamma)
        block_fn = self.block_fn if block_fn is None else _check_block_fn(block_fn)
        if block_fn == 'split':
            for index, block in enumerate(self):
                missing = [name for parts in _BRANCH_PARTS for name in parts if not hasattr(block, name)]
                if missing:
                    raise ValueError(f"block_fn 'split' needs timm's pre-norm Block (norm1, attn, ls1, drop_path1, "
                                     f'norm2, mlp, ls2, drop_path2); block {index} ({type(block).__name__}) lacks '
                                     f'{", ".join(missing)}')
        if memory_efficient is None:
            memory_efficient = self.memory_efficient
        elif not isinstance(memory_efficient, bool):
            raise TypeError(f'memory_efficient must be True or False, got {memory_efficient!r}')
        if memory_efficient and len(self) > 0:
            check_invertible(gamma, self.chain_length(block_fn))
        return gamma, block_fn, memory_efficient

    def apply_momentum(self, gamma: float, block_fn: str, memory_efficient: bool) -> None:
        """Set values that ``check_momentum`` returned."""
        self.gamma, self.block_fn, self.memory_efficient = gamma, block_fn, memory_efficient

    @torch.jit.ignore
    def chain_steps(self, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                    ) -> Tuple[List[nn.Module], BlockFn]:
        """The chain's steps and the f that runs them: the blocks, or their branches (two per block)."""
        masked = attn_mask is not None or is_causal
        if self.block_fn == 'dropin':
            fn = functools.partial(_masked_dropin_fn, attn_mask=attn_mask, is_causal=is_causal) if masked else dropin_fn
            return list(self), fn
        fn = functools.partial(_masked_branch_fn, attn_mask=attn_mask, is_causal=is_causal) if masked else _branch_fn
        return self._branches(), fn

    def _branches(self) -> List[nn.Module]:
        """Two ``Branch`` steps per block, built once and rebuilt when a block's modules were replaced."""
        key = tuple(id(getattr(block, name)) for block in self for parts in _BRANCH_PARTS for name in parts)
        cached = self.__dict__.get('_branch_cache')
        if cached is None or cached[0] != key:
            branches = [Branch(*(getattr(block, name) for name in parts), attention=index == 0)
                        for block in self for index, parts in enumerate(_BRANCH_PARTS)]
            for branch in branches:
                branch.train(self.training)
            cached = (key, branches)
            self.__dict__['_branch_cache'] = cached  # outside the module tree: the blocks own these modules
        for branch in cached[1]:
            branch.training = self.training
        return cached[1]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """The chain. Training with gradients takes the memory mode and checkpointing set here; eval and no-grad
        forwards are ``forward_plain``. TorchScript compiles only ``forward_plain``."""
        if torch.jit.is_scripting():
            return self.forward_plain(x, attn_mask, is_causal)
        return momentum_blocks_forward(self, x, attn_mask, is_causal)

    def forward_plain(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
        """The chain with nothing stored or recomputed: eval, no-grad and TorchScript."""
        return self.forward_positions(x, torch.jit.annotate(List[int], []), -1, attn_mask, is_causal)[0]

    def forward_positions(self, x: torch.Tensor, take_indices: List[int], stop: int,
                          attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                          ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the first ``stop`` blocks (all for -1) in plain arithmetic (autograd stores what it needs), and return
        the position after the last and after each block in ``take_indices`` (for ``forward_intermediates``).

        The same arithmetic as the chain's training forward; the branches are spelled out again here because
        TorchScript cannot pass a module to a function.
        """
        taken: List[torch.Tensor] = []
        velocity: Optional[torch.Tensor] = None
        # the drop-in f at gamma 0: v = f(x) and x + v = block(x), so the chain is its source, bit for bit
        plain = self.block_fn == 'dropin' and self.gamma == 0.0
        for index, block in enumerate(self):
            if stop < 0 or index < stop:  # (TorchScript unrolls this loop, and has no break in unrolled loops)
                if plain:
                    x = block(x, attn_mask=attn_mask, is_causal=is_causal)
                elif self.block_fn == 'split':
                    fx = block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask,
                                                               is_causal=is_causal)))
                    x, velocity = forward_step(x, velocity, fx, self.gamma, False)
                    fx = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
                    x, velocity = forward_step(x, velocity, fx, self.gamma, False)
                else:
                    fx = block(x, attn_mask=attn_mask, is_causal=is_causal) - x
                    x, velocity = forward_step(x, velocity, fx, self.gamma, False)
                if index in take_indices:
                    taken.append(x)
        return x, taken

    def extra_repr(self) -> str:
        return f'gamma={self.gamma}, block_fn={self.block_fn!r}, memory_efficient={self.memory_efficient}'


def momentum_blocks_forward(blocks: MomentumBlocks, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                            is_causal: bool = False) -> torch.Tensor:
    """MomentumBlocks' eager forward; fx tracers record it as one call, so traced models keep its
    memory-efficient backward."""
    if not (blocks.training and torch.is_grad_enabled()) or len(blocks) == 0:
        return blocks.forward_plain(x, attn_mask, is_causal)
    steps, fn = blocks.chain_steps(attn_mask, is_causal)
    return momentum_chain(x, steps, blocks.gamma, fn, memory_efficient=blocks.memory_efficient,
                          grad_checkpointing=blocks.grad_checkpointing)


torch.fx.wrap('momentum_blocks_forward')
register_notrace_module(MomentumBlocks)


class MomentumVisionTransformer(MomentumModel, VisionTransformer):
    """timm's VisionTransformer whose blocks run as one momentum chain (Sander et al., 2021, arXiv:2102.07870).

    Accepts every ``timm.models.vision_transformer.VisionTransformer`` argument, plus the momentum ones below.
    """
    momentum_block_fns = VIT_BLOCK_FNS

    def __init__(
            self,
            *args: Any,
            gamma: Optional[GammaSpec] = None,
            block_fn: Optional[str] = None,
            default_gamma: GammaSpec = PAPER_GAMMA,
            default_block_fn: str = 'dropin',
            memory_efficient: bool = False,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            *args: Positional VisionTransformer arguments.
            gamma: Momentum in [0, 1) of the one chain, or 'auto', the faithful policy. 0 with block_fn='dropin'
                (or 'split') gives the plain ViT. None: ``default_gamma``, replaced by the gamma that loaded
                weights record; a gamma given here is kept, with a warning, where weights record another.
            block_fn: 'dropin' (f = block(x) - x, one step per block) or 'split' (attention and MLP branches as
                two steps). None: ``default_block_fn``, replaced by the one loaded weights record. (It takes the
                place of timm's own ``block_fn``, the block class: the blocks here are timm's ``Block``.)
            default_gamma: The gamma without one given or recorded ('auto' with ``pretrained=True``).
            default_block_fn: The block function without one given or recorded.
            memory_efficient: Train with the invertible chain, so stored activations do not grow with depth.
            **kwargs: Keyword VisionTransformer arguments (img_size, patch_size, embed_dim, depth, ...).
        """
        chosen = {'gamma': gamma is not None, 'block_fn': block_fn is not None}
        gamma = default_gamma if gamma is None else gamma
        block_fn = _check_block_fn(default_block_fn if block_fn is None else block_fn)
        parse_gamma(gamma, (CHAIN_NAME,))  # a malformed gamma fails before the network is built
        if not isinstance(memory_efficient, bool):
            raise TypeError(f'memory_efficient must be True or False, got {memory_efficient!r}')
        super().__init__(*args, **kwargs)
        blocks = MomentumBlocks(*self.blocks, gamma=0.0, block_fn=block_fn)
        gammas, _ = resolve_gamma(gamma, [blocks.chain_length()], (CHAIN_NAME,))
        with naming_chain(CHAIN_NAME):
            blocks.set_momentum(gammas[0], block_fn, memory_efficient)
        self.blocks = blocks
        self._init_momentum(gamma, chosen)

    @torch.jit.ignore
    def momentum_chains(self) -> List[Tuple[str, MomentumBlocks]]:
        """The one chain, over all blocks."""
        return [(CHAIN_NAME, self.blocks)]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (standard mode); the memory-efficient chain needs none."""
        super().set_grad_checkpointing(enable)
        self.blocks.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """Embeddings, the momentum chain over the blocks, then the final norm."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x, attn_mask, is_causal)
        x = self.norm(x)
        return x

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates``: the final features and the position after each block in
        ``indices``, with timm's arguments and output formats.

        The blocks run in plain arithmetic here (autograd stores what backward needs); ``forward`` and
        ``forward_features`` are the memory-efficient paths.
        """
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        stop = max_index + 1 if stop_early else len(self.blocks)
        x, intermediates = self.blocks.forward_positions(x, list(take_indices), stop, attn_mask, is_causal)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix_tokens = None
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            result: Dict[str, Any] = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates
