"""Deprecated: moved to ``timm_momentum.tools.bench``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.bench')
