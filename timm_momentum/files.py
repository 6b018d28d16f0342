"""Writing files and folders so that nothing is ever half-written: build a temp beside the target, then rename."""
import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union


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


def write_csv(path: Union[str, os.PathLike], rows: Sequence[Dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys, the first row's order) as a CSV file, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def recover_interrupted_folder(out_dir: Union[str, os.PathLike]) -> None:
    """Undo what a ``write_folder_atomically`` killed mid-write left: put back a replaced folder that a swap
    cut between its two renames left in ``.OUT.old-*/previous``, and remove the temp folders of killed writes."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    for old in sorted(out_dir.parent.glob(f'.{out_dir.name}.old-*')):
        previous = old / 'previous'
        if previous.is_dir() and not out_dir.exists():
            os.replace(previous, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(out_dir.parent, out_dir.name)


def write_folder_atomically(out_dir: Union[str, os.PathLike], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_folder)`` on a temp folder beside ``out_dir``, then rename it into place, replacing
    ``out_dir`` if it exists.

    On failure nothing is left: no temp folder, no parent folders this call created, and ``out_dir`` as it was.
    A replacement moves the old folder aside before renaming the new one in; a run killed between the two
    renames leaves the old one in ``.OUT.old-*/previous``, which ``recover_interrupted_folder`` puts back.
    """
    out_dir = Path(out_dir)
    recover_interrupted_folder(out_dir)
    created: List[Path] = []
    tmp = old = None
    try:
        created = make_parents(out_dir)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f'.{out_dir.name}.tmp-'))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the folder follows the umask
        write(tmp)
        for path in tmp.rglob('*'):  # some writers (safetensors) create files 0600; everything follows the umask
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f'.{out_dir.name}.old-'))
            os.replace(out_dir, old / 'previous')
        os.replace(tmp, out_dir)
        tmp = None
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists() and (old / 'previous').is_dir():
            os.replace(old / 'previous', out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        remove_folders(created)
        raise
