"""Deprecated: moved to ``timm_momentum.tools.files``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.files')
