"""The training loop: :func:`train` builds a run, then steps it.

:func:`train` is the one entry point (``collapse-train run`` calls it once). The loop composes,
it does not contain: it asks a :class:`~trainer.checkpoint.Checkpointer` whether a step is a milestone
and to write it, a :class:`~trainer.components.Validator` for the fixed validation loss, a
:class:`~trainer.rundir.MetricsLogger` to append a JSON line, a :class:`~trainer.rundir.RunRecord` to keep
``run.json`` current, and :mod:`trainer.resume` to write the state a killed run continues from; one
optimizer step is a :class:`~trainer.step.Stepper`. Nothing here measures spectra (see DESIGN.md).
Step numbering is in :mod:`trainer.schedule`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.checkpoint import Checkpointer
from trainer.components import LossWindow, StopSignals, TrainingInterrupted, Validator, signals_deferred
from trainer.config import RunConfig
from trainer.data.dataset import TokenDataset
from trainer.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
    wrap_ddp,
)
from trainer.errors import TrainerError
from trainer.fileio import DiskFullError, atomic_write_text
from trainer.model import LLM
from trainer.optim import Optimizers
from trainer.provenance import device_description, git_revision, software_versions
from trainer.resume import load_resume_state, save_resume_state
from trainer.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILE,
    MetricsLogger,
    RunRecord,
    clean_stale_files,
    create_run_files,
    finite_or_none,
    lock_run_dir,
)
from trainer.schedule import milestone_steps, tokens_per_step, total_steps_for
from trainer.start import StartPlan, dataset_identity, plan_start, prepare_run_dir
from trainer.step import Stepper, autocast_factory


class DivergedError(TrainerError):
    """The training loss or gradient norm became NaN or infinite."""


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
                "val_loss": finite_or_none(val_loss),
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
                            "grad_norm": finite_or_none(grad_norm),
                            "tokens_per_s": finite_or_none(rate),
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
