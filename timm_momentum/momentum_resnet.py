"""Deprecated: moved to ``timm_momentum.core.models.momentum_resnet``."""
from ._moved import alias

alias(globals(), 'timm_momentum.core.models.momentum_resnet')
