"""Atomic file writes: a temporary file beside the target, fsync, then ``os.replace``.

A reader (or a later run) sees either the previous file or the complete new one, never a partial
write: ``os.replace`` is atomic on POSIX when source and target are on the same file system, which a
temporary file in the target's own directory guarantees. A process killed before the rename leaves
at most a hidden ``.<name>.<random>.tmp`` file beside the target, never a damaged target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    Parameters
    ----------
    path
        Final file name. Its directory is created if needed.
    write
        Writes the complete content to the path it is given (the file exists and is empty; the
        callable may also replace it, as netCDF writers do).
    suffix
        Suffix of the temporary name (``.tmp`` is git-ignored in this repository).

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "hello.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("hi")).read_text()
    'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would have given
        # (or the mode of the file it replaces), since writers like HDF5 truncate it in place
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # also on KeyboardInterrupt: the half-written temporary file must not outlive the attempt
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
