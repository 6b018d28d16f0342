"""Writing files so that nothing is ever half-written: write a temp file beside the target, then rename."""
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Union


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_parents(path: Union[str, os.PathLike]) -> List[Path]:
    """Create the missing folders above ``path``; returns those it created, outermost first."""
    created: List[Path] = []
    try:
        for parent in reversed(Path(path).absolute().parents):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
    except OSError:
        remove_folders(created)
        raise
    return created


def remove_folders(folders: List[Path]) -> None:
    """Remove folders that ``make_parents`` created, innermost first, where they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass


def remove_stale_temps(folder: Union[str, os.PathLike], name: str) -> List[Path]:
    """Remove the ``.NAME.tmp-*`` files and folders that writers killed mid-write left in ``folder``."""
    stale = sorted(Path(folder).glob(f'.{name}.tmp-*'))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def describe_os_error(error: OSError) -> str:
    """A short reason for a failed write: 'no space left on device', 'read-only file system', ..."""
    reasons = {errno.ENOSPC: 'no space left on device', errno.EROFS: 'read-only file system',
               errno.EACCES: 'permission denied', errno.EPERM: 'permission denied', errno.EDQUOT: 'disk quota exceeded'}
    where = f' ({error.filename})' if error.filename else ''
    return reasons.get(error.errno, error.strerror or str(error)) + where


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file in the target's folder, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.tmp-')
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a written file follows the umask
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
