"""Read a run directory (docs/training.md, docs/checkpoints.md) by its layout: which paths are runs, where their
checkpoints are, which files are checkpoints.

A run directory holds ``run.json``, ``checkpoints/tokens_<12 digits>.safetensors`` and, once spectra has read
it, ``spectra.nc``, ``surgery.nc`` and ``evals.json``. The trainer writes it; spectra finds its way through it
here only (reading a checkpoint's contents is :mod:`spectra.extract.load`). What a run directory says about its
training, whether a process trains it now and how ``run.json`` says it went, is :func:`read_training` (for
``collapse-spectra watch``). No torch here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError
from spectra.fileio import live_holder

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_RE",
    "RUN_LOCK",
    "RUN_RECORD",
    "Training",
    "checkpoints_dir",
    "find_checkpoints",
    "has_checkpoints",
    "holds_checkpoints",
    "present_checkpoints",
    "read_training",
    "run_dir_of",
]

CHECKPOINTS_DIR = "checkpoints"
"""A run directory's sub-directory of checkpoints."""
CHECKPOINT_RE = re.compile(r"^tokens_(\d{12})\.safetensors$")
"""Final checkpoint file names; temporary files being written never match."""
RUN_RECORD = "run.json"
"""A run directory's record of how the run went (versions, device, wall time)."""
RUN_LOCK = ".lock"
"""The lock a training process holds on its run directory from before it reads it until the run ends
(docs/training.md); the file names the holder."""


def checkpoints_dir(path: str | os.PathLike) -> Path:
    """The directory holding the checkpoints of ``path``: a run directory's ``checkpoints/``, else ``path``."""
    path = Path(path)
    return path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of a checkpoint file, a run directory or its ``checkpoints/`` directory.

    The default cube location is ``run_dir_of(path) / "spectra.nc"``. A directory of checkpoints that
    is not named ``checkpoints`` is its own run directory.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if directory.name == CHECKPOINTS_DIR and not (directory / CHECKPOINTS_DIR).is_dir():
        return directory.parent
    return directory


def find_checkpoints(path: str | os.PathLike) -> list[Path]:
    """Checkpoint files of ``path``, sorted by their token count.

    ``path`` is a checkpoint file (returned as is), a run directory (its ``checkpoints/`` is
    searched) or a directory of checkpoints. Only final names ``tokens_<12 digits>.safetensors``
    count, so temporary files of a checkpoint being written are never picked up.

    Raises
    ------
    SpectraError
        ``path`` does not exist, or the directory holds no checkpoint.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SpectraError(f"{path}: no such file or directory")
    directory = checkpoints_dir(path)
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    if not found:
        raise SpectraError(f"{directory}: no checkpoints (tokens_<12 digits>.safetensors) in this directory")
    return [p for _, p in sorted(found)]


def present_checkpoints(run: str | os.PathLike) -> list[Path]:
    """The checkpoint files in the run directory ``run`` now, sorted by token count; none when it has none yet.

    Unlike :func:`find_checkpoints`, an absent or empty ``checkpoints/`` is not an error: a run being trained,
    or about to be, is looked at again later.
    """
    directory = Path(run) / CHECKPOINTS_DIR
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), p) for p in entries if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def has_checkpoints(run: str | os.PathLike) -> bool:
    """Whether ``run`` has a ``checkpoints/`` directory with at least one checkpoint in it (it has been trained)."""
    directory = Path(run) / CHECKPOINTS_DIR
    return directory.is_dir() and any(CHECKPOINT_RE.match(p.name) for p in directory.iterdir())


def holds_checkpoints(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one run: a run directory (it has ``checkpoints/``) or a directory of checkpoint files."""
    path = Path(path)
    return (path / CHECKPOINTS_DIR).is_dir() or any(CHECKPOINT_RE.match(p.name) for p in path.iterdir())


@dataclass(frozen=True)
class Training:
    """What a run directory says about its training at one moment (:func:`read_training`)."""

    status: str
    """``absent`` (no directory), ``not started`` (no ``run.json`` and no checkpoint yet), ``unknown`` (a
    ``run.json`` that cannot be read, or checkpoints without one), or ``run.json``'s status: ``running``,
    ``completed``, ``diverged``, ``failed``, ``interrupted``."""
    holder: dict | None
    """The live process that holds the run directory's lock (pid, host, ...), or None: nothing trains it now."""

    @property
    def started(self) -> bool:
        """Whether the run has begun: it has a ``run.json`` or checkpoints."""
        return self.status not in ("absent", "not started")

    @property
    def over(self) -> bool:
        """Whether nothing more will come of this run unless someone starts it again: it has begun and no
        process trains it. True whatever ``run.json`` says (``completed``, ``diverged``, ``failed``; also
        ``interrupted``, and ``running`` left by a killed process): a resumed run is a new process."""
        return self.started and self.holder is None

    def describe(self) -> str:
        """The status in words, e.g. ``completed`` or ``running (killed: no process holds it)``."""
        if self.status == "running" and self.holder is None:
            return "running in run.json, but no process holds it (killed)"
        return self.status


def read_training(run: str | os.PathLike) -> Training:
    """Whether a process trains the run directory ``run`` now, and its ``run.json`` status.

    The lock is looked at before anything else, so that a caller who then lists the checkpoints and sees the
    run ``over`` has seen every checkpoint it will ever have (the trainer writes them, and then ``run.json``,
    before it lets go of the lock). Looking takes no lock (:func:`spectra.fileio.live_holder`).
    """
    run = Path(run)
    holder = live_holder(run / RUN_LOCK)
    if not run.is_dir():
        return Training("absent", holder)
    try:
        record = json.loads((run / RUN_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Training("unknown" if has_checkpoints(run) else "not started", holder)
    except (OSError, ValueError):
        return Training("unknown", holder)
    status = record.get("status") if isinstance(record, dict) else None
    return Training(str(status) if status else "unknown", holder)
