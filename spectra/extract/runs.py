"""Extract many runs at once: every run of a study directory (or of a directory of runs), in parallel.

Each run is extracted by :func:`spectra.extract.run.extract` exactly as on its own, so each cube stays
atomic, incremental and locked; a failing run is reported and the others go on. With ``jobs > 1`` the
runs are shared out among that many worker processes (``spawn``: no forked torch state), the CPU threads
split evenly between them, one line per finished run. The workers die with this process, however it
dies (:mod:`spectra.extract.workers`).

Examples
--------
>>> from spectra.extract.runs import extract_runs
>>> done = extract_runs("studies/demo", jobs=2)                         # doctest: +SKIP
>>> [(r.path.parent.name, len(r.added)) for r in done.results]         # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

from spectra.errors import SpectraError
from spectra.extract.run import ExtractResult, extract
from spectra.extract.workers import worker_pool
from spectra.rundir import CHECKPOINTS_DIR, has_checkpoints
from spectra.study import is_study_dir, read_study

PathLike = str | os.PathLike[str]


@dataclass
class ExtractRunsResult:
    """What :func:`extract_runs` did: a result per extracted run, the runs skipped and the runs that failed."""

    results: list[ExtractResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def is_collection(path: PathLike) -> bool:
    """Whether ``path`` holds runs rather than being one: a study directory, or a directory that is not a
    run (no ``checkpoints/``) and whose sub-directories have checkpoints."""
    path = Path(path)
    if not path.is_dir() or (path / CHECKPOINTS_DIR).is_dir() or path.name == CHECKPOINTS_DIR:
        return False
    return is_study_dir(path) or any((child / CHECKPOINTS_DIR).is_dir() for child in path.iterdir())


def runs_to_extract(path: PathLike, include_sweep: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The run directories under ``path`` that have checkpoints, and those skipped (with the reason).

    ``path`` is a study directory (its main runs, and its sweep runs with ``include_sweep``, in the
    study's order) or a directory of run directories (each child with a ``checkpoints/`` directory).
    """
    path = Path(path)
    if is_study_dir(path):
        study = read_study(path)
        candidates = study.run_dirs("main") + (study.run_dirs("sweep") if include_sweep else [])
    elif path.is_dir():
        candidates = sorted(child for child in path.iterdir() if (child / CHECKPOINTS_DIR).is_dir())
        if not candidates:
            raise SpectraError(f"{path}: neither a study directory nor a directory of run directories")
    else:
        raise SpectraError(f"{path}: no such study directory or directory of runs")
    runs, skipped = [], []
    for run in candidates:
        if has_checkpoints(run):
            runs.append(run)
        else:
            skipped.append((run, "no checkpoints yet (not trained)"))
    return runs, skipped


def extract_with_threads(run: str, threads: int | None, options: dict) -> ExtractResult:
    """:func:`spectra.extract.run.extract` of one run with ``threads`` torch threads (None: as they are), in a
    worker process of :func:`spectra.extract.workers.worker_pool` or in this one."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return extract(run, **options)


def threads_per_job(jobs: int) -> int:
    """The torch threads of each of ``jobs`` workers: this process's cores split evenly, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def extract_runs(
    path: PathLike,
    *,
    jobs: int = 1,
    include_sweep: bool = False,
    device: str = "auto",
    drop_first: int = 0,
    progress: bool = True,
    echo: Callable[[str], object] | None = None,
) -> ExtractRunsResult:
    """Extract every run of a study directory (or directory of runs) into its own ``spectra.nc``.

    Parameters
    ----------
    path
        A study directory or a directory of run directories, see :func:`runs_to_extract`.
    jobs
        Runs extracted at a time, each in a process of its own with ``cores // jobs`` torch threads.
    include_sweep
        Also extract a study's learning-rate sweep runs (by default only its main runs).
    device, drop_first
        As for :func:`spectra.extract.run.extract`.
    progress
        A progress bar per run when ``jobs == 1`` (bars of parallel workers would interleave).
    echo
        Called with one line per run: skipped, extracted (steps added and skipped) or failed.

    Raises
    ------
    SpectraError
        A path that holds no runs, ``jobs < 1``; a run that fails does not raise but is in ``failed``.
    """
    if jobs < 1:
        raise SpectraError(f"jobs must be at least 1, got {jobs}")
    runs, skipped = runs_to_extract(path, include_sweep)
    out = ExtractRunsResult(skipped=skipped)
    say = echo or (lambda line: None)
    for run, why in skipped:
        say(f"skipped   {run}: {why}")
    options = dict(device=device, drop_first=drop_first, progress=progress and jobs == 1)

    def record(run: Path, result: ExtractResult | None, error: BaseException | None) -> None:
        if error is not None:
            out.failed.append((run, str(error)))
            say(f"failed    {run}: {error}")
            return
        out.results.append(result)
        say(f"extracted {run}: added {len(result.added)} step(s), {len(result.skipped)} already in the cube")

    if jobs == 1 or len(runs) <= 1:
        for run in runs:
            try:
                record(run, extract_with_threads(str(run), None, options), None)
            except SpectraError as e:
                record(run, None, e)
        return out
    threads = threads_per_job(min(jobs, len(runs)))
    with worker_pool(min(jobs, len(runs))) as pool:
        futures = {pool.submit(extract_with_threads, str(run), threads, options): run for run in runs}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, SpectraError):
                raise error  # a bug, not bad input: keep its traceback
            record(futures[future], None if error else future.result(), error)
    return out
