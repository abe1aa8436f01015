"""``collapse-spectra watch``: measure each checkpoint of a run, or of every run of a study, as it lands.

:func:`watch` looks at the path every ``interval`` seconds (:mod:`spectra.watch.follow`). For each run that has
checkpoints its cube does not hold, it calls :func:`spectra.extract.run.extract`, the code of ``collapse-spectra
extract`` with its lock: every checkpoint present then is added in one write of the cube, so a watch that falls
behind its run catches up in few writes, and one that keeps up writes each checkpoint as soon as it is measured.
A checkpoint is renamed into place whole by the trainer and only final names are read, so half a file is never
seen. After each write it prints a line per checkpoint added (run, tokens, mean key PR, seconds), writes the
TensorBoard scalars of :mod:`spectra.watch.scalars` (``tensorboard``) and redraws the run's figures
(``figures``).

It ends by itself when what it follows is over (:func:`spectra.watch.follow.is_over`) and every checkpoint is
in its cube, or on SIGINT (Ctrl-C) or SIGTERM with :class:`WatchStopped` (exit status 130): each cube is then
the last one written whole, as a kill of ``extract`` leaves it.

Examples
--------
>>> from spectra.watch.loop import watch
>>> done = watch("runs/A1-s0", interval=5, tensorboard="tb")  # doctest: +SKIP
A1-s0  tokens 0  mean key PR 27.81  0.4 s
...
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path

from spectra.cube import CUBE_FILENAME, open_cube
from spectra.errors import SpectraError
from spectra.extract.load import resolve_device
from spectra.extract.run import ExtractResult, UnreadableCheckpointsError
from spectra.extract.runs import extract_with_threads, threads_per_job
from spectra.extract.workers import worker_pool
from spectra.fileio import LockedError, check_writable
from spectra.rundir import Training, present_checkpoints, read_training
from spectra.watch.figures import write_run_figures
from spectra.watch.follow import Followed, follow, is_over
from spectra.watch.scalars import HEADLINE, checkpoint_scalars, headline_pr
from spectra.watch.tensorboard import ScalarLog, require_tensorboard

__all__ = ["WatchResult", "WatchStopped", "watch"]

Echo = Callable[[str], object]


@dataclass
class WatchResult:
    """What :func:`watch` did."""

    added: dict[Path, int] = field(default_factory=dict)
    """Checkpoints added to each followed run's cube by this watch."""
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    """Checkpoints that could not be read (each reported once, when it was met), with the reason."""
    problems: list[str] = field(default_factory=list)
    """Everything else that went wrong (a run no longer followed, figures not drawn), as it was reported."""


class WatchStopped(SpectraError):
    """The watch was stopped by SIGINT or SIGTERM; every cube holds the checkpoints measured so far."""

    exit_code = 130


def watch(
    path: str | os.PathLike,
    *,
    device: str = "auto",
    interval: float = 10.0,
    tensorboard: str | os.PathLike | None = None,
    figures: bool = False,
    jobs: int = 1,
    include_sweep: bool = False,
    echo: Echo = print,
) -> WatchResult:
    """Follow a run, or every run of a study, and measure each checkpoint into its cube as it lands.

    Parameters
    ----------
    path
        A run directory or a study directory (or a directory of run directories), existing or not yet: a path
        that does not say yet what it is (absent, empty) is waited for.
    device
        Where the forward passes and SVDs run (``auto``, ``cpu``, ``cuda[:N]``): one the training does not use.
    interval
        Seconds between two looks at the path.
    tensorboard
        A directory for TensorBoard scalars, one sub-directory per run (:mod:`spectra.watch.scalars`); None for
        none. Needs the ``tensorboard`` extra.
    figures
        Redraw each run's trajectory and heatmap into ``RUN/figures/`` after each new checkpoint.
    jobs
        Runs measured at a time, each in a worker process with ``cores // jobs`` torch threads; 1 measures in
        this process.
    include_sweep
        Of a study: also follow its learning-rate sweep runs (by default its main runs only).
    echo
        Called with each progress line.

    Returns
    -------
    WatchResult
        When everything followed is over and measured; unreadable checkpoints and other problems do not stop
        the watch and are listed there.

    Raises
    ------
    WatchStopped
        On SIGINT or SIGTERM (exit status 130 from the command line).
    SpectraError
        Before anything is watched: a bad interval, jobs or device, no tensorboard package, an unwritable
        TensorBoard directory, a path that is a file.
    """
    if not interval > 0:
        raise SpectraError(f"interval must be positive, got {interval}")
    if jobs < 1:
        raise SpectraError(f"jobs must be at least 1, got {jobs}")
    dev = resolve_device(device)
    tb_dir = None
    if tensorboard is not None:
        require_tensorboard()
        tb_dir = check_writable(Path(tensorboard), "TensorBoard directory", directory=True)
    follow(path, include_sweep)  # a path that cannot be watched is refused now, not at the first pass
    watcher = _Watcher(Path(path), str(dev), interval, tb_dir, figures, jobs, include_sweep, echo)
    echo(watcher.opening_line())
    with _signals_stop() as stopped:
        try:
            return watcher.run()
        except KeyboardInterrupt:
            watcher.stop_workers()
            raise WatchStopped(watcher.stopped_line(stopped() or "SIGINT")) from None
        finally:
            watcher.close()


@dataclass
class _Run:
    """One followed run: what this watch has handled of it."""

    path: Path
    name: str
    tensorboard: ScalarLog | None
    seen: set[str] = field(default_factory=set)
    """Names of the checkpoints handed to an extraction that finished (measured, skipped or unreadable)."""
    unreadable: set[str] = field(default_factory=set)
    """Names already reported as unreadable."""
    added: int = 0
    synced: bool = False
    """Whether the whole cube's scalars and figures were written once (a cube made before this watch)."""
    in_flight: tuple[Future, set[str]] | None = None
    waiting_for_lock: bool = False
    failed: bool = False
    figures: bool = True
    announced: bool = False
    ended: bool = False

    def new_checkpoints(self) -> set[str]:
        return {p.name for p in present_checkpoints(self.path)} - self.seen

    @property
    def pending(self) -> bool:
        """Whether checkpoints of it are being measured, or wait to be (a held cube, new files)."""
        return not self.failed and (
            self.in_flight is not None or self.waiting_for_lock or bool(self.new_checkpoints())
        )


class _Watcher:
    def __init__(
        self,
        path: Path,
        device: str,
        interval: float,
        tensorboard: Path | None,
        figures: bool,
        jobs: int,
        include_sweep: bool,
        echo: Echo,
    ):
        self.path, self.device, self.interval = path, device, interval
        self.tensorboard, self.figures, self.jobs = tensorboard, figures, jobs
        self.include_sweep, self.echo = include_sweep, echo
        self.runs: dict[Path, _Run] = {}
        self.result = WatchResult()
        self.pool: ProcessPoolExecutor | None = None
        self._children_before: set = set()
        self._said_waiting = False

    # -- the passes --------------------------------------------------------------------------------

    def run(self) -> WatchResult:
        while True:
            followed = follow(self.path, self.include_sweep)
            # every run's lock is read before its checkpoints are listed: a run seen over then has them all
            training = {run: read_training(run) for run in followed.runs}
            self._say_waiting(followed, training)
            for run, name in followed.runs.items():
                state = self._state(run, name, followed, training[run])
                self._collect(state)
                if training[run].started and not state.failed and state.in_flight is None:
                    self._measure(state)
                self._report_end(state, training[run])
            if self._done(followed, training):
                self._finish(followed)
                return self.result
            self._pause()

    def _done(self, followed: Followed, training: dict[Path, Training]) -> bool:
        """Whether what is followed is over and measured, or nothing of it can be measured any more."""
        states = [self.runs[run] for run in followed.runs]
        if states and all(s.failed for s in states):
            return True
        return is_over(followed, training) and not any(s.pending for s in states)

    def _state(self, run: Path, name: str, followed: Followed, training: Training) -> _Run:
        if run not in self.runs:
            log = ScalarLog(self.tensorboard / name) if self.tensorboard is not None else None
            self.runs[run] = _Run(run, name, log)
            self.result.added[run] = 0
        state = self.runs[run]
        if followed.kind != "run" and training.started and not state.announced:
            state.announced = True
            self.echo(f"following {name} ({run})")
        return state

    def _measure(self, state: _Run) -> None:
        """Extract the checkpoints of ``state`` its cube lacks: now (one job) or in a worker (several)."""
        names = {p.name for p in present_checkpoints(state.path)}
        if not names - state.seen:
            return
        options = dict(device=self.device, progress=False)
        if self.jobs == 1:
            try:
                result = extract_with_threads(str(state.path), None, options)
            except SpectraError as e:
                self._handle(state, names, None, e)
                return
            self._handle(state, names, result, None)
            return
        if self.pool is None:
            self._children_before = set(multiprocessing.active_children())
            self.pool = worker_pool(self.jobs)
        future = self.pool.submit(extract_with_threads, str(state.path), threads_per_job(self.jobs), options)
        state.in_flight = (future, names)

    def _collect(self, state: _Run) -> None:
        """Take the result of ``state``'s extraction in a worker, if it has finished."""
        if state.in_flight is None or not state.in_flight[0].done():
            return
        future, names = state.in_flight
        state.in_flight = None
        error = future.exception()
        if error is not None and not isinstance(error, SpectraError):
            raise error  # a bug, not bad input: keep its traceback
        self._handle(state, names, None if error else future.result(), error)

    def _handle(
        self, state: _Run, names: set[str], result: ExtractResult | None, error: BaseException | None
    ) -> None:
        """What one extraction of ``names`` (the checkpoints present when it began) ended with."""
        if isinstance(error, LockedError):  # a concurrent extract: wait for it, never write past it
            if not state.waiting_for_lock:
                self.echo(f"{state.name}: {error}; waiting for it")
            state.waiting_for_lock = True
            return
        state.waiting_for_lock = False
        if isinstance(error, UnreadableCheckpointsError):
            self._report_unreadable(state, error.unreadable)
            result = error.result
        elif error is not None:
            state.failed = True
            self._problem(f"{state.name}: {error}; this run is no longer followed")
            return
        state.seen |= names
        assert result is not None
        if result.added or not state.synced:
            self._show(state, result)

    def _report_unreadable(self, state: _Run, unreadable: list[tuple[Path, str]]) -> None:
        for path, reason in unreadable:
            if path.name not in state.unreadable:
                state.unreadable.add(path.name)
                self.result.unreadable.append((path, reason))
                self.echo(
                    f"{state.name}: checkpoint {path.name} could not be read ({reason}); the watch goes on"
                )

    def _show(self, state: _Run, result: ExtractResult) -> None:
        """Progress lines for the steps ``result`` added, then the TensorBoard scalars and figures of the cube
        (all of it the first time, so that a cube made before this watch is shown too)."""
        if not result.path.is_file():
            return  # nothing readable was ever measured
        state.added += len(result.added)  # they are in the cube: counted before anything else can stop us
        self.result.added[state.path] = state.added
        cube = open_cube(result.path)
        headline = headline_pr(cube, result.added)
        for step, seconds in zip(result.added, result.seconds):
            tokens = int(cube["tokens"].sel(step=step))
            pr = headline.get(tokens)
            shown = f"{pr:.2f}" if pr is not None else "undefined"
            self.echo(f"{state.name}  tokens {tokens:,}  mean key PR {shown}  {seconds:.1f} s")
        if state.tensorboard is not None:  # the whole cube the first time: a cube made before this watch too
            state.tensorboard.add(checkpoint_scalars(cube, result.added if state.synced else None))
        if self.figures and state.figures:
            try:
                write_run_figures(cube, state.path)
            except SpectraError as e:
                state.figures = False
                self._problem(f"{state.name}: figures not drawn: {e}")
        state.synced = True

    # -- beginnings and ends ----------------------------------------------------------------------------

    def opening_line(self) -> str:
        where = [f"spectra on {self.device}", f"a look every {self.interval:g} s"]
        if self.tensorboard is not None:
            where.append(f"TensorBoard scalars in {self.tensorboard}/<run>")
        if self.figures:
            where.append("figures in <run>/figures/")
        m = HEADLINE
        return (
            f"watching {self.path} ({'; '.join(where)}); mean key PR: keys at site {m.site}, {m.centering}, "
            f"PR on singular values"
        )

    def _say_waiting(self, followed: Followed, training: dict[Path, Training]) -> None:
        if self._said_waiting:
            return
        if followed.kind is None:
            self.echo(f"waiting for {self.path}: no run or study there yet")
        elif followed.kind == "run" and not training[self.path].started:
            self.echo(f"waiting for {self.path}: its training has not started yet")
        else:
            return
        self._said_waiting = True

    def _report_end(self, state: _Run, training: Training) -> None:
        """Say once that a run's training is over, when all of its checkpoints are in its cube."""
        if state.ended or not training.over or state.pending:
            return
        state.ended = True
        line = f"{state.name}: training over ({training.describe()}); {state.added} checkpoint(s) added by this watch"
        if training.status not in ("completed", "diverged", "failed"):
            line += "; if it is resumed, watch it again"
        self.echo(line)

    def _finish(self, followed: Followed) -> None:
        total = sum(self.result.added.values())
        what = {"run": "run", "study": "study", "runs": "directory of runs"}[followed.kind or "run"]
        measured = sum(1 for state in self.runs.values() if state.synced)
        self.echo(f"watch done ({what} over): {total} checkpoint(s) added; {measured} run(s) measured")

    def _problem(self, line: str) -> None:
        self.result.problems.append(line)
        self.echo(line)

    def stopped_line(self, signal_name: str) -> str:
        total = sum(self.result.added.values())
        return (
            f"watch stopped by {signal_name}: {total} checkpoint(s) added; every {CUBE_FILENAME} holds what was "
            "written whole before it (run watch again to go on)"
        )

    # -- waiting and workers ----------------------------------------------------------------------------

    def _pause(self) -> None:
        """Sleep until the next look, or until a worker finishes, whichever comes first."""
        futures = [s.in_flight[0] for s in self.runs.values() if s.in_flight is not None]
        if futures:
            wait_for(futures, timeout=self.interval, return_when=FIRST_COMPLETED)
        else:
            _pause(self.interval)

    def stop_workers(self) -> None:
        """Stop the worker processes this watch started, at once (their cubes keep their last whole write)."""
        if self.pool is None:
            return
        for child in set(multiprocessing.active_children()) - self._children_before:
            child.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        for state in self.runs.values():
            if state.tensorboard is not None:
                state.tensorboard.close()


def _pause(seconds: float) -> None:
    """The wait between two looks (tests replace it to act between them)."""
    time.sleep(seconds)


@contextlib.contextmanager
def _signals_stop() -> Iterator[Callable[[], str | None]]:
    """SIGTERM stops the watch as Ctrl-C does (a ``KeyboardInterrupt`` in the main thread), so that a cube being
    written is left as it was and its temporary file removed; yields a function naming the signal that came.
    Outside the main thread nothing is installed."""
    came: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def stop(signum: int, _frame: object) -> None:
        came.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(came[-1])

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: came[0] if came else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
