"""The training run's own TensorBoard log (``train.tensorboard = true``): what ``metrics.jsonl`` says, as curves.

``metrics.jsonl`` stays the record of the run (docs/training.md); this is a view of the same numbers, written at
the same moments, into ``RUN_DIR/tensorboard/`` on rank 0 only, with the training tokens as the step, so that
the curves line up with the spectra ``collapse-spectra watch --tensorboard`` writes (docs/watching.md):

| tag | from the ``metrics.jsonl`` line |
| --- | --- |
| ``loss/train`` | ``train_loss`` of a ``train`` line |
| ``lr/<group>`` | each optimizer group's ``lr`` (``lr/muon``, ``lr/adamw_decay``, ...) |
| ``grad_norm`` | ``grad_norm`` (before clipping) |
| ``tokens_per_s`` | ``tokens_per_s`` |
| ``loss/val`` | ``val_loss`` of a ``val`` line (every checkpoint) |

Non-finite values (``null`` in the JSON) are left out. The writer is ``torch.utils.tensorboard.SummaryWriter``
(the one PyTorch maintains; the ``tensorboard`` package is the optional extra ``collapse[tensorboard]``). A
resumed run redoes the steps after its resume state, as :meth:`trainer.rundir.MetricsLogger.truncate_after`
says; its writer is opened with ``purge_step`` there, so that TensorBoard drops what the interrupted process
logged after that point instead of showing it twice.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.errors import TrainerError
from trainer.rundir import MetricsLogger

__all__ = ["LoggedMetrics", "TensorBoardLogger", "require_tensorboard"]

INSTALL_HINT = "pip install 'collapse[tensorboard]'"


def require_tensorboard(what: str = "train.tensorboard = true") -> None:
    """Refuse, in one line naming ``what`` asked for it, TensorBoard scalars without the ``tensorboard`` package."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports tensorboard, or says it is missing)
    except ImportError:
        raise TrainerError(
            f"{what} needs the tensorboard package, which is not installed: {INSTALL_HINT}"
        ) from None


class TensorBoardLogger:
    """Scalars of one run into ``log_dir``; the same calls as :class:`trainer.rundir.MetricsLogger`.

    Parameters
    ----------
    log_dir
        ``RUN_DIR/tensorboard``, created on the first point.
    enabled
        False on every rank but 0: nothing is written.
    purge_tokens
        Where a continued run takes up again: TensorBoard hides the points earlier processes wrote at this many
        tokens or more. None for a run that starts afresh.
    """

    def __init__(self, log_dir: Path, enabled: bool = True, purge_tokens: int | None = None):
        self.log_dir = log_dir
        self.enabled = enabled
        self.purge_tokens = purge_tokens
        self._writer = None

    def _scalars(self, tokens: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_tokens)
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=tokens)
        self._writer.flush()  # a log step is seconds apart at least: TensorBoard shows it now

    def log_train(
        self,
        step: int,
        tokens: int,
        train_loss: float,
        lrs: dict[str, float],
        grad_norm: float,
        tokens_per_s: float,
    ) -> None:
        """The scalars of a log step."""
        lr = {f"lr/{group}": value for group, value in lrs.items()}
        self._scalars(
            tokens, {"loss/train": train_loss, **lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        )

    def log_val(self, step: int, tokens: int, val_loss: float, checkpoint: str | None) -> None:
        """The validation loss of a checkpoint."""
        self._scalars(tokens, {"loss/val": val_loss})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class LoggedMetrics:
    """What the training loop logs to: ``metrics.jsonl``, then its TensorBoard view when the run has one.

    The JSON line is written first: it is the record, and a failure of the view never costs it.
    """

    def __init__(self, jsonl: MetricsLogger, tensorboard: TensorBoardLogger | None = None):
        self.jsonl = jsonl
        self.tensorboard = tensorboard

    def log_train(
        self,
        step: int,
        tokens: int,
        train_loss: float,
        lrs: dict[str, float],
        grad_norm: float,
        tokens_per_s: float,
    ) -> None:
        self.jsonl.log_train(step, tokens, train_loss, lrs, grad_norm, tokens_per_s)
        if self.tensorboard is not None:
            self.tensorboard.log_train(step, tokens, train_loss, lrs, grad_norm, tokens_per_s)

    def log_val(self, step: int, tokens: int, val_loss: float, checkpoint: str | None) -> None:
        self.jsonl.log_val(step, tokens, val_loss, checkpoint)
        if self.tensorboard is not None:
            self.tensorboard.log_val(step, tokens, val_loss, checkpoint)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
