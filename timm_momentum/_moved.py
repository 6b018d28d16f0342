"""Deprecation shims for the modules that moved into ``timm_momentum.core`` and ``timm_momentum.tools``."""
import importlib
import runpy
import sys
import warnings
from typing import Any, Dict


def alias(shim: Dict[str, Any], new: str) -> None:
    """Make the shim module whose globals are ``shim`` (imported, or run with ``python -m``) stand for module
    ``new``, with a FutureWarning naming both."""
    old = shim['__spec__'].name
    warnings.warn(f'{old} moved to {new}; import it from there (the old name will be removed)',
                  FutureWarning, stacklevel=3)
    if shim['__name__'] == '__main__':
        runpy.run_module(new, run_name='__main__', alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
