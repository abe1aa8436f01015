"""The training loop and the small components it calls.

:func:`train` is the one entry point (``collapse-train run`` calls it once). The loop composes,
it does not contain: it asks a :class:`Checkpointer` whether a step is a milestone and to write
it, a :class:`Validator` for the fixed validation loss, a :class:`MetricsLogger` to append a JSON
line, a :class:`RunRecord` to keep ``run.json`` current, and :mod:`trainer.resume` to write the
state a killed run continues from. Nothing here measures spectra (see DESIGN.md).

Step numbering: ``step`` counts completed optimizer updates. Step 0 is the freshly initialised
model (always checkpointed); update ``s`` (0-based) reads the batches ``batch_at(seed, s, micro)``
and produces step ``s + 1``. After step ``s`` the run has consumed ``s * tokens_per_step`` tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.checkpoint import atomic_write_text, checkpoint_name, list_checkpoints, save_checkpoint
from trainer.config import RunConfig
from trainer.data.dataset import TokenDataset, fixed_batches
from trainer.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from trainer.errors import TrainerError
from trainer.fileio import DiskFullError, naming_a_full_disk
from trainer.model import LLM
from trainer.optim import Optimizers, clip_grad_norm
from trainer.provenance import device_description, git_revision, software_versions, utc_now
from trainer.resume import load_resume_state, save_resume_state
from trainer.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILE,
    StartPlan,
    clean_stale_files,
    create_run_files,
    dataset_identity,
    lock_run_dir,
    plan_start,
    prepare_run_dir,
)
from trainer.step import BatchPrefetcher, sdpa_context

PLAN_MILESTONES = (Fraction(0), Fraction(1, 2), 1, 2, 4, 8, 12, 16, 20, 25)
"""The plan's checkpoints (0, 0.5M, 1M, 2M, 4M, 8M, 12M, 16M, 20M, 25M tokens) in 25ths of the budget."""


class DivergedError(TrainerError):
    """The training loss or gradient norm became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------
# Pure schedule arithmetic


def tokens_per_step(cfg: RunConfig, world_size: int = 1) -> int:
    """Tokens consumed by one optimizer step: ``batch_size * seq_len * grad_accum * world_size``."""
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum * world_size


def total_steps_for(cfg: RunConfig, tokens_per_step: int) -> int:
    """Whole optimizer steps that fit in ``train.tokens``; raises :class:`TrainerError` if none does."""
    steps = cfg.train.tokens // tokens_per_step
    if steps <= 0:
        raise TrainerError(
            f"train.tokens={cfg.train.tokens} is less than one optimizer step of {tokens_per_step} tokens "
            "(batch_size * seq_len * grad_accum * processes); raise --tokens or lower train.batch_size"
        )
    return steps


def milestone_steps(cfg: RunConfig, tokens_per_step: int, total_steps: int) -> list[int]:
    """Optimizer steps at which analysis checkpoints are written, sorted and unique.

    Each token milestone ``m`` maps to the first step whose cumulative tokens reach it,
    ``ceil(m / tokens_per_step)``, capped at ``total_steps`` (the budget is rounded down to whole
    steps, so the last milestone can fall a fraction of a step past it). Step 0 and the final
    step are always included.

    ``train.milestones``:

    - ``plan``: (0, 0.5, 1, 2, 4, 8, 12, 16, 20, 25) / 25 of ``train.tokens`` (the source plan's
      0, 0.5M, ..., 25M tokens, scaled to the budget);
    - ``log``: step 0 and ``train.n_log_milestones`` steps log-spaced from 1 to ``total_steps``
      (rounded; duplicates at small step counts collapse);
    - ``plan+log``: the union of the two;
    - ``list``: ``train.milestone_tokens``; a value above ``train.tokens`` is an error.

    Examples
    --------
    >>> from trainer.config import RunConfig, TrainConfig
    >>> cfg = RunConfig(train=TrainConfig(tokens=25_000, batch_size=1, seq_len=100))
    >>> milestone_steps(cfg, tokens_per_step=100, total_steps=250)
    [0, 5, 10, 20, 40, 80, 120, 160, 200, 250]
    """
    t = cfg.train
    if total_steps <= 0 or tokens_per_step <= 0:
        raise TrainerError(
            f"need positive steps and tokens per step, got {total_steps} and {tokens_per_step}"
        )

    def first_step_reaching(tokens: Fraction | int) -> int:
        return min(math.ceil(Fraction(tokens) / tokens_per_step), total_steps)

    schedules = t.milestones.split("+")  # "plan+log" is the union of the two
    if t.milestones == "list":
        too_big = [m for m in t.milestone_tokens if m > t.tokens]
        if too_big:
            raise TrainerError(f"train.milestone_tokens {too_big} exceed the budget train.tokens={t.tokens}")
        steps = {first_step_reaching(m) for m in t.milestone_tokens}
    elif set(schedules) <= {"plan", "log"}:
        steps = set()
        if "plan" in schedules:
            steps |= {first_step_reaching(Fraction(t.tokens) * f / 25) for f in PLAN_MILESTONES}
        if "log" in schedules:
            if t.n_log_milestones < 1:
                raise TrainerError(f"train.n_log_milestones must be at least 1, got {t.n_log_milestones}")
            points = (
                np.geomspace(1, total_steps, t.n_log_milestones) if t.n_log_milestones > 1 else [total_steps]
            )
            steps |= {int(round(float(p))) for p in points}
    else:
        raise TrainerError(f"train.milestones: unknown schedule {t.milestones!r}")
    return sorted(steps | {0, total_steps})


def _finite_or_none(x: float) -> float | None:
    """Strict JSON has no NaN: non-finite numbers become null in metrics.jsonl and run.json."""
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------
# Components


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


class LossWindow:
    """The losses of the last ``size`` optimizer steps, for logged and checkpointed train loss.

    Its :meth:`state` goes into the resume state, so a resumed run logs the same numbers.
    """

    def __init__(self, size: int, losses: Iterable[float] = (), last_log_step: int = 0):
        self.losses: deque[float] = deque(losses, maxlen=size)
        self.last_log_step = last_log_step

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def mean(self, last: int | None = None) -> float:
        """Mean of the last ``last`` losses (all kept ones by default); NaN when there are none."""
        values = list(self.losses)[-last:] if last else list(self.losses)
        return math.fsum(values) / len(values) if values else math.nan

    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "last_log_step": self.last_log_step}

    @classmethod
    def from_state(cls, size: int, state: dict[str, Any]) -> LossWindow:
        return cls(size, state["losses"], state["last_log_step"])


class Validator:
    """Loss on a fixed slice of the validation split, the same tokens at every checkpoint.

    The slice is the first ``n_tokens`` tokens of the split cut into contiguous windows by
    ``trainer.data.dataset.fixed_batches``; it is read once and kept in memory. Under DDP the windows
    are dealt round-robin to the ranks and the token-weighted sums are all-reduced, so every
    rank returns the same value.

    Parameters
    ----------
    tokens
        The validation split (a memmap).
    n_tokens, batch_size, seq_len
        Size of the slice and shape of its batches.
    device, autocast
        Where and in which precision the forward passes run (as in training).
    info
        This process's place in the job.

    Attributes
    ----------
    n_tokens : int
        Tokens actually scored: ``n_tokens`` rounded down to whole windows, or less when the
        split is shorter (recorded in run.json as ``val_tokens``).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        n_tokens: int,
        *,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        info: DistInfo,
    ):
        # int64 (b, seq_len) pairs, b <= batch_size; fixed_batches raises if not one window fits
        batches = list(fixed_batches(tokens, n_tokens, batch_size=batch_size, seq_len=seq_len))
        self.n_tokens = sum(y.numel() for _, y in batches)
        self.batches = batches[info.rank :: info.world_size]
        self.device = device
        self.autocast = autocast
        self.info = info

    @torch.no_grad()
    def validate(self, model: nn.Module) -> float:
        """Mean next-token cross-entropy (nats/token) over the slice; every rank must call it."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss * tokens, tokens)
        for x, y in self.batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss = model(x, y)
            sums[0] += loss.double() * y.numel()
            sums[1] += y.numel()
        all_reduce_sum(sums, self.info)
        model.train(was_training)
        return (sums[0] / sums[1]).item()


class Checkpointer:
    """Writes an analysis checkpoint at each milestone step, atomically, with its metadata.

    Parameters
    ----------
    directory
        ``RUN_DIR/checkpoints``.
    steps
        Milestone steps (:func:`milestone_steps`).
    tokens_per_step
        For the file name, ``tokens_<12-digit tokens>.safetensors``.
    metadata
        Keys shared by every checkpoint of the run (model and run config, dataset, versions...);
        :meth:`save` adds ``step``, ``tokens``, ``train_loss`` and ``val_loss``.
    enabled
        False on every rank but 0.
    """

    def __init__(
        self,
        directory: Path,
        steps: Iterable[int],
        tokens_per_step: int,
        metadata: dict[str, Any],
        enabled: bool = True,
    ):
        self.directory = directory
        self.steps = frozenset(steps)
        self.tokens_per_step = tokens_per_step
        self.metadata = dict(metadata)
        self.enabled = enabled

    def due(self, step: int) -> bool:
        return step in self.steps

    def save(self, model: nn.Module, *, step: int, train_loss: float, val_loss: float) -> Path | None:
        """Write the checkpoint of ``step``; return its path (None on ranks that do not write)."""
        if not self.enabled:
            return None
        tokens = step * self.tokens_per_step
        meta = {
            **self.metadata,
            "step": step,
            "tokens": tokens,
            "train_loss": train_loss,
            "val_loss": val_loss,
        }
        return save_checkpoint(self.directory / checkpoint_name(tokens), model, meta)

    def latest(self, max_step: int | None = None) -> Path | None:
        """The newest complete checkpoint on disk (up to ``max_step``), or None."""
        limit = None if max_step is None else max_step * self.tokens_per_step
        found = [p for tokens, p in list_checkpoints(self.directory) if limit is None or tokens <= limit]
        return found[-1] if found else None


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


class Stepper:
    """One optimizer step: gradient accumulation over micro-batches, DDP sync, clipping, update.

    Parameters
    ----------
    model
        The plain model (its parameters are clipped and stepped).
    train_model
        What the forward runs through: ``model``, possibly compiled and/or wrapped in DDP.
    optimizers
        The run's :class:`~trainer.optim.Optimizers`.
    tokens
        The train split; micro-batch ``m`` of step ``s`` is ``batch_at(tokens, seed, s, m, ...)``,
        this rank's slice of the global batch, prefetched by a :class:`~trainer.step.BatchPrefetcher`.
    cfg
        The run config (batch shape, accumulation, seed, clipping).
    device, autocast, info
        Where, in which precision, and as which rank the step runs.
    deferred
        Leave each step's loss and gradient norm on the device until :meth:`results` reads them
        (default: on CUDA). Then a step only queues work and the host never waits for the device
        except when the loop reads; a non-finite step is still applied, and found at the next read,
        before anything is written. Not deferred (the CPU), each step is read at once and a non-finite
        step is not applied. Whatever writes a checkpoint or resume state must read (and check) the
        steps before it first, as the loop does at its log, checkpoint and resume steps.
    """

    def __init__(
        self,
        model: nn.Module,
        train_model: nn.Module,
        optimizers: Optimizers,
        tokens: np.ndarray,
        cfg: RunConfig,
        *,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        info: DistInfo,
        deferred: bool | None = None,
    ):
        self.model, self.train_model, self.optimizers = model, train_model, optimizers
        self.cfg, self.device, self.autocast, self.info = cfg, device, autocast, info
        self.batches = BatchPrefetcher(tokens, cfg.train, info, device)
        self.deferred = device.type == "cuda" if deferred is None else deferred
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (steps done, loss, grad norm)

    def __call__(self, step: int) -> dict[str, float]:
        """Take update ``step`` (0-based) and return the learning rate of each group; its loss and
        pre-clip gradient norm (the loss is the mean over the global batch) wait for :meth:`results`."""
        t = self.cfg.train
        lrs = self.optimizers.set_lr(step)
        loss_sum = torch.zeros((), device=self.device)  # promoted to float64 by a float64 model's loss
        for micro in range(t.grad_accum):
            x, y = self.batches.get(step, micro)  # (B, T) each
            # DDP all-reduces the gradients in the backward of the last micro-batch only
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last or not self.info.enabled else self.train_model.no_sync():
                with self.autocast():
                    loss = self.train_model(x, y)
                (loss / t.grad_accum).backward()
            self.batches.prefetch(step, micro)  # host work while the device runs the queued kernels
            loss_sum = loss_sum + loss.detach()
        loss_mean = all_reduce_mean(loss_sum / t.grad_accum, self.info)
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip)  # a device tensor: no sync
        if self.deferred or bool(torch.isfinite(torch.stack((loss_mean, grad_norm))).all()):
            self.optimizers.step()
        self.optimizers.zero_grad()
        self._pending.append((step + 1, loss_mean, grad_norm))
        return lrs

    def results(self, read: bool = True) -> list[tuple[int, float, float]]:
        """``(steps completed, loss, gradient norm)`` of every step since the last read, oldest first.

        Reading synchronises with the device once for all of them. When deferred and ``read`` is false,
        nothing is read and the list is empty; not deferred, every call reads.
        """
        if (self.deferred and not read) or not self._pending:
            return []
        values = torch.stack(
            [torch.stack((loss, norm)) for _, loss, norm in self._pending]
        ).tolist()  # (S, 2)
        done = [d for d, _, _ in self._pending]
        self._pending.clear()
        return [(d, loss, norm) for d, (loss, norm) in zip(done, values)]


# ----------------------------------------------------------------------------------------------------
# Device, precision, run directory


def autocast_factory(
    device: torch.device, dtype: str, sdpa_backend: str = "default", weights_dtype: str = "float32"
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the forward passes' context: precision and attention kernels.

    ``dtype`` ``auto`` is bfloat16 autocast on CUDA and plain float32 on the CPU; parameters and
    optimizer state stay in ``weights_dtype`` either way (autocast only lowers the matmul inputs).
    With ``weights_dtype`` ``float64`` ``auto`` means no autocast: the point of float64 weights is
    float64 arithmetic throughout.
    ``sdpa_backend`` is ``train.sdpa_backend`` (:func:`trainer.step.sdpa_context`); ``default`` adds
    no context.
    """
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and weights_dtype != "float64" else "float32"
    if dtype == "float32":
        precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    elif dtype == "bfloat16":
        precision = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        raise TrainerError(f"train.dtype={dtype!r}: expected auto, float32 or bfloat16")
    kernels = sdpa_context(sdpa_backend, device)
    if kernels is contextlib.nullcontext:
        return precision

    @contextlib.contextmanager
    def forward_context() -> Iterator[None]:
        with precision(), kernels():
            yield

    return forward_context


def _dataset_description(ds: TokenDataset) -> dict[str, Any]:
    meta = ds.meta
    return {
        "name": ds.name,
        "sources": meta.get("sources"),
        "filters": meta.get("filters"),
        "tokenizer": meta.get("tokenizer"),
        "vocab_size": ds.vocab_size,
        "eot_id": ds.eot_id,
        "split_tokens": {name: split["tokens"] for name, split in meta.get("splits", {}).items()},
    }


def _status_of(error: BaseException) -> str:
    """run.json status of a run that stopped with ``error``."""
    if isinstance(error, DivergedError):
        return "diverged"
    if isinstance(error, KeyboardInterrupt | TrainingInterrupted):
        return "interrupted"
    return "failed"


# ----------------------------------------------------------------------------------------------------
# Stopping on a signal


class TrainingInterrupted(TrainerError):
    """The run was stopped by SIGINT or SIGTERM; ``--resume`` continues it. Exit status 130."""

    exit_code = 130


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, SLURM preemption) stop the loop cleanly.

    In a single-process run the first signal asks the loop to stop after the step in progress: it
    writes a resume state there, records ``interrupted`` with the reason in run.json and raises
    :class:`TrainingInterrupted`, so no step is lost. A second signal stops at once (the resume
    state is then the newest one written before). Under DDP every rank would have to agree on the
    step to stop at, which would cost a collective at every step; there a signal stops at once
    (SIGTERM is turned into ``KeyboardInterrupt`` so that the run still records how it ended).
    Handlers can only be installed from the main thread; elsewhere Python's defaults stay.
    """

    def __init__(self, graceful: bool):
        self.graceful = graceful
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            self.signum = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and writing a resume state "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the run records how it ended; they take effect right after.

    The loop's own handlers are gone by the time a failure is recorded, so a signal in that window (torchrun
    stopping the other ranks when one fails, a second Ctrl-C) would end the process with run.json still
    saying ``running``. Handlers (process-wide, unlike a thread's signal mask: torch's threads would take the
    signal) note what arrives; afterwards the previous handlers are back and the first noted signal is sent
    again. Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            os.kill(os.getpid(), arrived[0])


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    path: Path
    """The run directory."""
    status: str
    """``completed`` (trained to the end now) or ``already completed`` (nothing was left to do)."""
    note: str = ""
    """What the run directory's state meant for this call (empty for a plain start or resume)."""


def train(
    cfg: RunConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``cfg`` on the dataset in ``data_dir``, writing the run directory ``out_dir``.

    Parameters
    ----------
    cfg
        The validated run config.
    data_dir
        A directory made by ``collapse-train prepare-data`` (``trainer.data.prepare_data``).
    out_dir
        The run directory; it must not exist or be empty, unless ``resume``.
    resume
        Continue the run in ``out_dir``: from its newest resume state; from step 0 when it was killed
        before writing one; not at all when it already completed (see :mod:`trainer.rundir`).
    progress
        Show a tqdm progress bar (rank 0 only).
    echo
        Called (on rank 0) with notes on what the directory's state meant, e.g. "already completed".

    Returns
    -------
    TrainResult
        The run directory and whether it trained or had nothing left to do.

    Raises
    ------
    TrainerError
        Bad dataset, vocabulary mismatch, an existing, locked or unwritable run directory, a config
        or dataset differing from the run being resumed, :class:`DivergedError` on a non-finite loss,
        :class:`TrainingInterrupted` on SIGINT or SIGTERM.

    Examples
    --------
    >>> from trainer.config import load_config
    >>> cfg = load_config("tiny", ["train.tokens=20000", "model.vocab_size=256"])  # doctest: +SKIP
    >>> train(cfg, "data/bible-mix", "runs/demo", progress=False).path  # doctest: +SKIP
    PosixPath('runs/demo')
    """
    info, device = init_distributed(cfg.train.device)
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, Path(data_dir), Path(out_dir), info, device, held, resume, progress, echo)
    finally:
        shutdown(info)


def _open_dataset(cfg: RunConfig, data_dir: Path) -> TokenDataset:
    """The dataset, checked against the model (vocabulary, eval-batch length) before anything is written."""
    ds = TokenDataset.open(data_dir)
    if ds.vocab_size != cfg.model.vocab_size:
        raise TrainerError(
            f"model.vocab_size={cfg.model.vocab_size} but dataset {ds.path} has {ds.vocab_size} tokens: "
            f"use --set model.vocab_size={ds.vocab_size}"
        )
    eval_len = int(ds.meta["eval_batch"]["seq_len"])
    if eval_len > cfg.model.context_length:
        # checked before training, not at extraction: the checkpoints exist to be measured on this batch
        raise TrainerError(
            f"the fixed eval batch of {ds.path} has sequences of {eval_len} tokens but "
            f"model.context_length={cfg.model.context_length}: the spectra of this run's checkpoints could "
            f"not be measured on it; prepare the data with --eval-seq-len {cfg.model.context_length} (or "
            f"less), or use --set model.context_length={eval_len}"
        )
    return ds


def _agree(error: TrainerError | None, info: DistInfo, device: torch.device) -> None:
    """Raise on every rank if rank 0 failed (``error``): no rank may go on alone into a collective."""
    if info.enabled:
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        all_reduce_sum(failed, info)
        if error is None and failed.item() > 0:
            raise TrainerError("rank 0 could not claim the run directory (its message says why)")
    if error is not None:
        raise error


def _claim_run_dir(
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


def _train(
    cfg: RunConfig,
    data_dir: Path,
    out_dir: Path,
    info: DistInfo,
    device: torch.device,
    held: contextlib.ExitStack,
    resume: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
) -> TrainResult:
    ds = _open_dataset(cfg, data_dir)  # read-only checks on every rank before anything is written
    step_tokens = tokens_per_step(cfg, info.world_size)
    total_steps = total_steps_for(cfg, step_tokens)
    _claim_run_dir(out_dir, resume, info, device, held)
    plan = plan_start(out_dir, cfg, ds, resume=resume, total_steps=total_steps)  # same verdict on every rank
    if plan.note and echo is not None and info.is_main:
        echo(plan.note)
    if plan.kind == "completed":
        return TrainResult(out_dir, "already completed", plan.note)
    _loop(cfg, ds, out_dir, info, device, plan, step_tokens, total_steps, progress)
    return TrainResult(out_dir, "completed", plan.note)


def _loop(
    cfg: RunConfig,
    ds: TokenDataset,
    out_dir: Path,
    info: DistInfo,
    device: torch.device,
    plan: StartPlan,
    step_tokens: int,
    total_steps: int,
    progress: bool,
) -> None:
    t = cfg.train
    milestones = milestone_steps(cfg, step_tokens, total_steps)
    autocast = autocast_factory(device, t.dtype, t.sdpa_backend, t.weights_dtype)
    validator = Validator(
        ds.split("val"),
        t.val_tokens,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        device=device,
        autocast=autocast,
        info=info,
    )

    # Same initial weights on every rank. The loop draws from no global generator (batches come from
    # per-step generators), but numpy's and Python's are seeded and saved too, so that code added
    # later that does draw from them stays reproducible and resumable.
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)  # noqa: NPY002
    random.seed(t.seed)
    weights_dtype = getattr(torch, t.weights_dtype)
    model = LLM(cfg.model, loss_chunk_tokens=t.loss_chunk_tokens).to(device, weights_dtype)
    optimizers = Optimizers(model, cfg.optim, total_steps, device.type)
    window = LossWindow(t.log_every)
    start_step = 0
    if plan.kind == "resume":
        state = load_resume_state(out_dir, cfg, info.world_size)
        state.restore(model, optimizers)
        start_step = state.step
        window = LossWindow.from_state(t.log_every, state.metrics["loss_window"])
        del state  # the CPU copies of the weights and moments are no longer needed
    barrier(info)  # every rank has read the run directory before rank 0 writes into it

    # --- run directory (rank 0 writes) ---------------------------------------------------------------
    main = info.is_main
    continuing = plan.kind in ("resume", "restart")
    if main:
        clean_stale_files(out_dir)
        create_run_files(out_dir)
    metrics = MetricsLogger(out_dir / METRICS_FILE, enabled=main)
    versions = software_versions()
    data_path = ds.path.resolve()
    checkpointer = Checkpointer(
        out_dir / CHECKPOINT_DIR,
        milestones,
        step_tokens,
        metadata={
            "model_config": json.dumps(asdict(cfg.model), sort_keys=True),
            "run_config": cfg.to_json(),
            "run_name": cfg.name,
            "eval_batch_sha256": ds.eval_batch_sha256,
            "data_dir": str(data_path),
            "dataset": _dataset_description(ds),
            "seed": t.seed,
            "versions": versions,
        },
        enabled=main,
    )
    if main:
        if continuing:
            metrics.truncate_after(start_step if plan.kind == "resume" else -1)
        if not continuing or not (out_dir / CONFIG_FILE).exists():
            atomic_write_text(out_dir / CONFIG_FILE, cfg.to_toml())
    record = RunRecord(
        out_dir / RUN_FILE,
        static={
            "run_name": cfg.name,
            "versions": versions,
            "git": git_revision(),
            "device": device_description(device),
            "world_size": info.world_size,
            "seed": t.seed,
            "data_dir": str(data_path),
            "dataset": dataset_identity(ds),
            "tokens_per_step": step_tokens,
            "total_steps": total_steps,
            "total_tokens": total_steps * step_tokens,
            "milestone_steps": milestones,
            "val_tokens": validator.n_tokens,
        },
        enabled=main,
        resume=continuing,
    )

    # --- precision, compilation, data parallelism ------------------------------------------------------
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any float32 work outside autocast
    eval_model: nn.Module = torch.compile(model) if t.compile else model
    train_model = wrap_ddp(eval_model, info, device)
    saved = {"step": start_step if plan.kind == "resume" else None}  # the newest resume state on disk

    def save_state(step: int) -> None:
        if main:
            save_resume_state(
                out_dir,
                step=step,
                tokens=step * step_tokens,
                cfg=cfg,
                world_size=info.world_size,
                model=model,
                optimizers=optimizers,
                metrics={"loss_window": window.state()},
            )
        saved["step"] = step

    def checkpoint(step: int) -> None:
        val_loss = validator.validate(eval_model)
        path = checkpointer.save(model, step=step, train_loss=window.mean(), val_loss=val_loss)
        metrics.log(
            {
                "kind": "val",
                "step": step,
                "tokens": step * step_tokens,
                "val_loss": _finite_or_none(val_loss),
                "checkpoint": path.name if path else None,
            }
        )
        save_state(step)

    step_once = Stepper(
        model, train_model, optimizers, ds.split("train"), cfg, device=device, autocast=autocast, info=info
    )
    record.start(start_step)
    bar = tqdm(
        total=total_steps * step_tokens,
        initial=start_step * step_tokens,
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (progress and main),
    )
    step = start_step
    window_time, timed_steps = 0.0, 0  # time of the optimizer steps since the last log line
    stop = StopSignals(graceful=not info.enabled)
    try:
        with stop:
            if plan.kind != "resume" and checkpointer.due(0):  # a resume state implies its checkpoint
                checkpoint(0)
            model.train()
            while step < total_steps:
                t0 = time.perf_counter()
                lrs = step_once(step)
                step += 1
                # the device's numbers are read (one sync) only where the loop logs or writes a state
                sync = (
                    step % t.log_every == 0
                    or step % t.resume_every == 0
                    or checkpointer.due(step)
                    or stop.signum is not None
                )
                for done, loss_value, grad_norm in step_once.results(read=sync or step == total_steps):
                    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                        step = done - 1  # the last good state; nothing after it is written
                        last = checkpointer.latest(max_step=step)
                        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                        raise DivergedError(
                            f"non-finite {what} at step {done} (after {step * step_tokens} tokens): "
                            f"loss={loss_value}, grad_norm={grad_norm}; stopped without writing this state; "
                            f"last good checkpoint: {last if last else 'none'}"
                        )
                    window.add(loss_value)
                window_time += time.perf_counter() - t0
                timed_steps += 1
                bar.update(step_tokens)

                if step % t.log_every == 0 or step == total_steps:
                    n = step - window.last_log_step
                    train_loss = window.mean(last=n)
                    rate = timed_steps * step_tokens / window_time if window_time > 0 else math.nan
                    metrics.log(
                        {
                            "kind": "train",
                            "step": step,
                            "tokens": step * step_tokens,
                            "train_loss": train_loss,
                            "lr": lrs,
                            "grad_norm": _finite_or_none(grad_norm),
                            "tokens_per_s": _finite_or_none(rate),
                        }
                    )
                    bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rate:,.0f}")
                    window.last_log_step = step
                    window_time, timed_steps = 0.0, 0
                if checkpointer.due(step):
                    checkpoint(step)
                elif step % t.resume_every == 0 or (stop.signum is not None and step < total_steps):
                    save_state(step)
                if stop.signum is not None and step < total_steps:
                    raise TrainingInterrupted(
                        f"stopped by {stop.name} after step {step} of {total_steps} ({step * step_tokens:,} "
                        f"tokens); resume state written at step {step}: continue with --resume"
                    )
            barrier(info)  # every rank finished its last step: only then is the run complete
    except TrainingInterrupted as e:
        with signals_deferred():
            record.finish("interrupted", step, (step - start_step) * step_tokens, error=str(e))
        raise
    except KeyboardInterrupt as e:
        reason = _interrupted_reason(e, stop, step, total_steps, step_tokens, saved["step"])
        with signals_deferred():
            record.finish("interrupted", step, (step - start_step) * step_tokens, error=reason)
        raise TrainingInterrupted(reason) from None
    except BaseException as e:
        try:
            with signals_deferred():
                record.finish(
                    _status_of(e), step, (step - start_step) * step_tokens, error=f"{type(e).__name__}: {e}"
                )
        except DiskFullError:
            pass  # run.json stays "running" (the next --resume marks the segment killed); report the first error
        raise
    finally:
        bar.close()
        metrics.close()
    record.finish("completed", step, (step - start_step) * step_tokens)


def _interrupted_reason(
    error: KeyboardInterrupt,
    stop: StopSignals,
    step: int,
    total_steps: int,
    step_tokens: int,
    saved: int | None,
) -> str:
    """run.json's ``error`` and the message of a run stopped at once by a signal."""
    what = stop.name or str(error) or "SIGINT"
    where = f"during step {step + 1} of {total_steps} (after {step * step_tokens:,} tokens)"
    if saved is None:
        return f"interrupted by {what} {where}, before any resume state: --resume starts it again at step 0"
    return (
        f"interrupted by {what} {where}; the newest resume state is at step {saved}: continue with --resume"
    )
