"""``collapse-train study --watch``: one ``collapse-spectra watch`` beside the study's runs, in a process of its own.

The trainer never imports spectra (docs/architecture.md), so the watcher is started by command: ``python -m
cli.spectra watch STUDY_DIR --device DEVICE --tensorboard STUDY_DIR/tensorboard``, with this interpreter (the
same installation as the study's), its output appended to ``STUDY_DIR/logs/watch.log``. It follows every main
run of the study as its checkpoints land, on a device the runs do not use (the CPU by default).

Its lifetime is the study's: it is started once the study process holds the study directory's lock and has
written ``study.json``, and a watch of a study ends when no study process works on it and no run of it is
training (docs/watching.md). :meth:`StudyWatcher.finish` is therefore called after the lock is released, and
waits for the watcher's last pass, so that every main run's cube is complete when ``collapse-train study``
returns. When the study is stopped (Ctrl-C, SIGTERM), :meth:`StudyWatcher.stop` stops the watcher too; its
cubes keep their last whole write.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WATCH_LOG", "WATCH_TENSORBOARD", "StudyWatch", "StudyWatcher"]

WATCH_LOG = "logs/watch.log"
"""The watcher's output, in the study directory (appended to by every invocation)."""
WATCH_TENSORBOARD = "tensorboard"
"""The watcher's TensorBoard directory in the study directory: one sub-directory per run."""


@dataclass(frozen=True)
class StudyWatch:
    """How the study's watcher runs."""

    device: str = "cpu"
    """Where it measures: the CPU, or a GPU the runs do not use (``cuda:7`` beside ``--jobs 7`` on eight)."""
    interval: float = 10.0
    """Seconds between two looks at the study directory."""

    def command(self, out: Path) -> list[str]:
        """The watcher's command line for the study directory ``out``."""
        return [
            sys.executable, "-m", "cli.spectra", "watch", str(out),
            "--device", self.device, "--interval", f"{self.interval:g}",
            "--tensorboard", str(out / WATCH_TENSORBOARD),
        ]  # fmt: skip


class StudyWatcher:
    """The watcher process of one study invocation.

    Parameters
    ----------
    out
        The study directory (its ``study.json`` written, its lock held by this process).
    options
        Device and interval.
    echo
        Where the runner's lines go.
    """

    def __init__(self, out: Path, options: StudyWatch, echo: Callable[[str], None]):
        self.out, self.options, self.echo = out, options, echo
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.out / WATCH_LOG
        log.parent.mkdir(parents=True, exist_ok=True)
        command = self.options.command(self.out)
        with open(log, "a", encoding="utf-8") as stream:
            stream.write(f"=== {' '.join(command)}\n")
            stream.flush()
            self.process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        self.echo(
            f"watch: spectra of every main run on {self.options.device} as its checkpoints land (pid "
            f"{self.process.pid}); TensorBoard: tensorboard --logdir {self.out / WATCH_TENSORBOARD}; log {WATCH_LOG}"
        )

    def finish(self) -> int | None:
        """Wait for the watcher to end by itself (the study's lock released: it makes its last pass and stops);
        return its exit status."""
        if self.process is None:
            return None
        status = self.process.wait()
        if status == 0:
            self.echo("watch: done; every main run's cube holds its checkpoints")
        else:
            self.echo(f"watch: ended with exit status {status}; see {self.out / WATCH_LOG}")
        return status

    def discard(self) -> None:
        """Remove what the (stopped) watcher left of a study that never started: its log, and ``logs/`` if
        that is then empty (it watched no run, so it wrote no TensorBoard scalar)."""
        log = self.out / WATCH_LOG
        log.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            log.parent.rmdir()  # only when empty

    def stop(self) -> None:
        """Stop the watcher (SIGTERM: exit status 130, every cube whole) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()
