"""Deprecated: moved to ``timm_momentum.tools.errors``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.errors')
