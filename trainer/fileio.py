"""How the trainer writes files: atomically, with the umask's mode, under an exclusive lock, and
without leaving its own temporaries behind.

- :func:`atomic_write` writes a temporary file beside the target, fsyncs it and renames it, so a
  reader (or a later run) sees the previous file or the complete new one, never a partial write.
- Files get the mode a plain ``open()`` would give them (``0o666 & ~umask``): ``tempfile.mkstemp``
  and safetensors' ``save_file`` both create private (0600) files, which is wrong for results that a
  group shares (:func:`apply_default_mode`).
- :class:`ExclusiveLock` is an ``fcntl.flock`` on a lock file: one process at a time works on a run
  directory. The kernel releases it when the process dies, however it dies, so a killed run never
  leaves a stale lock; the file records its holder so that the process refused can name it, and
  :func:`live_holder` reads it without taking the lock (who is working on a run or study directory).
- :func:`remove_stale_temporaries` deletes the hidden temporaries a killed writer left, matching only
  this command's own name patterns; it is called while the lock is held, so it never touches the
  temporary file of a writer that is still running.
- A write that fails because the file system is full is a :class:`DiskFullError` naming the file
  (:func:`naming_a_full_disk`), however the library that wrote it reported it.
- :func:`write_safetensors` writes a safetensors file whose bytes depend only on its tensors and metadata
  (checkpoints, resume states and the eval batch all go through it).

``spectra`` has its own twin of these helpers (``spectra/fileio.py``): the two halves of the project
share file formats, not code (see DESIGN.md). The lock file's content is part of that shared format
(docs/recovery.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.errors import TrainerError
from trainer.provenance import utc_now


class LockedError(TrainerError):
    """Another process holds the lock; the message names it."""


class DiskFullError(TrainerError):
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
    operating system's text of it inside a library's message (safetensors: ``I/O error: No space left on
    device (os error 28)``). Some writers drop both: HDF5 under netCDF4 raises ``NetCDF: HDF error``,
    numpy's ``tofile`` ``N requested and M written``. For an ``OSError`` or ``RuntimeError`` without an
    errno the file system is asked instead: less than 1 MiB free (or no free inode). Call it before the
    partial file is removed, while its blocks are still taken.
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
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) would give under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_default_mode(path: str | os.PathLike) -> None:
    """Give a file (or directory) created by a library that makes it private the umask's mode."""
    os.chmod(path, default_mode(directory=Path(path).is_dir()))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    The temporary file is named ``.<name>.<random><suffix>`` and removed if ``write`` fails (or the
    process is interrupted); the final file has the umask's mode, whatever ``write`` created. A full file
    system is a :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    with naming_a_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_a_full_disk(path):  # inside: the file system is asked while the temporary takes space
            write(tmp)
            apply_default_mode(tmp)  # after write: save_file and HDF5 recreate the file with their own mode
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, with the header metadata in sorted key order: same input, same bytes.

    safetensors orders the tensors itself (by alignment, then name) but writes the ``__metadata__`` table
    from a Rust ``HashMap``, whose order is randomised per map: two identical calls give files with
    different hashes (safetensors 0.8 has no option for a fixed order). The header is therefore rewritten
    in place with the metadata keys sorted: the same keys and values in compact JSON, escaped as
    serde_json escapes them, so it has the same length and the tensor data does not move. Every
    safetensors file the trainer writes (checkpoints, resume state, the eval batch) goes through here.

    Examples
    --------
    >>> import hashlib, tempfile
    >>> path = tempfile.mkdtemp() + "/x.safetensors"
    >>> digests = set()
    >>> for _ in range(3):
    ...     write_safetensors(path, {"w": torch.ones(2)}, {k: "v" for k in "abcdefgh"})
    ...     digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    >>> len(digests)
    1
    """
    save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    if metadata:
        _sort_header_metadata(Path(path))


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # keeps its place, first
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for the same strings; never move the tensor data
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces too


def not_writable(directory: str | os.PathLike) -> str | None:
    """Why this process cannot create files in the existing ``directory``, or None when it can."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "a read-only file system"  # root too: mounted read-only
    except OSError:
        pass
    return "no permission"


def check_writable(path: str | os.PathLike, what: str, into: bool = False) -> Path:
    """Check, before any work, that ``path`` can be created, or written ``into`` when it is a directory.

    The place checked is ``path`` itself when ``into`` is true and it is an existing directory (a run
    directory, whose files are written in it), else the nearest existing ancestor of its parent (where it is
    created, or built beside it and renamed into place). A read-only file system counts as not writable,
    for root too. Whether ``path`` has the right kind is the caller's check.

    Raises
    ------
    TrainerError
        One line naming ``path`` (as ``what``) and the directory that stops it, with the reason.
    """
    path = Path(path)
    place = path if into and path.is_dir() else path.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise TrainerError(f"cannot write the {what} {path}: {place} is a file, not a directory")
    why = not_writable(place)
    if why:
        raise TrainerError(f"cannot write the {what} {path}: {place} is not writable ({why})")
    return path


def remove_stale_temporaries(directory: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """Delete the files (or directories) in ``directory`` that match the glob ``patterns``; return them.

    Call it only while holding the lock of whatever writes these temporaries: then no live writer
    owns them, and they are debris of a killed one.
    """
    directory = Path(directory)
    removed = []
    for pattern in patterns:
        for p in directory.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _holder_description(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it recorded no details)"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    text = "process " + " ".join(parts)
    return f"{text} ({info['command']})" if info.get("command") else text


class ExclusiveLock:
    """An exclusive, non-blocking ``flock`` on ``path`` for the lifetime of a ``with`` block.

    Parameters
    ----------
    path
        The lock file (created if needed; removed on release).
    what
        What the lock protects, for the message of the process that is refused (``run directory runs/a``).
    error
        The exception class raised to the process that is refused (a :class:`TrainerError`).

    Raises
    ------
    LockedError
        On entry, when another process holds the lock; the message names the holder (pid, host, start
        time and command line, as it recorded them in the lock file).

    Notes
    -----
    The lock file is unlinked on release. A process that opened the old file just before that would
    lock an unlinked inode; it notices (the path no longer names its inode) and tries again, so two
    processes never both believe they hold the lock.
    """

    def __init__(self, path: str | os.PathLike, what: str, error: type[TrainerError] | None = None):
        self.path = Path(path)
        self.what = what
        self.error = error or LockedError
        self._fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self.error(
                    f"{self.what} is in use by {_holder_description(holder)}; wait for it to finish or stop it"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock
        self._fd = fd
        _write_holder(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def _open(self) -> int:
        """The lock file's descriptor (created if needed); a directory that cannot be written is one line."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise TrainerError(
                f"cannot write the {self.what}: {self.path.parent} is not writable ({e.strerror.lower()})"
            ) from None


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": utc_now(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        info = json.loads(data.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def live_holder(lock_file: Path) -> dict[str, Any] | None:
    """The holder recorded in ``lock_file`` (a lock of :class:`trainer.fileio.ExclusiveLock`) while it is alive.

    A holder on this host is alive when its pid is: nothing is locked to find out, so a process that
    takes the lock at that moment is never refused because of this look. A holder on another host
    (a SLURM node, with the run directory on a shared filesystem) is asked through the lock itself.
    """
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:  # no lock file: no holder (it is removed on release)
        return None
    try:
        try:
            holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        except ValueError:
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
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


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on node7``, or ``an unknown process`` when the lock file names none."""
    if not holder:
        return "an unknown process"
    return f"pid {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
