"""The components the training loop calls besides the step, the checkpointer and the run directory's files.

:class:`LossWindow` keeps the recent losses the log lines and checkpoints report; :class:`Validator` scores
the fixed validation slice; :class:`StopSignals` turns SIGINT and SIGTERM into a clean stop and
:func:`signals_deferred` holds them back while the run records how it ended.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.data.dataset import fixed_batches
from trainer.distributed import (
    DistInfo,
    all_reduce_sum,
)


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


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, SLURM preemption) stop the loop cleanly.

    In a single-process run the first signal asks the loop to stop after the step in progress: it
    writes a resume state there, records ``interrupted`` with the reason in run.json and raises
    :class:`~trainer.errors.TrainingInterrupted`, so no step is lost. A second signal stops at once (the
    resume state is then the newest one written before). Under DDP every rank would have to agree on the
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
