"""One optimizer step, and the pieces that make it fast: the attention-kernel choice and the batch prefetcher.

The step itself (:class:`Stepper`) composes them: the forward pass runs under :func:`sdpa_context` (inside
the autocast of :func:`autocast_factory`), and its micro-batches come from a :class:`BatchPrefetcher`, which
copies the next one to the GPU while the GPU works on the current one. On the CPU both are exact no-ops in
effect: the same kernels' results, the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import RunConfig, TrainConfig
from trainer.data.dataset import batch_at
from trainer.distributed import DistInfo, all_reduce_mean
from trainer.errors import TrainerError
from trainer.optim import Optimizers, clip_grad_norm

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""``train.sdpa_backend`` names of the ``scaled_dot_product_attention`` kernels."""

SDPA_AUTO_ORDER = ("cudnn", "flash", "efficient", "math")
"""Priority of ``train.sdpa_backend = "auto"``: on one H100 with torch 2.11, for the 88M preset's attention,
cuDNN took about 1.8 ms per layer against 2.6 ms for flash (docs/model.md); a kernel that cannot take the inputs (dtype,
head dimension, device, ``enable_gqa``) is skipped for the next. On the CPU only flash and math exist.
``benchmarks/bench_attention.py`` shows which kernels run at a preset's shapes."""

CUDA_ONLY_KERNELS = ("cudnn", "efficient")


def sdpa_context(backend: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of the context that selects the attention kernels of ``train.sdpa_backend``.

    ``default`` leaves torch's own choice (no context); ``auto`` allows every kernel in the order of
    :data:`SDPA_AUTO_ORDER` (``sdpa_kernel(..., set_priority=True)``); a kernel name allows only that one,
    and a CUDA-only kernel on another device is a :class:`TrainerError`. Under ``torch.compile`` the
    kernel is chosen when the graph is traced, which happens inside this context.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> with sdpa_context("math", torch.device("cpu"))():
    ...     F.scaled_dot_product_attention(q, k, v, is_causal=True).shape
    torch.Size([1, 2, 8, 4])
    """
    if backend == "default":
        return contextlib.nullcontext
    if backend == "auto":
        order = [SDPA_KERNELS[name] for name in SDPA_AUTO_ORDER]
        return lambda: sdpa_kernel(order, set_priority=True)
    if backend not in SDPA_KERNELS:
        raise TrainerError(
            f"train.sdpa_backend={backend!r}: expected auto, default or one of {', '.join(SDPA_KERNELS)}"
        )
    if backend in CUDA_ONLY_KERNELS and device.type != "cuda":
        raise TrainerError(
            f"train.sdpa_backend={backend!r} is a CUDA kernel; on {device.type} use auto, default, flash or math"
        )
    kernel = SDPA_KERNELS[backend]
    return lambda: sdpa_kernel(kernel)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device``: on CUDA through pinned host memory, asynchronously (the copy is queued on the
    current stream, before the kernels that read it, and the pinned block is not reused until it is done)."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


class BatchPrefetcher:
    """This rank's micro-batches of the training split on the device, each prepared one micro-batch early.

    :meth:`get` returns micro-batch ``micro`` of update ``step`` (``trainer.data.dataset.batch_at``); after the
    step has queued its work on the GPU, :meth:`prefetch` draws, pins and queues the copy of the next
    one, so that the host's work overlaps the GPU's. The batches are a pure function of (seed, step,
    micro) whether or not they were prefetched, which keeps resume exact. On the CPU nothing is
    prepared ahead (there is no second processor to overlap with).

    Parameters
    ----------
    tokens
        The train split.
    cfg
        Seed and batch shape.
    info, device
        This process's rank and device.

    Examples
    --------
    >>> tokens = np.arange(1000, dtype=np.uint16)
    >>> batches = BatchPrefetcher(tokens, TrainConfig(batch_size=2, seq_len=8), DistInfo(), torch.device("cpu"))
    >>> x, y = batches.get(step=3, micro=0)
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 8]), True)
    """

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, info: DistInfo, device: torch.device):
        self.tokens, self.cfg, self.info, self.device = tokens, cfg, info, device
        self.ahead = device.type == "cuda"
        self._next: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch_at(
            self.tokens,
            seed=self.cfg.seed,
            step=step,
            micro=micro,
            batch_size=self.cfg.batch_size,
            seq_len=self.cfg.seq_len,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        return to_device(x, self.device), to_device(y, self.device)  # (B, T) each

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (B, T) of micro-batch ``micro`` of update ``step``."""
        if self._next is not None and self._next[0] == (step, micro):
            batch = self._next[1]
            self._next = None
            return batch
        return self._load(step, micro)

    def following(self, step: int, micro: int) -> tuple[int, int]:
        """The (step, micro) read after (step, micro)."""
        return (step, micro + 1) if micro + 1 < self.cfg.grad_accum else (step + 1, 0)

    def prefetch(self, step: int, micro: int) -> None:
        """Prepare the micro-batch that follows (step, micro) (on CUDA; a no-op on the CPU)."""
        if self.ahead:
            key = self.following(step, micro)
            self._next = (key, self._load(*key))


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
