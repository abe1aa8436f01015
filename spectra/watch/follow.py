"""What a watch follows, as the files say now: one run, every run of a study, or every run of a directory of runs;
and when it is over.

The path is looked at afresh at every pass, so that a run that appears later is followed too, and a path that
does not exist yet (a watch started before its run or study) is waited for. Whether a run is trained now is its
lock's business (:func:`spectra.rundir.read_training`), and a study's is its study process's
(:func:`spectra.study.study_process`); neither look takes a lock, so a watch never stops a run or a study from
starting. No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError
from spectra.rundir import CHECKPOINTS_DIR, RUN_LOCK, RUN_RECORD, Training, holds_checkpoints
from spectra.study import is_study_dir, read_study, study_process

__all__ = ["Followed", "follow", "is_over"]


@dataclass(frozen=True)
class Followed:
    """What a watched path holds at one moment."""

    kind: str | None
    """``run``, ``study``, ``runs`` (a directory of run directories), or None while the path does not say yet
    (it does not exist, or holds nothing that tells)."""
    runs: dict[Path, str]
    """Each run directory followed now, with the name its TensorBoard scalars go under (``A1-s0``; a study's
    sweep runs ``sweep/<run>``)."""
    study_process: dict[str, Any] | None = None
    """A study's: the live ``collapse-train study`` process working on it (pid, host, ...), or None."""


def _is_run(path: Path) -> bool:
    """A run directory, or one a trainer has begun to make (it holds the run lock before anything else)."""
    return any((path / name).exists() for name in (RUN_RECORD, CHECKPOINTS_DIR, RUN_LOCK))


def follow(path: str | os.PathLike, include_sweep: bool = False) -> Followed:
    """What ``path`` holds now, see :class:`Followed`.

    A study directory (``study.json``) is followed run by run as its manifest lists them: the main runs, and the
    sweep's with ``include_sweep``. A directory with a run's files (``run.json``, ``checkpoints/`` or the
    trainer's lock) is one run. A directory whose sub-directories are runs is a directory of runs.

    Raises
    ------
    SpectraError
        ``path`` is a file, or a directory of checkpoint files rather than a run, or an unreadable study.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SpectraError(f"{path}: watch follows a run directory or a study directory, not a file")
    if not path.is_dir():
        return Followed(None, {})
    if is_study_dir(path):
        study = read_study(path)
        runs = {run: run.name for run in study.run_dirs("main")}
        if include_sweep:
            runs.update({run: f"sweep/{run.name}" for run in study.run_dirs("sweep")})
        return Followed("study", runs, study_process(path))
    if _is_run(path):
        return Followed("run", {path: path.resolve().name})
    if path.name == CHECKPOINTS_DIR or holds_checkpoints(path):
        raise SpectraError(
            f"{path}: a directory of checkpoint files; watch follows the run directory that holds it "
            "(or measure these with collapse-spectra extract)"
        )
    children = sorted(child for child in path.iterdir() if child.is_dir() and _is_run(child))
    return Followed("runs" if children else None, {child: child.name for child in children})


def is_over(followed: Followed, training: Mapping[Path, Training]) -> bool:
    """Whether nothing more will come to what is followed, ``training`` being each run's state read before.

    A run is over when it has begun and no process trains it (:attr:`spectra.rundir.Training.over`). A
    study is over when no study process works on it and none of its runs is being trained: its runs that
    never began will not begin now. A directory of runs is over when each of its runs is. A path that does
    not say yet what it is, is not over.
    """
    if followed.kind is None:
        return False
    states = [training[run] for run in followed.runs]
    if followed.kind == "study":
        return followed.study_process is None and all(state.holder is None for state in states)
    return bool(states) and all(state.over for state in states)
