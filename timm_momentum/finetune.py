"""Deprecated: moved to ``timm_momentum.tools.finetune``."""
from ._moved import alias

alias(globals(), 'timm_momentum.tools.finetune')
