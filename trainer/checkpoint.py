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
never leaves a half-written file under a final name. This module is the writer; ``spectra`` reads
the same format on its own (through safetensors alone), as the contract in docs/checkpoints.md says.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))
