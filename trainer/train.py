"""The training loop: :func:`train` builds a run, then steps it.

:func:`train` is the one entry point (``collapse-train run`` calls it once). It checks the dataset against
the model, claims the run directory and decides how the run begins there (:mod:`trainer.start`), builds the
run (:func:`_build`: model, optimizers and their resume state, the run directory's writers, the step), then
steps it (:func:`_loop`, which records how the run ended, around :func:`_steps`). The loop composes,
it does not contain: it asks a :class:`~trainer.checkpoint.Checkpointer` whether a step is a milestone
and to write it, a :class:`~trainer.components.Validator` for the fixed validation loss, a
:class:`~trainer.rundir.MetricsLogger` to append a JSON line (through
:class:`~trainer.tensorboard.LoggedMetrics`, which also feeds the run's TensorBoard log when it has one), a :class:`~trainer.rundir.RunRecord` to keep
``run.json`` current, and :mod:`trainer.resume` to write the state a killed run continues from; one
optimizer step is a :class:`~trainer.step.Stepper`. Nothing here measures spectra (see DESIGN.md).
Step numbering is in :mod:`trainer.schedule`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.checkpoint import Checkpointer, run_metadata
from trainer.components import LossWindow, StopSignals, Validator, signals_deferred
from trainer.config import RunConfig
from trainer.data.dataset import TokenDataset
from trainer.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from trainer.errors import DivergedError, TrainerError, TrainingInterrupted
from trainer.fileio import DiskFullError
from trainer.model import LLM
from trainer.optim import Optimizers
from trainer.provenance import device_description, git_revision, software_versions
from trainer.resume import load_resume_state, save_resume_state
from trainer.rundir import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsLogger,
    RunRecord,
    clean_stale_files,
    create_run_files,
    write_config,
)
from trainer.schedule import milestone_steps, tokens_per_step, total_steps_for
from trainer.start import StartPlan, claim_run_dir, dataset_identity, plan_start
from trainer.step import Stepper, autocast_factory
from trainer.tensorboard import LoggedMetrics, TensorBoardLogger, require_tensorboard


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
        A directory made by ``collapse-train prepare-data`` (``trainer.data.prepare.prepare_data``).
    out_dir
        The run directory; it must not exist or be empty, unless ``resume``.
    resume
        Continue the run in ``out_dir``: from its newest resume state; from step 0 when it was killed
        before writing one; not at all when it already completed (see :mod:`trainer.start`).
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
        or dataset differing from the run being resumed, :class:`~trainer.errors.DivergedError` on a
        non-finite loss, :class:`~trainer.errors.TrainingInterrupted` on SIGINT or SIGTERM.

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
    if cfg.train.tensorboard:
        require_tensorboard()  # before anything is read or written
    ds = _open_dataset(cfg, data_dir)  # read-only checks on every rank before anything is written
    step_tokens = tokens_per_step(cfg, info.world_size)
    total_steps = total_steps_for(cfg, step_tokens)
    claim_run_dir(out_dir, resume, info, device, held)
    plan = plan_start(out_dir, cfg, ds, resume=resume, total_steps=total_steps)  # same verdict on every rank
    if plan.note and echo is not None and info.is_main:
        echo(plan.note)
    if plan.kind == "completed":
        return TrainResult(out_dir, "already completed", plan.note)
    _loop(_build(cfg, ds, out_dir, info, device, plan, step_tokens, total_steps), progress)
    return TrainResult(out_dir, "completed", plan.note)


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


# ----------------------------------------------------------------------------------------------------
# Building a run


@dataclass
class _Run:
    """A run built and ready to step: what the loop advances, and the components it calls."""

    cfg: RunConfig
    info: DistInfo
    out_dir: Path
    step_tokens: int
    total_steps: int
    resumed: bool
    """Whether it continues from a resume state (whose step's checkpoint is then on disk already)."""
    start_step: int
    model: nn.Module
    """The plain model (its weights are checkpointed)."""
    eval_model: nn.Module
    """The model as validation runs it (compiled when ``train.compile``)."""
    optimizers: Optimizers
    stepper: Stepper
    window: LossWindow
    validator: Validator
    checkpointer: Checkpointer
    metrics: LoggedMetrics
    record: RunRecord
    step: int = 0
    """Optimizer steps completed (the loop advances it)."""
    saved_step: int | None = None
    """The step of the newest resume state on disk."""

    def tokens(self, step: int) -> int:
        return step * self.step_tokens

    def save_state(self, step: int) -> None:
        """Write the resume state of ``step`` (rank 0)."""
        if self.info.is_main:
            save_resume_state(
                self.out_dir,
                step=step,
                tokens=self.tokens(step),
                cfg=self.cfg,
                world_size=self.info.world_size,
                model=self.model,
                optimizers=self.optimizers,
                metrics={"loss_window": self.window.state()},
            )
        self.saved_step = step

    def checkpoint(self, step: int) -> None:
        """Validate, write the checkpoint of ``step``, log its line, and write its resume state."""
        val_loss = self.validator.validate(self.eval_model)
        path = self.checkpointer.save(self.model, step=step, train_loss=self.window.mean(), val_loss=val_loss)
        self.metrics.log_val(step, self.tokens(step), val_loss, path.name if path else None)
        self.save_state(step)


def _build(
    cfg: RunConfig,
    ds: TokenDataset,
    out_dir: Path,
    info: DistInfo,
    device: torch.device,
    plan: StartPlan,
    step_tokens: int,
    total_steps: int,
) -> _Run:
    """Build the run in order: the milestones, the validation slice, the model and optimizers (restored from the resume state
    when there is one), the run directory's files (rank 0 writes them once every rank has read the
    directory), then compilation and data parallelism around the model, and the step."""
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
    model, optimizers, window, start_step = _model_and_state(cfg, out_dir, info, device, plan, total_steps)
    barrier(info)  # every rank has read the run directory before rank 0 writes into it
    metrics, checkpointer, record = _run_files(
        cfg, ds, out_dir, info, device, plan, start_step, milestones, step_tokens, total_steps, validator
    )
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any float32 work outside autocast
    eval_model: nn.Module = torch.compile(model) if t.compile else model
    train_model = wrap_ddp(eval_model, info, device)
    stepper = Stepper(
        model, train_model, optimizers, ds.split("train"), cfg, device=device, autocast=autocast, info=info
    )
    return _Run(
        cfg=cfg,
        info=info,
        out_dir=out_dir,
        step_tokens=step_tokens,
        total_steps=total_steps,
        resumed=plan.kind == "resume",
        start_step=start_step,
        model=model,
        eval_model=eval_model,
        optimizers=optimizers,
        stepper=stepper,
        window=window,
        validator=validator,
        checkpointer=checkpointer,
        metrics=metrics,
        record=record,
        step=start_step,
        saved_step=start_step if plan.kind == "resume" else None,
    )


def _model_and_state(
    cfg: RunConfig, out_dir: Path, info: DistInfo, device: torch.device, plan: StartPlan, total_steps: int
) -> tuple[nn.Module, Optimizers, LossWindow, int]:
    """The model, its optimizers and the loss window: freshly seeded, or as the newest resume state left
    them; and the step the run starts from."""
    t = cfg.train
    # Same initial weights on every rank. The loop draws from no global generator (batches come from
    # per-step generators), but numpy's and Python's are seeded and saved too, so that code added
    # later that does draw from them stays reproducible and resumable.
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)  # noqa: NPY002
    random.seed(t.seed)
    model = LLM(cfg.model, loss_chunk_tokens=t.loss_chunk_tokens).to(device, getattr(torch, t.weights_dtype))
    optimizers = Optimizers(model, cfg.optim, total_steps, device.type)
    if plan.kind != "resume":
        return model, optimizers, LossWindow(t.log_every), 0
    state = load_resume_state(out_dir, cfg, info.world_size)  # CPU copies, freed on return
    state.restore(model, optimizers)
    return model, optimizers, LossWindow.from_state(t.log_every, state.metrics["loss_window"]), state.step


def _run_files(
    cfg: RunConfig,
    ds: TokenDataset,
    out_dir: Path,
    info: DistInfo,
    device: torch.device,
    plan: StartPlan,
    start_step: int,
    milestones: list[int],
    step_tokens: int,
    total_steps: int,
    validator: Validator,
) -> tuple[LoggedMetrics, Checkpointer, RunRecord]:
    """The writers of the run directory (enabled on rank 0 only). Rank 0 first removes what a killed run
    left, drops the metrics lines a resumed run writes again, and writes ``config.toml``."""
    main = info.is_main
    continuing = plan.kind in ("resume", "restart")
    if main:
        clean_stale_files(out_dir)
        create_run_files(out_dir)
    metrics = MetricsLogger(out_dir / METRICS_FILE, enabled=main)
    tensorboard = None
    if cfg.train.tensorboard:
        # TensorBoard's view of the lines truncate_after drops below: hidden from where the run takes up again
        purge = {"resume": start_step * step_tokens + 1, "restart": 0}.get(plan.kind)
        tensorboard = TensorBoardLogger(out_dir / TENSORBOARD_DIR, enabled=main, purge_tokens=purge)
    versions = software_versions()
    checkpointer = Checkpointer(
        out_dir / CHECKPOINT_DIR,
        milestones,
        step_tokens,
        metadata=run_metadata(cfg, ds, versions),
        enabled=main,
    )
    if main:
        if continuing:
            metrics.truncate_after(start_step if plan.kind == "resume" else -1)
        write_config(out_dir, cfg, replace=not continuing)
    facts = {
        "run_name": cfg.name,
        "versions": versions,
        "git": git_revision(),
        "device": device_description(device),
        "world_size": info.world_size,
        "seed": cfg.train.seed,
        "data_dir": str(ds.path.resolve()),
        "dataset": dataset_identity(ds),
        "tokens_per_step": step_tokens,
        "total_steps": total_steps,
        "total_tokens": total_steps * step_tokens,
        "milestone_steps": milestones,
        "val_tokens": validator.n_tokens,
    }
    record = RunRecord(out_dir, static=facts, enabled=main, resume=continuing)
    return LoggedMetrics(metrics, tensorboard), checkpointer, record


# ----------------------------------------------------------------------------------------------------
# The loop


def _loop(run: _Run, progress: bool) -> None:
    """Step ``run`` to its end, and record in run.json how it ended, whatever ends it."""
    run.record.start(run.start_step)
    bar = tqdm(
        total=run.tokens(run.total_steps),
        initial=run.tokens(run.start_step),
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        disable=not (progress and run.info.is_main),
    )
    stop = StopSignals(graceful=not run.info.enabled)
    try:
        with stop:
            _steps(run, stop, bar)
    except TrainingInterrupted as e:
        _record_end(run, "interrupted", str(e))
        raise
    except KeyboardInterrupt as e:
        reason = _interrupted_reason(e, stop, run)
        _record_end(run, "interrupted", reason)
        raise TrainingInterrupted(reason) from None
    except BaseException as e:
        # a full disk here leaves run.json "running" (the next --resume marks the segment killed): the first
        # error is the one to report
        with contextlib.suppress(DiskFullError):
            _record_end(run, _status_of(e), f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
        run.metrics.close()
    run.record.finish("completed", run.step, run.tokens(run.step - run.start_step))


def _steps(run: _Run, stop: StopSignals, bar: tqdm) -> None:
    """The steps: update, read the device's numbers where needed, log, checkpoint or save a resume state, and
    stop after a step when a signal asked to."""
    t = run.cfg.train
    if not run.resumed and run.checkpointer.due(0):  # a resume state implies its checkpoint
        run.checkpoint(0)
    run.model.train()
    window_time, timed_steps = 0.0, 0  # time of the optimizer steps since the last log line
    while run.step < run.total_steps:
        t0 = time.perf_counter()
        lrs = run.stepper(run.step)
        run.step += 1
        step = run.step
        # the device's numbers are read (one sync) only where the loop logs or writes a state
        sync = (
            step % t.log_every == 0
            or step % t.resume_every == 0
            or run.checkpointer.due(step)
            or stop.signum is not None
        )
        grad_norm = _read_steps(run, read=sync or step == run.total_steps)
        window_time += time.perf_counter() - t0
        timed_steps += 1
        bar.update(run.step_tokens)

        if step % t.log_every == 0 or step == run.total_steps:
            train_loss = run.window.mean(last=step - run.window.last_log_step)
            rate = timed_steps * run.step_tokens / window_time if window_time > 0 else math.nan
            run.metrics.log_train(step, run.tokens(step), train_loss, lrs, grad_norm, rate)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rate:,.0f}")
            run.window.last_log_step = step
            window_time, timed_steps = 0.0, 0
        if run.checkpointer.due(step):
            run.checkpoint(step)
        elif step % t.resume_every == 0 or (stop.signum is not None and step < run.total_steps):
            run.save_state(step)
        if stop.signum is not None and step < run.total_steps:
            raise TrainingInterrupted(
                f"stopped by {stop.name} after step {step} of {run.total_steps} ({run.tokens(step):,} "
                f"tokens); resume state written at step {step}: continue with --resume"
            )
    barrier(run.info)  # every rank finished its last step: only then is the run complete


def _read_steps(run: _Run, read: bool) -> float:
    """Read the losses and gradient norms of the steps taken since the last read (all of them, when
    ``read``; the CPU reads every step) into the loss window; return the newest gradient norm read (NaN when
    none was).

    A non-finite one raises :class:`DivergedError` with ``run.step`` set back to the last good step, so that
    nothing after it is written.
    """
    grad_norm = math.nan
    for done, loss_value, grad_norm in run.stepper.results(read=read):
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            run.step = done - 1  # the last good state; nothing after it is written
            last = run.checkpointer.latest(max_step=run.step)
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            raise DivergedError(
                f"non-finite {what} at step {done} (after {run.tokens(run.step)} tokens): "
                f"loss={loss_value}, grad_norm={grad_norm}; stopped without writing this state; "
                f"last good checkpoint: {last if last else 'none'}"
            )
        run.window.add(loss_value)
    return grad_norm


def _record_end(run: _Run, status: str, error: str) -> None:
    """Close run.json's segment with ``status`` and ``error``, holding back a signal while it is written."""
    with signals_deferred():
        run.record.finish(status, run.step, run.tokens(run.step - run.start_step), error=error)


def _status_of(error: BaseException) -> str:
    """run.json status of a run that stopped with ``error``."""
    if isinstance(error, DivergedError):
        return "diverged"
    if isinstance(error, KeyboardInterrupt | TrainingInterrupted):
        return "interrupted"
    return "failed"


def _interrupted_reason(error: KeyboardInterrupt, stop: StopSignals, run: _Run) -> str:
    """run.json's ``error`` and the message of a run stopped at once by a signal."""
    what = stop.name or str(error) or "SIGINT"
    where = f"during step {run.step + 1} of {run.total_steps} (after {run.tokens(run.step):,} tokens)"
    if run.saved_step is None:
        return f"interrupted by {what} {where}, before any resume state: --resume starts it again at step 0"
    return (
        f"interrupted by {what} {where}; the newest resume state is at step {run.saved_step}: "
        "continue with --resume"
    )
