"""How spectra writes files: atomically, under an exclusive lock, checked before any computing.

- :func:`atomic_write`: a temporary file beside the target, fsync, then ``os.replace``. A reader (or a
  later run) sees either the previous file or the complete new one, never a partial write:
  ``os.replace`` is atomic on POSIX when source and target are on the same file system, which a
  temporary file in the target's own directory guarantees. A process killed before the rename leaves
  at most a hidden ``.<name>.<random>.tmp`` file beside the target, never a damaged target, and the
  next run of the same command removes it (:func:`remove_stale_temporaries`, under the lock).
- :class:`ExclusiveLock`: an ``fcntl.flock`` on ``.<name>.lock`` beside the output, so that two
  extractions (or surgeries, or reports) never write the same file at once; the kernel releases it
  when the process dies, and the lock file names its holder for the process that is refused
  (:class:`LockedError`, which a caller that can wait, such as ``collapse-spectra watch``, tells apart).
- :func:`live_holder`: who holds a lock of this format (a trainer's run directory, a study, a cube) while
  they are alive, found without taking the lock.
- :func:`check_writable`: an output path that cannot be written is an error before hours of computing,
  not after.
- :func:`naming_a_full_disk`: a write that fails because the file system is full is a
  :class:`DiskFullError` naming the file, however the library that wrote it (netCDF4, matplotlib)
  reported it.

The trainer has a twin of these helpers (``trainer/fileio.py``): the two halves of the project share
file formats (the lock file's JSON included, docs/recovery.md), not code.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError


class LockedError(SpectraError):
    """An output another live process is writing (its :class:`ExclusiveLock` is held); names the holder."""


class DiskFullError(SpectraError):
    """A file could not be written because its file system is full (or the quota spent); names the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        super().__init__(f"no space left on device writing {self.path}")

    def __reduce__(self):  # rebuilt from its path where a worker process hands it back
        return type(self), (self.path,)


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
_NEARLY_FULL_BYTES = 1 << 20
"""Free space below which a write error that carries no errno is taken for a full file system."""


def disk_is_full(error: BaseException, directory: str | os.PathLike) -> bool:
    """Whether ``error``, raised while writing into ``directory``, means that its file system is full.

    An errno says so (ENOSPC, EDQUOT), on the error or on one it was raised from, and so does the
    operating system's text of it inside a library's message. Some writers drop both: HDF5 under netCDF4
    raises ``NetCDF: HDF error``. For an ``OSError`` or ``RuntimeError`` without an errno the file system
    is asked instead: less than 1 MiB free (or no free inode). Call it before the partial file is
    removed, while its blocks are still taken.
    """
    chain: list[BaseException] = []
    node: BaseException | None = error
    while node is not None and node not in chain:
        chain.append(node)
        node = node.__cause__ or node.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno in _DISK_FULL_ERRNOS
        if any(text in str(e) for text in _DISK_FULL_TEXTS):
            return True
    if not isinstance(error, OSError | RuntimeError):
        return False
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into the reserve
    return free_blocks * st.f_frsize < _NEARLY_FULL_BYTES or (st.f_files > 0 and st.f_ffree == 0)


@contextlib.contextmanager
def naming_a_full_disk(path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an error raised in the block because the file system is full into a :class:`DiskFullError`.

    Parameters
    ----------
    path
        The file the block writes, as the user knows it (a final name, not a temporary one).
    directory
        Where the block writes (default: ``path``'s directory); it must exist for the file system to be
        asked (see :func:`disk_is_full`).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if disk_is_full(e, directory if directory is not None else Path(path).parent):
            raise DiskFullError(path) from e
        raise


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

    Raises
    ------
    DiskFullError
        The file system is full: the temporary file is removed and ``path`` is as it was.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "hello.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("hi")).read_text()
    'hi'
    """
    path = Path(path)
    with naming_a_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give it the mode a plain open() would have given (or the
    # mode of the file it replaces), after the write: some writers recreate the file with their own mode
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    try:
        with naming_a_full_disk(path):  # inside: the file system is asked while the temporary takes space
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        # also on KeyboardInterrupt: the half-written temporary file must not outlive the attempt
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporaries ``.<name>.*.tmp`` that a killed :func:`atomic_write` of ``path`` left.

    Only this target's own pattern, and only while its :class:`ExclusiveLock` is held, so that no live
    writer owns them.
    """
    path = Path(path)
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_writable(path: str | os.PathLike, what: str = "output", directory: bool = False) -> Path:
    """Check, before any computing, that ``path`` can be created or replaced; return it.

    The nearest existing ancestor must be a directory this process may write into (a read-only file
    system counts as not writable, for root too), and ``path`` itself, if it exists, must be a regular file
    (not a directory), or a directory when ``directory`` (a report directory, replaced whole from beside it).

    Raises
    ------
    SpectraError
        Naming the path and why (a regular file where a directory is needed, no permission, ...).
    """
    path = Path(path)
    if path.is_dir() and not directory:
        raise SpectraError(f"cannot write the {what} {path}: it is a directory")
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail on it
            raise SpectraError(f"cannot write the {what} {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise SpectraError(f"cannot write the {what} {path}: {parent} is a file, not a directory")
    why = not_writable(parent)
    if why:
        raise SpectraError(f"cannot write the {what} {path}: {parent} is not writable ({why})")
    return path


def not_writable(directory: str | os.PathLike) -> str | None:
    """Why this process cannot create files in the existing ``directory``, or None when it can.

    >>> not_writable(tempfile.gettempdir()) is None
    True
    """
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "a read-only file system"  # root too: mounted read-only
    except OSError:
        pass
    return "no permission"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


class ExclusiveLock:
    """An exclusive, non-blocking ``flock`` on ``.<name>.lock`` beside an output, for a ``with`` block.

    Parameters
    ----------
    target
        The output the lock protects (its directory is created if needed).
    what
        How to name it in the message of a process that is refused (``cube runs/a/spectra.nc``).

    Raises
    ------
    LockedError
        On entry, when another process holds the lock: the message names the holder (pid, host, start
        time and command line, as it recorded them in the lock file).

    Notes
    -----
    The lock file is removed on release. A process that opened it just before would then lock an
    unlinked file; it sees that the path no longer names its file and tries again, so two processes
    never both hold the lock.
    """

    def __init__(self, target: str | os.PathLike, what: str):
        self.path = lock_path(target)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)
                raise LockedError(
                    f"{self.what} is being written by {_describe(holder)}; wait for it to finish or stop it"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def _open(self) -> int:
        """The lock file's descriptor (created, with its directory, if needed); an unwritable place is one line."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            where = self.path.parent if self.path.parent.is_dir() else e.filename
            raise SpectraError(
                f"cannot write the {self.what}: {where} is not writable ({e.strerror.lower()})"
            ) from None


def live_holder(lock_file: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``lock_file`` (a lock of this format) while it is alive, else None.

    The same answer as the trainer's ``trainer.fileio.live_holder`` (the two halves share the lock file's
    format, not code). A holder on this host is alive when its pid is: nothing is locked to find out, so a
    trainer that takes its run directory's lock at that moment is never refused because a watcher looked. A
    holder on another host (a SLURM node, the directory on a shared file system) is asked through the lock
    itself, with a shared ``flock`` that is released at once.

    >>> live_holder(os.path.join(tempfile.gettempdir(), "no-such.lock")) is None
    True
    """
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:  # no lock file: no holder (it is removed on release)
        return None
    try:
        holder = _read_holder(fd) or {}
        if not isinstance(holder.get("pid"), int):
            holder = {}
        if holder and holder.get("host") == socket.gethostname():
            return holder if _pid_alive(holder["pid"]) else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it recorded no details)"
    text = f"process pid {info.get('pid', '?')}"
    if info.get("host"):
        text += f" on {info['host']}"
    if info.get("since"):
        text += f" since {info['since']}"
    return f"{text} ({info['command']})" if info.get("command") else text


def exchange_directories(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported.

    A reader sees one directory or the other under each name at every moment. Where the system call is
    missing (not Linux, an old C library) or the file system refuses it, nothing is changed and False is
    returned, so that the caller can fall back to two renames.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete directory ``new`` in the place of ``target`` and delete the old one.

    Both must be in the same directory. With :func:`exchange_directories` the swap is atomic: a kill at any
    moment leaves either the old or the new directory at ``target`` (the other one, under ``new``'s hidden
    name, is debris that :func:`remove_stale_temporaries` of ``target`` removes). Without it, ``target`` is
    renamed aside and ``new`` renamed into place: two atomic steps with ``target`` briefly absent.
    """
    new, target = Path(new), Path(target)
    for root, _dirs, names in os.walk(new):  # everything on disk before the swap makes it visible
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)
    if not target.exists():
        os.rename(new, target)
    elif exchange_directories(new, target):
        shutil.rmtree(new)  # now the old directory
    else:
        aside = target.parent / f".{target.name}.{os.getpid()}.old.tmp"
        os.rename(target, aside)
        os.rename(new, target)
        shutil.rmtree(aside)
    fsync_dir(target.parent)
