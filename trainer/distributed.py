"""Process-group plumbing for data-parallel training: one process per device, launched by ``torchrun``.

Under ``torchrun`` (the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set)
:func:`init_distributed` joins the default process group (``nccl`` on CUDA, ``gloo`` on the CPU)
and the loop wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`. Each rank reads
its own slice of the *global* batch (``trainer.data.dataset.batch_at(..., rank, world_size)``), gradients
are averaged by DDP, the logged loss is averaged with :func:`all_reduce_mean`, and only rank 0
writes files. Without those variables everything here is a no-op and the loop runs as one process.

Example (two CPU processes, the way ``tests/test_ddp.py`` runs it)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        -m cli.train run tiny --data data/bible-mix --out runs/ddp
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.errors import TrainerError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank (0 writes every file)."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    world_size: int = 1
    """Number of processes sharing every optimizer step."""
    enabled: bool = False
    """True when this process is part of a torchrun process group (even one of size 1)."""
    owns_group: bool = False
    """True when :func:`init_distributed` created the group (so :func:`shutdown` may destroy it)."""

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows the progress bar."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` (``torch.distributed.run``) started this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise TrainerError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device for this process from ``train.device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. Plain ``cuda`` means this process's
    GPU, ``cuda:<local_rank>``, so the same config works for one process and under torchrun.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise TrainerError(
            f"train.device={requested!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainerError(f"train.device={requested!r} but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise TrainerError(
                f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices visible)"
            )
    elif device.type != "cpu":
        raise TrainerError(f"train.device={requested!r}: only cpu and cuda are supported")
    return device


def init_distributed(requested_device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one; return this process's place and device.

    The backend is ``nccl`` when the device is a GPU and ``gloo`` on the CPU. On CUDA the current
    device is set to ``cuda:LOCAL_RANK`` before the group is created (NCCL needs it).
    """
    if not launched_by_torchrun():
        return DistInfo(), resolve_device(requested_device)
    info = DistInfo(
        rank=_env_int("RANK"),
        local_rank=_env_int("LOCAL_RANK"),
        world_size=_env_int("WORLD_SIZE"),
        enabled=True,
    )
    device = resolve_device(requested_device, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        info = dataclasses.replace(info, owns_group=True)
    return info, device


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DDP when running distributed; return it unchanged otherwise.

    Buffers are not synchronised before each forward: the only buffers are the RoPE tables,
    identical on every rank and never updated, so broadcasting them would be pure overhead.
    (``forward_sync_buffers`` replaces ``broadcast_buffers`` in newer torch releases.)
    """
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync_kwarg = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, **{no_sync_kwarg: False})


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over the ranks (in place; returned for chaining). A no-op on one process."""
    if info.enabled:
        # SUM then divide: ReduceOp.AVG exists only for NCCL, and gloo runs the CPU tests
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over the ranks (in place; returned for chaining). A no-op on one process."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op on one process)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` created it (a no-op otherwise)."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
