"""The run directory: every name in it, its lock, and the one reader and writer of the run's own files.

Layout (docs/training.md is the reference)::

    RUN_DIR/
        config.toml     the resolved run config                   write_config, read_config
        run.json        versions, git, device, segments, status   RunRecord, read_run_record
        metrics.jsonl   one JSON line per log step and checkpoint  MetricsLogger, read_metrics
        checkpoints/    tokens_<12 digits>.safetensors             trainer.checkpoint
        resume/         step_<8 digits>/                           trainer.resume
        tensorboard/    event files (train.tensorboard = true)     trainer.tensorboard
        .lock           held by the one process writing here       lock_run_dir

The names are defined here and nowhere else; the formats of the three files above are written and read
here only (the training loop, the start decision and the study layer all go through this module), and
:func:`read_run_state` is what a run directory says about its run to anyone who asks. A run directory is
written by one process at a time: rank 0 of the training job holds an exclusive lock on ``RUN_DIR/.lock``
from before it looks at the directory until the run ends. How a run begins in its directory is decided by
:mod:`trainer.start`.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainer.config import RunConfig
from trainer.errors import RunLockedError, TrainerError
from trainer.fileio import (
    ExclusiveLock,
    atomic_write_text,
    naming_a_full_disk,
    remove_stale_temporaries,
)
from trainer.provenance import utc_now

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
CONFIG_FILE = "config.toml"
CHECKPOINT_DIR = "checkpoints"
RESUME_DIR = "resume"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
RUN_ENTRIES = frozenset(
    {METRICS_FILE, RUN_FILE, CONFIG_FILE, CHECKPOINT_DIR, RESUME_DIR, TENSORBOARD_DIR, LOCK_FILE}
)
"""Every name the trainer creates in a run directory (besides its hidden temporaries)."""
STALE_PATTERNS = (".run.json.*.tmp", ".config.toml.*.tmp", ".metrics.jsonl.*.tmp", ".write-test-*")
"""Hidden temporaries of the run directory's own files that a killed writer can leave."""


def lock_run_dir(out_dir: Path) -> ExclusiveLock:
    """The lock of a run directory (enter it to hold it; the directory must exist).

    A second process is refused with :class:`trainer.errors.RunLockedError`, which a study's worker reads
    as "running elsewhere".
    """
    return ExclusiveLock(out_dir / LOCK_FILE, f"run directory {out_dir}", RunLockedError)


def create_run_files(out_dir: Path) -> None:
    """Create ``checkpoints/`` and check the directory is writable (an unwritable place is a TrainerError)."""
    try:
        (out_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainerError(f"cannot write the run directory {out_dir}: {e.strerror or e}") from e


def clean_stale_files(out_dir: Path) -> list[Path]:
    """Remove the temporaries a killed run left in its directory (only the trainer's own patterns)."""
    removed = remove_stale_temporaries(out_dir, STALE_PATTERNS)
    removed += remove_stale_temporaries(out_dir / CHECKPOINT_DIR, (".tokens_*.tmp",))
    return removed


# ----------------------------------------------------------------------------------------------------
# config.toml


def write_config(run_dir: Path, cfg: RunConfig, replace: bool = True) -> None:
    """Write ``config.toml``: the resolved run config, atomically; with ``replace`` false, only where there
    is none (a continued run keeps the one it started with, which :mod:`trainer.start` checked equal)."""
    path = run_dir / CONFIG_FILE
    if replace or not path.exists():
        atomic_write_text(path, cfg.to_toml())


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The plain data of ``run_dir``'s ``config.toml``, or None when it has none.

    Raises
    ------
    TrainerError
        The file cannot be read as TOML; the message names it.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TrainerError(f"{path}: not a readable run config ({e})") from None


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl


def _finite_or_none(x: float) -> float | None:
    """Strict JSON has no NaN: non-finite numbers become null in metrics.jsonl and run.json."""
    return x if math.isfinite(x) else None


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes each line.

    The training loop writes two kinds of line (docs/training.md): :meth:`log_train` at each log step and
    :meth:`log_val` at each checkpoint; :func:`read_metrics` reads them back.

    Parameters
    ----------
    path
        The file (created on the first line).
    enabled
        False on every rank but 0: :meth:`log` does nothing.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._file = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with naming_a_full_disk(self.path):  # a partial last line is dropped by the next --resume
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across steps
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()

    def log_train(
        self,
        step: int,
        tokens: int,
        train_loss: float,
        lrs: dict[str, float],
        grad_norm: float,
        tokens_per_s: float,
    ) -> None:
        """The line of a log step: mean train loss since the last one, learning rates, gradient norm, speed."""
        self.log(
            {
                "kind": "train",
                "step": step,
                "tokens": tokens,
                "train_loss": train_loss,
                "lr": lrs,
                "grad_norm": _finite_or_none(grad_norm),
                "tokens_per_s": _finite_or_none(tokens_per_s),
            }
        )

    def log_val(self, step: int, tokens: int, val_loss: float, checkpoint: str | None) -> None:
        """The line of a checkpoint: validation loss and the checkpoint's file name (None on other ranks)."""
        self.log(
            {
                "kind": "val",
                "step": step,
                "tokens": tokens,
                "val_loss": _finite_or_none(val_loss),
                "checkpoint": checkpoint,
            }
        )

    def truncate_after(self, step: int) -> int:
        """Keep only lines with ``step <= step`` (atomically); return how many lines were dropped.

        A resumed run redoes the steps after its resume state, so lines logged after it by the
        killed process would otherwise appear twice. A partial last line (killed mid-write) is
        dropped; an unparseable line elsewhere means the file was edited, and is an error.
        """
        if not self.enabled or not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    continue
                raise TrainerError(f"{self.path}:{i + 1}: not a JSON line; cannot resume onto it") from None
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        return len(lines) - len(kept)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of ``run_dir``'s ``metrics.jsonl`` (none when it has none), oldest first.

    A line cut by a kill mid-write is skipped (the trainer drops it when the run is resumed).
    """
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------------------------------
# run.json


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir``'s ``run.json`` as a dict, or None when it has none.

    Raises
    ------
    TrainerError
        The file is not valid JSON or not a JSON object (a damaged run directory); the message names it.
    """
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainerError(f"{path}: not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise TrainerError(f"{path}: not a run record (a JSON object)")
    return data


class RunRecord:
    """``run.json``: who ran what, where, when, and how it ended; rewritten atomically.

    A resumed run appends a segment, so the file tells the whole story of a run directory.

    Parameters
    ----------
    run_dir
        The run directory.
    static
        What does not change while the run trains: versions, git revision, device, seed, dataset, schedule
        (docs/training.md lists the keys).
    enabled
        False on every rank but 0: nothing is written.
    resume
        Continue the record already in ``run_dir`` (its first start time and its segments).
    """

    def __init__(self, run_dir: Path, static: dict[str, Any], enabled: bool = True, resume: bool = False):
        self.path = run_dir / RUN_FILE
        self.enabled = enabled
        self.record: dict[str, Any] = {**static, "start_time": None, "segments": []}
        previous = read_run_record(run_dir) if resume and enabled else None
        if previous is not None:
            self.record["segments"] = previous.get("segments", [])
            self.record["start_time"] = previous.get("start_time")
            last = self.record["segments"][-1] if self.record["segments"] else None
            if last is not None and last.get("status") == "running":
                # we hold the run directory's lock, so no process is running it: its writer died unrecorded
                last.update(
                    status="killed",
                    note="the process ended without recording how (SIGKILL, out of memory, power loss)",
                )
        self._t0 = time.perf_counter()

    def start(self, step: int) -> None:
        """Open a segment (status ``running``) and write the file."""
        self._t0 = time.perf_counter()
        now = utc_now()
        if not self.record.get("start_time"):  # a resumed run keeps its first start
            self.record["start_time"] = now
        self.record["segments"].append({"start_time": now, "start_step": step, "status": "running"})
        self.record.update(status="running", end_time=None, error=None)
        self.write()

    def finish(self, status: str, step: int, tokens_trained: int, error: str | None = None) -> None:
        """Close the segment with ``status`` at ``step`` and write the file."""
        wall = time.perf_counter() - self._t0
        segment = self.record["segments"][-1]
        segment.update(
            end_time=utc_now(),
            end_step=step,
            status=status,
            wall_time_s=round(wall, 3),
            tokens_per_s=_finite_or_none(tokens_trained / wall) if wall > 0 else None,
        )
        self.record.update(
            status=status,
            end_time=segment["end_time"],
            final_step=step,
            wall_time_s=round(sum(s.get("wall_time_s", 0.0) for s in self.record["segments"]), 3),
            error=error,
        )
        self.write()

    def write(self) -> None:
        if self.enabled:
            atomic_write_text(self.path, json.dumps(self.record, indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# What a run directory says about its run


@dataclass(frozen=True)
class RunState:
    """A run directory as read from disk (``run.json`` and ``metrics.jsonl``)."""

    status: str
    """``missing`` (no directory), ``new`` (a directory without run.json), or run.json's status:
    ``running`` (or killed), ``completed``, ``diverged``, ``failed``, ``interrupted``."""
    tokens: int = 0
    """Training tokens reached (the newest metrics line)."""
    total_tokens: int | None = None
    """The run's whole budget in whole steps (run.json), once it has started."""
    wall_time_s: float = 0.0
    """Time spent training, all segments (the open one up to now)."""
    final_val_loss: float | None = None
    """Validation loss at the last step of a completed run; None otherwise or when not finite."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Completed or diverged: nothing more will come of training it again."""
        return self.status in ("completed", "diverged")


def read_run_state(run_dir: Path) -> RunState:
    """The :class:`RunState` of ``run_dir`` (read only; an unreadable run.json reads as ``failed``)."""
    if not run_dir.exists():
        return RunState("missing")
    try:
        record = read_run_record(run_dir)
    except TrainerError as e:
        return RunState("failed", error=str(e))
    if record is None:
        return RunState("new")
    metrics = read_metrics(run_dir)
    tokens = max((m.get("tokens", 0) for m in metrics), default=0)
    status = record.get("status", "running")
    wall = float(record.get("wall_time_s") or 0.0)
    segments = record.get("segments") or []
    if status == "running" and segments and segments[-1].get("start_time"):
        closed = sum(float(s.get("wall_time_s") or 0.0) for s in segments[:-1])
        started = datetime.fromisoformat(segments[-1]["start_time"])
        wall = closed + max(0.0, (datetime.now(UTC) - started).total_seconds())
    val_loss = None
    if status == "completed":
        final = record.get("final_step")
        at_end = [m for m in metrics if m.get("kind") == "val" and m.get("step") == final]
        if at_end and isinstance(at_end[-1].get("val_loss"), int | float):
            val_loss = float(at_end[-1]["val_loss"])
            val_loss = val_loss if math.isfinite(val_loss) else None
    return RunState(
        status,
        tokens=int(tokens),
        total_tokens=record.get("total_tokens"),
        wall_time_s=wall,
        final_val_loss=val_loss,
        error=record.get("error"),
    )
