"""timm-momentum: invertible Momentum ResNets (Sander et al., ICML 2021, arXiv:2102.07870) for timm.

Importing this package registers the ``momentum_*`` models with timm. The package has two parts:

* ``timm_momentum.core``: the momentum chain, its kernels and the model families. It imports nothing
  from the tools.
* ``timm_momentum.tools``: the converter, fine-tuning, healing, data, benchmarks, the study, the demo and
  the ``timm-momentum`` command line, all built on the core.
"""
from .core import *  # noqa: F401,F403  (the public names below, and the timm registrations)
from .core import __all__

__version__ = '0.1.0'
