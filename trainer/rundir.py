"""One run directory, one run: claiming it, deciding how a (re)started run begins, cleaning debris.

A run directory (docs/training.md) is written by one process at a time: rank 0 of the training job
holds an exclusive lock on ``RUN_DIR/.lock`` (:class:`trainer.fileio.ExclusiveLock`) from before it
looks at the directory until the run ends. What a start or a restart does is decided from the
directory alone, read-only, by :func:`plan_start`, the same way on every rank:

==================================================  ===========================================
the directory                                        ``run``                 ``run --resume``
==================================================  ===========================================
missing or empty                                     start at step 0         start at step 0 (empty) / error (missing)
a finished run (``run.json`` status ``completed``)   refused: exists          nothing to do, said so
a complete resume state                              refused: exists          continue from it
traces of a run killed before its first resume       refused: exists          start again at step 0
state (config, run.json, the step-0 checkpoint)
anything else (files that are not a run's)           refused                  refused
==================================================  ===========================================

A restart is refused when the run in the directory was made with another config (every differing key
is named) or another dataset (both are named: their paths and eval-batch hashes), so one directory
never mixes two runs.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.checkpoint import list_checkpoints
from trainer.config import RunConfig
from trainer.data.dataset import TokenDataset
from trainer.errors import RunLockedError, TrainerError
from trainer.fileio import (
    ExclusiveLock,
    atomic_write_text,
    check_writable,
    naming_a_full_disk,
    remove_stale_temporaries,
)
from trainer.provenance import utc_now
from trainer.resume import ResumeError, differences_from_saved, list_resume_states

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
CONFIG_FILE = "config.toml"
CHECKPOINT_DIR = "checkpoints"
RESUME_DIR = "resume"
LOCK_FILE = ".lock"
RUN_ENTRIES = frozenset({METRICS_FILE, RUN_FILE, CONFIG_FILE, CHECKPOINT_DIR, RESUME_DIR, LOCK_FILE})
"""Every name the trainer creates in a run directory (besides its hidden temporaries)."""
STALE_PATTERNS = (".run.json.*.tmp", ".config.toml.*.tmp", ".metrics.jsonl.*.tmp", ".write-test-*")
"""Hidden temporaries of the run directory's own files that a killed writer can leave."""

StartKind = Literal["fresh", "resume", "restart", "completed"]


@dataclass(frozen=True)
class StartPlan:
    """How a run begins in its directory (see the module docstring)."""

    kind: StartKind
    """``fresh`` (step 0 in a new or empty directory), ``resume`` (from the newest resume state),
    ``restart`` (step 0 over the traces of a run killed before its first resume state) or
    ``completed`` (nothing to do)."""
    note: str = ""
    """What to tell the user about it (empty for a plain start or resume)."""


def lock_run_dir(out_dir: Path) -> ExclusiveLock:
    """The lock of a run directory (enter it to hold it; the directory must exist).

    A second process is refused with :class:`trainer.errors.RunLockedError`, which a study's worker reads
    as "running elsewhere".
    """
    return ExclusiveLock(out_dir / LOCK_FILE, f"run directory {out_dir}", RunLockedError)


def prepare_run_dir(out_dir: Path, resume: bool) -> None:
    """Create the run directory if a start may create it; refuse a path that cannot be one.

    Raises :class:`TrainerError` for a path that exists and is not a directory, for ``--resume`` of a
    directory that does not exist, and for a directory that cannot be created.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainerError(f"run directory {out_dir} exists and is not a directory")
    if resume and not out_dir.is_dir():
        raise ResumeError(f"--resume: run directory {out_dir} does not exist")
    check_writable(out_dir, "run directory", into=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainerError(f"cannot write the run directory {out_dir}: {e.strerror or e}") from e


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
# Deciding how to start


def dataset_identity(ds: TokenDataset) -> dict[str, Any]:
    """What identifies a dataset for a run: its path, eval-batch hash, train tokens, tokenizer."""
    tokenizer = ds.meta.get("tokenizer", {})
    return {
        "path": str(ds.path.resolve()),
        "eval_batch_sha256": ds.eval_batch_sha256,
        "train_tokens": ds.meta.get("splits", {}).get("train", {}).get("tokens"),
        "vocab_size": ds.vocab_size,
        "tokenizer_sha256": tokenizer.get("sha256") if isinstance(tokenizer, dict) else None,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainerError(f"{path}: not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise TrainerError(f"{path}: not a run record (a JSON object)")
    return data


def _recorded_dataset(out_dir: Path, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The dataset the run in ``out_dir`` was trained on: run.json's record, else a checkpoint's header."""
    if record and isinstance(record.get("dataset"), dict):
        return record["dataset"]
    found: dict[str, Any] = {}
    if record and record.get("data_dir"):
        found["path"] = record["data_dir"]
    checkpoints = list_checkpoints(out_dir / CHECKPOINT_DIR)
    if checkpoints:
        import safetensors

        try:
            with safetensors.safe_open(str(checkpoints[-1][1]), "pt") as f:
                meta = f.metadata() or {}
        except safetensors.SafetensorError:
            meta = {}
        if meta.get("eval_batch_sha256"):
            found["eval_batch_sha256"] = meta["eval_batch_sha256"]
        found.setdefault("path", meta.get("data_dir"))
    return found or None


def check_same_dataset(out_dir: Path, record: dict[str, Any] | None, ds: TokenDataset) -> None:
    """Refuse to continue a run on another dataset than the one it was trained on, naming both.

    The path alone does not decide: a dataset directory that was moved is the same dataset (same
    eval-batch hash and train tokens), and another dataset prepared into the same path is not.
    """
    recorded = _recorded_dataset(out_dir, record)
    if not recorded:
        return
    now = dataset_identity(ds)
    keys = [
        k for k in ("eval_batch_sha256", "train_tokens", "vocab_size", "tokenizer_sha256") if recorded.get(k)
    ]
    if not keys:  # only a path is known (a run from before identities were recorded)
        keys = ["path"]
    if all(recorded.get(k) == now[k] for k in keys):
        return

    def describe(identity: dict[str, Any]) -> str:
        sha = identity.get("eval_batch_sha256")
        tokens = identity.get("train_tokens")
        details = ", ".join(
            x
            for x in (f"eval batch {sha[:12]}" if sha else "", f"{tokens:,} train tokens" if tokens else "")
            if x
        )
        return f"{identity.get('path', '?')}" + (f" ({details})" if details else "")

    raise TrainerError(
        f"{out_dir} was trained on {describe(recorded)}, but --data is {describe(now)}: one run directory holds "
        f"one run; continue it with --data {recorded.get('path', '<its dataset>')}, or train into another --out"
    )


def _check_same_config(out_dir: Path, cfg: RunConfig) -> None:
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainerError(f"{path}: not a readable run config ({e})") from None
    diff = differences_from_saved(saved, cfg)
    if diff:
        raise ResumeError(
            f"--resume: the config differs from the one {out_dir} was started with: " + "; ".join(diff)
        )


def _foreign_entries(out_dir: Path) -> list[str]:
    return sorted(
        p.name for p in out_dir.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith(".")
    )


def plan_start(
    out_dir: Path, cfg: RunConfig, ds: TokenDataset, *, resume: bool, total_steps: int
) -> StartPlan:
    """Decide, without writing anything, how the run ``cfg`` begins in ``out_dir`` (see the module docstring).

    Raises
    ------
    TrainerError
        The directory holds something else than this run: files that are not a run's, a run of another
        config or dataset, or (without ``resume``) any run at all.
    """
    entries = [p.name for p in out_dir.iterdir()] if out_dir.is_dir() else []
    if not [e for e in entries if e != LOCK_FILE and not e.startswith(".")]:
        return StartPlan("fresh", f"no run in {out_dir} yet: starting at step 0" if resume else "")
    if not resume:
        raise TrainerError(
            f"run directory {out_dir} already exists and is not empty; choose another --out, "
            "or pass --resume to continue the run in it"
        )
    foreign = _foreign_entries(out_dir)
    record = _read_json(out_dir / RUN_FILE)
    if foreign and record is None:
        raise TrainerError(
            f"--resume: {out_dir} holds no run made by collapse-train (it has {', '.join(foreign[:5])}); "
            "choose the run's own directory"
        )
    check_same_dataset(out_dir, record, ds)
    if record and record.get("status") == "completed" and record.get("final_step") == total_steps:
        _check_same_config(out_dir, cfg)
        return StartPlan("completed", f"{out_dir} already completed at step {total_steps}: nothing to do")
    if list_resume_states(out_dir):
        return StartPlan("resume")  # load_resume_state checks the config against the state's own copy
    _check_same_config(out_dir, cfg)
    later = [t for t, _ in list_checkpoints(out_dir / CHECKPOINT_DIR) if t > 0]
    if later:
        raise ResumeError(
            f"--resume: {out_dir} has checkpoints up to {later[-1]:,} tokens but no resume state (was "
            f"{out_dir / RESUME_DIR} removed?); restarting would rewrite them: move them away first"
        )
    return StartPlan(
        "restart", f"{out_dir} holds no resume state (killed before its first one): starting again at step 0"
    )


# ----------------------------------------------------------------------------------------------------
# The run's own files: metrics.jsonl and run.json


def finite_or_none(x: float) -> float | None:
    """Strict JSON has no NaN: non-finite numbers become null in metrics.jsonl and run.json."""
    return x if math.isfinite(x) else None


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes each line.

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


class RunRecord:
    """``run.json``: who ran what, where, when, and how it ended; rewritten atomically.

    A resumed run appends a segment, so the file tells the whole story of a run directory.
    """

    def __init__(self, path: Path, static: dict[str, Any], enabled: bool = True, resume: bool = False):
        self.path = path
        self.enabled = enabled
        self.record: dict[str, Any] = {**static, "start_time": None, "segments": []}
        if resume and enabled and path.exists():
            try:
                previous = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise TrainerError(f"{path}: not valid JSON ({e}); cannot resume onto it") from None
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
            tokens_per_s=finite_or_none(tokens_trained / wall) if wall > 0 else None,
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
