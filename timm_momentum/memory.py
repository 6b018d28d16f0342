"""Deprecated: moved to ``timm_momentum.tools.memory``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.memory')
