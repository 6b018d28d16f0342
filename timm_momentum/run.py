"""Deprecated: moved to ``timm_momentum.tools.run``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.run')
