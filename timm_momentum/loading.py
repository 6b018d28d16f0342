"""Deprecated: moved to ``timm_momentum.tools.loading``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.loading')
