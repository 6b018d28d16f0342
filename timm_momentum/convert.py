"""Deprecated: moved to ``timm_momentum.tools.convert``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.convert')
