"""Self-describing analysis checkpoints: one safetensors file per token milestone.

File name: ``checkpoints/tokens_<12-digit token count>.safetensors``. The tensors are the model's
``state_dict`` in the dtype it was trained in, ``train.weights_dtype`` (float32 unless a run asks for float64)
(a tied LM head is stored once, as ``embed.weight``). The safetensors
header metadata (string to string) holds:

=====================  ==========================================================================
key                    value
=====================  ==========================================================================
``format``             ``collapse-checkpoint``
``format_version``     ``1``
``model_config``       JSON of :class:`trainer.config.ModelConfig` (enough to rebuild the model)
``run_config``         JSON of the full :class:`trainer.config.RunConfig`
``run_name``           the run's name
``step``               optimizer steps taken
``tokens``             training tokens consumed (all processes together)
``eval_batch_sha256``  sha256 of the dataset's ``eval_batch.safetensors`` ``input_ids``
``dataset``            JSON: dataset directory name, its sources and tokenizer (from ``meta.json``)
``data_dir``           absolute path of the dataset directory at training time
``seed``               the run's seed
``train_loss``         mean training loss over the last log window (``nan`` at step 0)
``val_loss``           loss on the fixed validation slice at this checkpoint
``versions``           JSON: torch, python, package versions
=====================  ==========================================================================

Files are written to a temporary name in the same directory, flushed, then renamed, so a crash
never leaves a half-written file under a final name. The same weights and metadata give the same bytes
(:func:`write_safetensors`), so a checksum verifies a replication. This module is the writer;
``spectra`` reads the same format on its own (through safetensors alone), as the contract in
docs/checkpoints.md says.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from trainer.fileio import atomic_write, atomic_write_text, fsync_dir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_write",
    "atomic_write_text",
    "checkpoint_name",
    "fsync_dir",
    "list_checkpoints",
    "save_checkpoint",
    "unwrap_model",
    "write_safetensors",
]

FORMAT = "collapse-checkpoint"
FORMAT_VERSION = "1"
CHECKPOINT_RE = re.compile(r"^tokens_(\d{12})\.safetensors$")


def checkpoint_name(tokens: int) -> str:
    """``tokens_000000500000.safetensors`` for 500,000 tokens."""
    return f"tokens_{tokens:012d}.safetensors"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(tokens, path) of every final-named checkpoint in ``directory``, sorted by tokens."""
    directory = Path(directory)
    found = []
    for p in directory.iterdir() if directory.is_dir() else ():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, with the header metadata in sorted key order: same input, same bytes.

    safetensors orders the tensors itself (by alignment, then name) but writes the ``__metadata__`` table
    from a Rust ``HashMap``, whose order is randomised per map: two identical calls give files with
    different hashes (safetensors 0.8 has no option for a fixed order). The header is therefore rewritten
    in place with the metadata keys sorted: the same keys and values in compact JSON, escaped as
    serde_json escapes them, so it has the same length and the tensor data does not move. Every
    safetensors file the trainer writes (checkpoints, resume state, the eval batch) goes through here.

    Examples
    --------
    >>> import hashlib, tempfile
    >>> path = tempfile.mkdtemp() + "/x.safetensors"
    >>> digests = set()
    >>> for _ in range(3):
    ...     write_safetensors(path, {"w": torch.ones(2)}, {k: "v" for k in "abcdefgh"})
    ...     digests.add(hashlib.sha256(open(path, "rb").read()).hexdigest())
    >>> len(digests)
    1
    """
    save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    if metadata:
        _sort_header_metadata(Path(path))


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))  # keeps its place, first
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for the same strings; never move the tensor data
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the original")
        f.seek(8)
        f.write(text.ljust(length, b" "))  # safetensors pads its header with spaces too


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, metadata: Mapping[str, Any]) -> Path:
    """Write the model's weights (in their own dtype, contiguous, CPU) and the metadata, atomically.

    ``metadata`` must provide the keys of the table above except ``format``/``format_version``;
    non-string values are JSON-encoded.
    """
    required = {"model_config", "run_config", "run_name", "step", "tokens", "eval_batch_sha256"}
    missing = required - set(metadata)
    if missing:
        raise ValueError(f"checkpoint metadata lacks {sorted(missing)}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    for k, v in metadata.items():
        header[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}
    return atomic_write(path, lambda tmp: write_safetensors(tmp, state, header))


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
