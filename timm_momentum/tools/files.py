"""Writing files and folders so that nothing is ever half-written: build a temp beside the target, then rename."""
import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union


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


# Every folder timm-momentum writes as a whole (a model folder) holds this file: it names the files the writer put
# there, so that a later replacement (``convert --force``) removes only what this tool made.
MARKER = '.timm-momentum.json'


def write_marker(folder: Union[str, os.PathLike], written_by: str) -> None:
    """Record in ``folder`` that ``written_by`` wrote it, and which files it holds now."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps({'written_by': written_by, 'files': files}, indent=2) + '\n')


def marked_files(folder: Union[str, os.PathLike]) -> Optional[List[str]]:
    """The files ``folder``'s marker says timm-momentum wrote there (the marker included); None without a
    readable marker."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        files = marker['files']
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files + [MARKER]


def protected_by(path: Union[str, os.PathLike], protected: Sequence[Union[str, os.PathLike]]) -> Optional[str]:
    """Why replacing the folder ``path`` would remove something it must not: it is '/', or it is or holds the
    working directory or one of ``protected``; None when it would not."""
    target = Path(os.path.realpath(path))
    if target.parent == target:
        return 'it is the root folder'
    named = [('the working directory', Path.cwd())] + [(f'the source {p}', Path(p)) for p in protected]
    for what, inside in named:
        inside = Path(os.path.realpath(inside))
        if target == inside:
            return f'it is {what}'
        if target in inside.parents:
            return f'it holds {what}'
    return None


def file_in_the_way(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The nearest existing path above (or at) ``path`` when it is not a folder, so no folder can be made there."""
    for candidate in [Path(path)] + list(Path(path).parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


class FolderInUseError(RuntimeError):
    """Another process is writing the folder this one was asked to write."""


@contextlib.contextmanager
def folder_lock(path: Union[str, os.PathLike], what: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``path`` while ``what`` writes it (a locked file ``.NAME.lock`` beside
    it, removed on exit); raise FolderInUseError when another process holds it.

    The lock is ``fcntl.flock``: the kernel drops it when its holder dies, so a killed writer leaves no lock behind.
    Folders created above ``path`` for the lock file are removed on exit when they are still empty.
    """
    import fcntl

    path = Path(os.path.abspath(path))  # '.' and 'a/..' have no name to put beside
    if path.parent == path:
        raise ValueError('the root folder cannot be locked: nothing can be written in its place')
    created = make_parents(path)
    lock_path = path.parent / f'.{path.name}.lock'
    fd = None
    try:
        while fd is None:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                fd = None  # the lock file is the holder's: leave it
                raise FolderInUseError(f'{path} is being written by another process ({holder}; its lock is '
                                       f'{lock_path}): wait for it to finish, or choose another folder') from None
            if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # its holder removed that lock file as this process opened it: take the new one
            fd = None
        os.ftruncate(fd, 0)
        os.write(fd, f'{what}, pid {os.getpid()}\n'.encode())
        yield
    finally:
        if fd is not None:
            Path(lock_path).unlink(missing_ok=True)  # while still locked: no process can hold a removed file
            os.close(fd)
        remove_folders(created)
