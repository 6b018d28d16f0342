import warnings

import pytest
import torch

import timm_momentum  # noqa: F401  (registers the momentum models)

# timm's own test suite runs through tests/timm_suite/run.sh, with its own plugin, not here
collect_ignore = ['timm_suite']


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``import name`` (and its submodules, also those imported already) raise ImportError, as if not installed."""
    import sys

    for module in [m for m in sys.modules if m == name or m.startswith(name + '.')] + [name]:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def standard_matches_memory_efficient():
    """Standard mode carries its state in float64 as the memory-efficient mode does, so the two compute bitwise
    the same forward and their gradients compare exactly (``set_standard_matches_memory_efficient``)."""
    from timm_momentum.core.config import standard_matching_memory_efficient

    with standard_matching_memory_efficient():
        yield


# The fast subset (``python -m pytest -q -m fast tests``, under 2 minutes): every test of the core's modules
# below, except those marked ``slow`` (whole models at depth, compiles, multiprocess runs).
CORE_MODULES = {'test_invertible', 'test_kernels', 'test_reliability_invertible', 'test_registry', 'test_contract',
                'test_layout'}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__ in CORE_MODULES and item.get_closest_marker('slow') is None:
            item.add_marker(pytest.mark.fast)
