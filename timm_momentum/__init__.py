"""timm-momentum: invertible Momentum ResNets (Sander et al., ICML 2021, arXiv:2102.07870) for timm.

Importing this package registers the ``momentum_*`` models with timm.
"""
from .invertible import check_invertible, dropin_fn, faithful_gamma, min_safe_gamma, momentum_chain, plan_chain
from .invertible import validate_gamma
from .momentum_resnet import BLOCK_FNS, GAMMA_POLICIES, MomentumResNet, MomentumStage, parse_gamma, resolve_gamma
from .momentum_resnet import RECORD_KEYS, read_record, residual_branch, resnet_state_dict

__version__ = '0.1.0'
