"""Deprecated: moved to ``timm_momentum.core.kernels``."""
from ._moved import alias

alias(globals(), 'timm_momentum.core.kernels')
