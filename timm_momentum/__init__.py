"""timm-momentum: invertible Momentum ResNets (Sander et al., ICML 2021, arXiv:2102.07870) for timm.

Importing this package registers the ``momentum_*`` models with timm.
"""
from .invertible import check_invertible, dropin_fn, min_safe_gamma, momentum_chain, plan_chain, validate_gamma
from .momentum_resnet import BLOCK_FNS, MomentumResNet, MomentumStage, residual_branch

__version__ = '0.1.0'
