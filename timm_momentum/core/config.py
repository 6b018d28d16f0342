"""The core's switches, in one place. ``kernels`` and ``chain`` read them at call time.

* fused: run the chain's element-wise steps as compiled fused kernels (``set_fused``; environment variable
  ``TIMM_MOMENTUM_FUSED=1`` at import). Off by default.
* standard matches memory-efficient: carry standard mode's state (x, v) in the dtype the memory-efficient forward
  carries it in (float64 where a chain inverts), so that both modes compute bitwise the same forward
  (``set_standard_matches_memory_efficient``). Off by default: standard mode then carries it in the input's dtype
  (at least float32), which is faster.
* strict check: make every CUDA memory-efficient backward read its reconstruction check before returning
  (``set_strict_check``). Off by default: the check is read by a later backward, without a host sync.
"""
import contextlib
import os
from typing import Iterator

_settings = {
    'fused': os.environ.get('TIMM_MOMENTUM_FUSED', '0') == '1',
    'strict_check': False,
    'standard_matches_memory_efficient': False,
}


def set_fused(enabled: bool = True) -> None:
    """Choose whether the chain's element-wise steps run as compiled fused kernels or eagerly (the default)."""
    _settings['fused'] = bool(enabled)


def fused_enabled() -> bool:
    """Whether the element-wise steps will try compiled fused kernels."""
    return _settings['fused']


def set_strict_check(strict: bool = True) -> None:
    """Choose when the memory-efficient backward checks its reconstruction.

    By default a CUDA backward does not wait for its check: the gap is copied to the host asynchronously and
    read by a later backward, so a failure raises one step late. With ``strict=True`` every backward reads its
    gap before returning gradients (a host sync per chain). On CPU the check is always immediate.
    """
    _settings['strict_check'] = bool(strict)


def strict_check_enabled() -> bool:
    """Whether every memory-efficient backward reads its reconstruction check before returning."""
    return _settings['strict_check']


def set_standard_matches_memory_efficient(enabled: bool = True) -> None:
    """Choose whether standard mode carries the chain's state as the memory-efficient forward does (float64 where
    a chain inverts; bitwise the same forward, to compare the two modes' gradients exactly), or in the input's
    dtype (the default, faster)."""
    _settings['standard_matches_memory_efficient'] = bool(enabled)


def standard_matches_memory_efficient() -> bool:
    """Whether standard mode carries the chain's state as the memory-efficient forward does."""
    return _settings['standard_matches_memory_efficient']


@contextlib.contextmanager
def standard_matching_memory_efficient(enabled: bool = True) -> Iterator[None]:
    """``set_standard_matches_memory_efficient(enabled)`` inside the block, the previous choice again after it."""
    previous = standard_matches_memory_efficient()
    set_standard_matches_memory_efficient(enabled)
    try:
        yield
    finally:
        set_standard_matches_memory_efficient(previous)
