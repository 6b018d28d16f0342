"""Deprecated: moved to ``timm_momentum.tools.cli``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.cli')
