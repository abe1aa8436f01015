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
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from trainer.config import RunConfig
from trainer.data.dataset import TokenDataset
from trainer.fileio import atomic_write, write_safetensors

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


def run_metadata(cfg: RunConfig, ds: TokenDataset, versions: dict[str, str]) -> dict[str, Any]:
    """The header entries every checkpoint of the run ``cfg`` on ``ds`` shares (the table above, but the
    step's own: ``step``, ``tokens``, ``train_loss``, ``val_loss``)."""
    meta = ds.meta
    dataset = {
        "name": ds.name,
        "sources": meta.get("sources"),
        "filters": meta.get("filters"),
        "tokenizer": meta.get("tokenizer"),
        "vocab_size": ds.vocab_size,
        "eot_id": ds.eot_id,
        "split_tokens": {name: split["tokens"] for name, split in meta.get("splits", {}).items()},
    }
    return {
        "model_config": json.dumps(asdict(cfg.model), sort_keys=True),
        "run_config": cfg.to_json(),
        "run_name": cfg.name,
        "eval_batch_sha256": ds.eval_batch_sha256,
        "data_dir": str(ds.path.resolve()),
        "dataset": dataset,
        "seed": cfg.train.seed,
        "versions": versions,
    }


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of the checkpoint ``path`` (strings, as stored), or ``{}`` when it is unreadable.

    For what a run directory's own checkpoints say about the run (its dataset); readers that measure a
    checkpoint check it whole (``spectra`` reads the format on its own).
    """
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (OSError, safetensors.SafetensorError):
        return {}


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
