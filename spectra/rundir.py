"""Read a run directory (docs/training.md, docs/checkpoints.md) by its layout: which paths are runs, where their
checkpoints are, which files are checkpoints.

A run directory holds ``run.json``, ``checkpoints/tokens_<12 digits>.safetensors`` and, once spectra has read
it, ``spectra.nc``, ``surgery.nc`` and ``evals.json``. The trainer writes it; spectra finds its way through it
here only (reading a checkpoint's contents is :mod:`spectra.extract.load`). No torch here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spectra.errors import SpectraError

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKPOINT_RE",
    "RUN_RECORD",
    "checkpoints_dir",
    "find_checkpoints",
    "has_checkpoints",
    "holds_checkpoints",
    "run_dir_of",
]

CHECKPOINTS_DIR = "checkpoints"
"""A run directory's sub-directory of checkpoints."""
CHECKPOINT_RE = re.compile(r"^tokens_(\d{12})\.safetensors$")
"""Final checkpoint file names; temporary files being written never match."""
RUN_RECORD = "run.json"
"""A run directory's record of how the run went (versions, device, wall time)."""


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


def has_checkpoints(run: str | os.PathLike) -> bool:
    """Whether ``run`` has a ``checkpoints/`` directory with at least one checkpoint in it (it has been trained)."""
    directory = Path(run) / CHECKPOINTS_DIR
    return directory.is_dir() and any(CHECKPOINT_RE.match(p.name) for p in directory.iterdir())


def holds_checkpoints(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one run: a run directory (it has ``checkpoints/``) or a directory of checkpoint files."""
    path = Path(path)
    return (path / CHECKPOINTS_DIR).is_dir() or any(CHECKPOINT_RE.match(p.name) for p in path.iterdir())
