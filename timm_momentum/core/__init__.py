"""The core: the invertible momentum chain (``chain``), its fused kernels (``kernels``), the switches
that govern both (``config``) and the model families (``models``). Nothing here imports the tools."""
from .chain import check_invertible, dropin_fn, faithful_gamma, min_safe_gamma, momentum_chain, plan_chain
from .chain import validate_gamma
from .models import BLOCK_FNS, GAMMA_POLICIES, RECORD_KEYS, MomentumResNet, MomentumStage, parse_gamma
from .models import read_record, residual_branch, resnet_state_dict, resolve_gamma
from .models import VIT_BLOCK_FNS, MomentumBlocks, MomentumModel, MomentumVisionTransformer, source_state_dict

__all__ = [
    'BLOCK_FNS', 'GAMMA_POLICIES', 'RECORD_KEYS', 'VIT_BLOCK_FNS', 'MomentumBlocks', 'MomentumModel',
    'MomentumResNet', 'MomentumStage', 'MomentumVisionTransformer', 'check_invertible', 'dropin_fn',
    'faithful_gamma', 'min_safe_gamma', 'momentum_chain', 'parse_gamma', 'plan_chain', 'read_record',
    'residual_branch', 'resnet_state_dict', 'resolve_gamma', 'source_state_dict', 'validate_gamma',
]
