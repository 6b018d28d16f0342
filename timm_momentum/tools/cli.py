"""The ``timm-momentum`` command line, which lives in ``timm_momentum_cli``. That package imports only the
standard library, so that ``--help`` is quick; this module keeps ``python -m timm_momentum.tools.cli`` and
``from timm_momentum.tools.cli import main`` working."""
import sys

from timm_momentum_cli import build_parser, main

__all__ = ['build_parser', 'main']

if __name__ == '__main__':
    sys.exit(main())
