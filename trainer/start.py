"""How a run begins in its run directory: fresh, resumed, restarted, or not at all (already complete).

A run directory (docs/training.md) is written by one process at a time: rank 0 of the training job
creates it if needed and holds its lock (:func:`claim_run_dir`) from before it looks at the directory until
the run ends. What a start or a restart does is decided from the directory alone, read-only, by
:func:`plan_start`, the same way on every rank:

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

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.checkpoint import list_checkpoints, read_checkpoint_metadata
from trainer.config import RunConfig, differences_from_saved
from trainer.data.dataset import TokenDataset
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.errors import TrainerError
from trainer.fileio import check_writable
from trainer.resume import ResumeError, list_resume_states
from trainer.rundir import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    RESUME_DIR,
    RUN_ENTRIES,
    lock_run_dir,
    read_config,
    read_run_record,
)

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


def _agree(error: TrainerError | None, info: DistInfo, device: torch.device) -> None:
    """Raise on every rank if rank 0 failed (``error``): no rank may go on alone into a collective."""
    if info.enabled:
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        all_reduce_sum(failed, info)
        if error is None and failed.item() > 0:
            raise TrainerError("rank 0 could not claim the run directory (its message says why)")
    if error is not None:
        raise error


def claim_run_dir(
    out_dir: Path, resume: bool, info: DistInfo, device: torch.device, held: contextlib.ExitStack
) -> None:
    """Rank 0 creates the run directory if needed and locks it for the whole run; every rank agrees."""
    error = None
    if info.is_main:
        try:
            prepare_run_dir(out_dir, resume)
            held.enter_context(lock_run_dir(out_dir))
        except TrainerError as e:
            error = e
    _agree(error, info, device)


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


def _recorded_dataset(out_dir: Path, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The dataset the run in ``out_dir`` was trained on: run.json's record, else a checkpoint's header."""
    if record and isinstance(record.get("dataset"), dict):
        return record["dataset"]
    found: dict[str, Any] = {}
    if record and record.get("data_dir"):
        found["path"] = record["data_dir"]
    checkpoints = list_checkpoints(out_dir / CHECKPOINT_DIR)
    if checkpoints:
        meta = read_checkpoint_metadata(checkpoints[-1][1])
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
    saved = read_config(out_dir)
    if saved is None:
        return
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
    record = read_run_record(out_dir)
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
