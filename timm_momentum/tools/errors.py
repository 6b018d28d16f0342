"""The errors that bad input raises, and how a failure the user can fix is put in one line. Each names the
problem; the command line prints it and exits with status 2."""
import errno
import sys
from typing import Any, Callable, Optional

_WRITE_FAILURES = {errno.ENOSPC: 'no space left on device', errno.EROFS: 'read-only file system',
                   errno.EACCES: 'permission denied', errno.EPERM: 'permission denied',
                   errno.EDQUOT: 'disk quota exceeded'}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem."""


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the problem."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_failure(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, without torch's advice to load it with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(error)
    if 'WeightsUnpickler error:' in text:
        reason = text.split('WeightsUnpickler error:', 1)[1].strip()
        reason = reason.split(' Please use', 1)[0].split('\n', 1)[0].strip()
        return f'it holds objects other than tensors, which a weights-only load refuses ({reason})'
    if text.startswith('Weights only load failed'):
        return 'it holds objects other than tensors, which a weights-only load refuses'
    return first_line(error)


def describe_os_error(error: OSError) -> str:
    """A short reason for a failed write: 'no space left on device', 'read-only file system', ..."""
    where = f' ({error.filename})' if error.filename else ''
    return _WRITE_FAILURES.get(error.errno, error.strerror or str(error)) + where


def user_error_message(error: BaseException) -> Optional[str]:
    """The line the command line prints for a failure the user can fix: bad input, a run that diverged, a disk
    that is full, read-only or forbidden. None for anything else, which is a bug and should raise."""
    if isinstance(error, (ConfigError, ConversionError, FloatingPointError)):
        return str(error)
    if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
        return f'cannot write: {describe_os_error(error)}'
    return None


def run_reporting_user_errors(run: Callable[[], Any]) -> Any:
    """``run()``; a failure the user can fix is printed as one ``error:`` line on stderr and returns None
    (the command then exits with status 2). Anything else raises."""
    try:
        return run()
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f'error: {message}', file=sys.stderr)
        return None
