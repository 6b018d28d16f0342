"""Deprecated: moved to ``timm_momentum.tools.example``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.example')
