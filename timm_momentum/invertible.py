"""Deprecated: moved to ``timm_momentum.core.chain``."""
from ._moved import alias

alias(globals(), 'timm_momentum.core.chain')
