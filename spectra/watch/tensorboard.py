"""TensorBoard scalars of a watched run, one sub-directory per run, never a point twice.

Written with ``torch.utils.tensorboard.SummaryWriter``, the writer PyTorch documents and maintains over
tensorboard's own event-file code: the watch has torch loaded already, and the trainer's own log
(:mod:`trainer.tensorboard`) uses the same writer, so both halves write the same event files. What a run's
directory already holds is read back with tensorboard's own reader
(``tensorboard.backend.event_processing.event_accumulator.EventAccumulator``), so a watch started again (after
an interruption, or when a resumed run goes on) adds only the points that are not there: no state file to keep
in step with the events. TensorBoard keeps scalars as float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from spectra.errors import SpectraError
from spectra.watch.scalars import Scalar

__all__ = ["ScalarLog", "existing_points", "require_tensorboard"]

INSTALL_HINT = "pip install 'collapse[tensorboard]'"


def require_tensorboard() -> None:
    """Refuse, in one line, when the ``tensorboard`` package (the optional extra) is not installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports tensorboard, or says it is missing)
    except ImportError:
        raise SpectraError(
            f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}"
        ) from None


def existing_points(log_dir: Path) -> set[tuple[str, int]]:
    """``(tag, step)`` of every scalar the event files in ``log_dir`` hold (none when there is no directory)."""
    if not log_dir.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    return {(t, e.step) for t in events.Tags()[SCALARS] for e in events.Scalars(t)}


class ScalarLog:
    """The scalars of one run in ``log_dir`` (``DIR/<run>``): :meth:`add` writes the points it does not hold.

    Parameters
    ----------
    log_dir
        The run's sub-directory; created on the first point.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._written = existing_points(log_dir)
        self._writer = None

    def add(self, points: Iterable[Scalar]) -> int:
        """Write the ``points`` not written before and flush them to disk; return how many were new."""
        new = [p for p in points if (p.tag, p.tokens) not in self._written]
        if not new:
            return 0
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        for p in new:
            self._writer.add_scalar(p.tag, p.value, global_step=p.tokens)
            self._written.add((p.tag, p.tokens))
        self._writer.flush()  # TensorBoard shows them now, not at the writer's next timed flush
        return len(new)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
