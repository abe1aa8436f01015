"""Load the trainer's checkpoints and the fixed eval batch, through safetensors alone.

The checkpoint file format is the interface between the two halves of the project: ``spectra``
does not import the trainer's checkpoint code (an import-linter contract forbids it), it reads the
same files on its own. A checkpoint ``tokens_<12-digit token count>.safetensors`` holds the model's
``state_dict`` in the weights' dtype (``train.weights_dtype``: float32, float64 or bfloat16; loading copies it into
the float32 model, exactly for bfloat16) and, in its safetensors header metadata (string to string):

| key | value |
| --- | --- |
| ``format`` | ``collapse-checkpoint`` |
| ``format_version`` | ``1`` |
| ``model_config`` | JSON of ``trainer.config.ModelConfig`` |
| ``run_config`` | JSON of the full run config (``name``, ``model``, ``optim``, ``train``) |
| ``run_name`` | the run's name |
| ``step``, ``tokens`` | optimizer steps taken, training tokens consumed |
| ``eval_batch_sha256`` | sha256 of the dataset's eval batch (see ``eval_batch_sha256``) |
| optional | ``data_dir`` (absolute dataset path), ``dataset`` (JSON), ``train_loss``, ``val_loss``, ``seed``, ``versions`` |

The model is rebuilt with the trainer's own definition (``trainer.model.LLM``), the only
trainer code ``spectra`` runs. Anything that does not fit (not a safetensors file, a truncated
file, a foreign file, an unknown format version, tensors that do not fit the config) raises
``spectra.errors.SpectraError`` naming the file. Which files of a run are checkpoints is :mod:`spectra.rundir`.

Examples
--------
>>> from spectra.extract.load import load_checkpoint, load_eval_batch
>>> from spectra.rundir import find_checkpoints
>>> paths = find_checkpoints("runs/A1-s0")                                 # doctest: +SKIP
>>> ckpt = load_checkpoint(paths[-1])                                      # doctest: +SKIP
>>> ids = load_eval_batch(ckpt.data_dir, expected_sha256=ckpt.eval_batch_sha256)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file

from spectra.errors import SpectraError
from trainer.config import ConfigError, ModelConfig, model_config_from_dict
from trainer.model import LLM

FORMAT = "collapse-checkpoint"
"""Value of the ``format`` key of every checkpoint's metadata."""
FORMAT_VERSION = "1"
"""The checkpoint format version this module reads."""
REQUIRED_KEYS = ("model_config", "run_config", "run_name", "step", "tokens", "eval_batch_sha256")
"""Metadata keys every checkpoint has besides ``format`` and ``format_version``."""
EVAL_BATCH_FILE = "eval_batch.safetensors"
"""Name of the fixed analysis batch inside a dataset directory."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode, no gradients needed) and its metadata."""

    path: Path
    """The safetensors file."""
    model: LLM
    """The model, in eval mode, on the device it was loaded to."""
    model_config: ModelConfig
    """Its architecture."""
    run_config: dict[str, Any]
    """The full run config as plain data (``name``, ``model``, ``optim``, ``train``)."""
    metadata: dict[str, str]
    """The raw header metadata."""
    step: int
    """Optimizer steps taken."""
    tokens: int
    """Training tokens consumed."""
    run_name: str
    """The run's name."""
    eval_batch_sha256: str
    """Hash of the dataset's eval batch the run recorded."""
    data_dir: Path | None
    """The dataset directory recorded by the trainer, or None when the metadata has none."""

    @property
    def qk_norm(self) -> str:
        """``none``, ``learned`` or ``frozen``."""
        return self.model_config.qk_norm

    def metadata_float(self, key: str) -> float:
        """A numeric metadata value such as ``train_loss``; NaN when the key is absent."""
        return _metadata_float(self.path, self.metadata, key)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a checkpoint, checked: our format tag, a known version, the required keys.

    Only the header is read (no tensor data), so this is cheap even for large checkpoints; a
    truncated file is still detected, because safetensors checks that the header's tensors cover
    the file exactly.

    Raises
    ------
    SpectraError
        The file does not exist, is not a (complete) safetensors file, is not one of our checkpoints,
        has an unknown format version or lacks a required key. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SpectraError(f"{path}: no such checkpoint file")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except safetensors.SafetensorError as e:
        raise SpectraError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None
    if meta.get("format") != FORMAT:
        raise SpectraError(
            f"{path}: not a collapse checkpoint (its safetensors metadata has no format={FORMAT!r})"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SpectraError(
            f"{path}: unsupported checkpoint format_version {version!r} (this spectra reads {FORMAT_VERSION!r})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SpectraError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    return dict(meta)


def _metadata_int(path: Path, meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise SpectraError(f"{path}: metadata {key}={meta[key]!r} is not an integer") from None


def _metadata_float(path: Path, meta: dict[str, str], key: str) -> float:
    if key not in meta:
        return math.nan
    try:
        return float(meta[key])  # json.dumps writes NaN as "NaN", which float() reads
    except ValueError:
        raise SpectraError(f"{path}: metadata {key}={meta[key]!r} is not a number") from None


def _metadata_json(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise SpectraError(f"{path}: metadata {key} is not valid JSON ({e})") from None


def model_config_from_metadata(path: str | os.PathLike, meta: dict[str, str]) -> ModelConfig:
    """The ``ModelConfig`` recorded in a checkpoint's metadata, checked against the run config beside it.

    The metadata holds the model twice: ``model_config``, which rebuilds it, and the ``model`` table of
    ``run_config``, which the cube records. A checkpoint whose two disagree (an edited header) is refused,
    naming the file and the field, rather than measured under one config and recorded under the other.

    Raises
    ------
    SpectraError
        Bad or unknown keys in either, or a field on which they differ.
    """
    path = Path(path)
    cfg = _model_config(path, _metadata_json(path, meta, "model_config"), "model_config")
    run_config = _metadata_json(path, meta, "run_config")
    if isinstance(run_config, dict) and "model" in run_config:
        recorded = _model_config(path, run_config["model"], "run_config.model")
        differences = model_config_differences(cfg, recorded)
        if differences:
            fields = "; ".join(
                f"model_config.{field} = {ours!r} but run_config.model.{field} = {theirs!r}"
                for field, ours, theirs in differences
            )
            raise SpectraError(f"{path}: the metadata contradicts itself: {fields} (an edited header?)")
    return cfg


def _model_config(path: Path, data: Any, key: str) -> ModelConfig:
    try:
        return model_config_from_dict(data)
    except ConfigError as e:
        raise SpectraError(f"{path}: invalid {key} in the metadata: {e}") from None


def model_config_differences(a: ModelConfig, b: ModelConfig) -> list[tuple[str, Any, Any]]:
    """``(field, value in a, value in b)`` for every field of two model configs that differs.

    >>> from dataclasses import replace
    >>> cfg = model_config_from_dict({"vocab_size": 64})
    >>> model_config_differences(cfg, replace(cfg, rope_theta=500000.0))
    [('rope_theta', 10000.0, 500000.0)]
    """
    return [
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing a CUDA device when CUDA is not available; ``auto`` is ``cuda``
    when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SpectraError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpectraError(f"device {device!r} requested but CUDA is not available")
    return dev


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, model: LLM | None = None
) -> Checkpoint:
    """Read a checkpoint and rebuild its model with ``trainer.model.LLM``.

    Parameters
    ----------
    path
        A checkpoint file.
    device
        Where the weights go (``cpu``, ``cuda``, ``cuda:1``).
    model
        An ``LLM`` of the same configuration to load the weights into instead of building a new
        one (saves the random initialisation when many checkpoints of one run are read in turn). Its
        weights are overwritten, so a ``Checkpoint`` returned earlier for it changes too.

    Returns
    -------
    Checkpoint
        The model in eval mode on ``device`` and the metadata.

    Raises
    ------
    SpectraError
        Everything ``read_metadata`` checks, plus a config the model refuses or tensors that do
        not match the model's parameters (names or shapes).
    """
    path = Path(path)
    dev = resolve_device(device)
    meta = read_metadata(path)
    cfg = model_config_from_metadata(path, meta)
    run_config = _metadata_json(path, meta, "run_config")
    if not isinstance(run_config, dict):
        raise SpectraError(f"{path}: metadata run_config is not a JSON object")
    if model is None or model.cfg != cfg:
        model = LLM(cfg)
    model.to(dev)
    try:
        state = load_file(str(path), device=str(dev))
    except safetensors.SafetensorError as e:  # pragma: no cover - read_metadata opened it already
        raise SpectraError(f"{path}: cannot read the tensors ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SpectraError(f"{path}: tensors do not fit the model in its metadata: {e}") from None
    model.eval()
    data_dir = meta.get("data_dir")
    return Checkpoint(
        path=path,
        model=model,
        model_config=cfg,
        run_config=run_config,
        metadata=meta,
        step=_metadata_int(path, meta, "step"),
        tokens=_metadata_int(path, meta, "tokens"),
        run_name=meta["run_name"],
        eval_batch_sha256=meta["eval_batch_sha256"],
        data_dir=Path(data_dir) if data_dir else None,
    )


def eval_batch_sha256(input_ids: torch.Tensor) -> str:
    """The hash the trainer records for an eval batch: sha256 of its int64 values in C order.

    >>> eval_batch_sha256(torch.zeros(1, 2, dtype=torch.int64))[:16]
    '374708fff7719dd5'
    """
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()


def eval_batch_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path / "eval_batch.safetensors"`` (a dataset directory)."""
    path = Path(path)
    return path / EVAL_BATCH_FILE if path.is_dir() else path


def load_eval_batch(
    path: str | os.PathLike, expected_sha256: str | None = None, force: bool = False
) -> torch.Tensor:
    """The fixed analysis batch ``input_ids`` (n_seqs, seq_len) as int64, its hash checked.

    Parameters
    ----------
    path
        An ``eval_batch.safetensors`` file, or the dataset directory holding it.
    expected_sha256
        The hash recorded in the checkpoints; None skips the check.
    force
        Accept a batch whose hash differs from ``expected_sha256`` (the cube then records the hash of
        the batch actually used).

    Raises
    ------
    SpectraError
        Missing or unreadable file, no 2-D integer ``input_ids`` tensor, negative ids, or a hash that
        differs from ``expected_sha256`` without ``force``.
    """
    file = eval_batch_path(path)
    if not file.is_file():
        raise SpectraError(f"{file}: no such eval batch file")
    try:
        with safetensors.safe_open(str(file), "pt") as f:
            if "input_ids" not in f.keys():
                raise SpectraError(f"{file}: no 'input_ids' tensor (found {', '.join(f.keys()) or 'none'})")
            ids = f.get_tensor("input_ids")
    except safetensors.SafetensorError as e:
        raise SpectraError(f"{file}: not a readable safetensors file, truncated or damaged? ({e})") from None
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SpectraError(
            f"{file}: input_ids must be a 2-D integer tensor, got {tuple(ids.shape)} {ids.dtype}"
        )
    if ids.numel() == 0:
        raise SpectraError(f"{file}: input_ids is empty ({tuple(ids.shape)})")
    ids = ids.to(torch.int64)
    if int(ids.min()) < 0:
        raise SpectraError(f"{file}: input_ids has negative token ids")
    actual = eval_batch_sha256(ids)
    if expected_sha256 is not None and actual != expected_sha256 and not force:
        raise SpectraError(
            f"{file}: eval batch sha256 {actual} differs from the one the checkpoints record, "
            f"{expected_sha256}; it is not the batch this run was set up with (force it with --force)"
        )
    return ids
