"""Deprecated: moved to ``timm_momentum.tools.demo``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.demo')
