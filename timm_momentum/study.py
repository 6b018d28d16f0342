"""Deprecated: moved to ``timm_momentum.tools.study``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.study')
