"""Deprecated: moved to ``timm_momentum.tools.data``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.data')
