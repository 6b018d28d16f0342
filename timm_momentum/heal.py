"""Deprecated: moved to ``timm_momentum.tools.heal``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.heal')
