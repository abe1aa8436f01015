"""Pieces of the fast training step: the attention-kernel choice and the batch prefetcher.

The step itself (:class:`trainer.train.Stepper`) composes them: the forward pass runs under
:func:`sdpa_context` (inside the autocast of ``trainer.train.autocast_factory``), and its micro-batches
come from a :class:`BatchPrefetcher`, which copies the next one to the GPU while the GPU works on the
current one. On the CPU both are exact no-ops in effect: the same kernels' results, the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import TrainConfig
from trainer.data.dataset import batch_at
from trainer.distributed import DistInfo
from trainer.errors import TrainerError

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
"""``train.sdpa_backend`` names of the ``scaled_dot_product_attention`` kernels."""

SDPA_AUTO_ORDER = ("cudnn", "flash", "efficient", "math")
"""Priority of ``train.sdpa_backend = "auto"``: on one H100, for the 88M preset's attention, cuDNN took
about 1.8 ms per layer against 2.6 ms for flash (issue 9); a kernel that cannot take the inputs (dtype,
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
