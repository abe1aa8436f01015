"""The dataset directory's contract: its files, ``meta.json``, opening one, and cutting batches from it.

A prepared dataset is a directory (the contract is in docs/data.md)::

    data/<name>/
        train.bin  val.bin  test.bin   flat token ids (uint16 when the vocabulary fits, else uint32);
                                       every document is preceded by the end-of-text id
        tokenizer.json                 HF ``tokenizers`` format
        eval_batch.safetensors         ``input_ids`` int64 (n_seqs, seq_len), windows of the val split
        meta.json                      sources, filters, tokenizer, token counts, eval-batch sha256

:class:`TokenDataset` opens and validates one; :func:`batch_at` and :func:`fixed_batches` cut training
and evaluation batches out of a split. :func:`trainer.data.prepare.prepare_data` writes one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from trainer.errors import TrainerError
from trainer.fileio import apply_default_mode, naming_a_full_disk, write_safetensors

FORMAT = "collapse-dataset"
FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
SPLITS = ("train", "val", "test")
EVAL_BATCH_FILE = "eval_batch.safetensors"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"


class DataError(TrainerError):
    """Bad dataset input or a damaged dataset directory; the message names the file, source or option."""


def eval_batch_sha256(input_ids: torch.Tensor) -> str:
    """sha256 of an eval batch: the bytes of ``input_ids`` as C-ordered little-endian int64.

    Equal to ``hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()`` on
    little-endian machines; checkpoints and cubes record it to say which batch they were measured on.

    >>> eval_batch_sha256(torch.zeros(1, 2, dtype=torch.int64))[:16]
    '374708fff7719dd5'
    """
    array = input_ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy()
    return hashlib.sha256(array.astype("<i8", copy=False).tobytes()).hexdigest()


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``directory/meta.json``: the format tag and version, then ``meta``'s entries (docs/data.md)."""
    path = directory / META_FILE
    with naming_a_full_disk(path):
        path.write_text(
            json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **meta}, indent=2) + "\n"
        )


def write_eval_batch(directory: Path, input_ids: torch.Tensor) -> str:
    """Write ``directory/eval_batch.safetensors`` (``input_ids`` and, in its header, their sha256, as
    :meth:`TokenDataset.open` checks them); return the sha256."""
    path = directory / EVAL_BATCH_FILE
    digest = eval_batch_sha256(input_ids)
    with naming_a_full_disk(path):
        write_safetensors(path, {"input_ids": input_ids}, {"sha256": digest})
    apply_default_mode(path)  # save_file makes it private, unlike the other files
    return digest


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON object in a dataset's ``meta.json`` at ``path``, unchecked; a :class:`DataError` naming the
    file when it is missing or not a JSON object."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a prepared dataset directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _get(meta: dict[str, Any], dotted: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: missing key {dotted!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: key {dotted!r} has the wrong type ({type(value).__name__})")
    return value


class TokenDataset:
    """A prepared dataset directory, validated on opening.

    Attributes
    ----------
    path : Path
        The directory.
    meta : dict
        The parsed meta.json.
    name : str
        The dataset's name (its directory name at preparation).
    vocab_size : int
        Tokenizer vocabulary size (the model's ``vocab_size`` must equal it).
    eot_id : int
        The end-of-text token id that precedes every document.
    eval_batch_sha256 : str
        sha256 of the eval batch (see :func:`eval_batch_sha256`), checked against the file.

    Examples
    --------
    >>> ds = TokenDataset.open("data/bible-mix")  # doctest: +SKIP
    >>> x, y = batch_at(ds.split("train"), seed=0, step=0, micro=0, batch_size=8, seq_len=128)  # doctest: +SKIP
    """

    path: Path
    meta: dict[str, Any]
    name: str
    vocab_size: int
    eot_id: int
    eval_batch_sha256: str

    def __init__(self, path: Path, meta: dict[str, Any], eval_batch: torch.Tensor):
        self.path = path
        self.meta = meta
        self.name = meta["name"]
        self.vocab_size = meta["tokenizer"]["vocab_size"]
        self.eot_id = meta["tokenizer"]["eot_id"]
        self.eval_batch_sha256 = meta["eval_batch"]["sha256"]
        self.dtype = np.dtype(meta["dtype"])
        self._eval_batch = eval_batch

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenDataset:
        """Open and validate a dataset directory; any problem raises :class:`DataError` naming the file."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise DataError(
                f"{path}: dataset directory not found (prepare one with collapse-train prepare-data)"
            )
        meta_path = path / META_FILE
        meta = read_meta(meta_path)
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} (the one this code reads)"
            )
        _get(meta, "name", str, meta_path)
        vocab_size = _get(meta, "tokenizer.vocab_size", int, meta_path)
        eot_id = _get(meta, "tokenizer.eot_id", int, meta_path)
        if not 0 <= eot_id < vocab_size:
            raise DataError(f"{meta_path}: tokenizer.eot_id {eot_id} outside the vocabulary of {vocab_size}")
        dtype_name = _get(meta, "dtype", str, meta_path)
        if dtype_name not in ("uint16", "uint32"):
            raise DataError(f"{meta_path}: dtype {dtype_name!r} is not uint16 or uint32")
        itemsize = np.dtype(dtype_name).itemsize
        for split in SPLITS:
            file = path / _get(meta, f"splits.{split}.file", str, meta_path)
            tokens = _get(meta, f"splits.{split}.tokens", int, meta_path)
            if not file.is_file():
                raise DataError(f"{file}: split file missing")
            size = file.stat().st_size
            if size != tokens * itemsize:
                raise DataError(
                    f"{file}: {size} bytes, expected {tokens} tokens x {itemsize} bytes = {tokens * itemsize} "
                    "(truncated or corrupt)"
                )
        if not (path / TOKENIZER_FILE).is_file():
            raise DataError(f"{path / TOKENIZER_FILE}: tokenizer missing")
        expected = _get(meta, "eval_batch.sha256", str, meta_path)
        shape = (
            _get(meta, "eval_batch.n_seqs", int, meta_path),
            _get(meta, "eval_batch.seq_len", int, meta_path),
        )
        eval_path = path / EVAL_BATCH_FILE
        if not eval_path.is_file():
            raise DataError(f"{eval_path}: eval batch missing")
        try:
            tensors = load_file(str(eval_path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{eval_path}: unreadable safetensors file: {e}") from e
        input_ids = tensors.get("input_ids")
        if input_ids is None or input_ids.dtype != torch.int64 or tuple(input_ids.shape) != shape:
            found = "no input_ids" if input_ids is None else f"{input_ids.dtype} {tuple(input_ids.shape)}"
            raise DataError(f"{eval_path}: expected input_ids int64 {shape}, found {found}")
        actual = eval_batch_sha256(input_ids)
        if actual != expected:
            raise DataError(
                f"{eval_path}: sha256 {actual} does not match meta.json's eval_batch.sha256 {expected}"
            )
        return cls(path, meta, input_ids)

    def split(self, name: str) -> np.ndarray:
        """The token ids of ``train``, ``val`` or ``test`` as a read-only memmap."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        tokens = self.meta["splits"][name]["tokens"]
        if tokens == 0:  # mmap cannot map an empty file
            empty = np.empty(0, dtype=self.dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(
            self.path / self.meta["splits"][name]["file"], dtype=self.dtype, mode="r", shape=(tokens,)
        )

    def eval_batch(self) -> torch.Tensor:
        """The fixed analysis batch, int64 (n_seqs, seq_len) (a fresh copy)."""
        return self._eval_batch.clone()

    def tokenizer(self) -> Tokenizer:
        """The dataset's ``tokenizers.Tokenizer`` (for decoding ids back to text)."""
        return Tokenizer.from_file(str(self.path / TOKENIZER_FILE))

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.meta['splits'][s]['tokens']}" for s in SPLITS)
        return f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, tokens: {counts})"


def batch_at(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    micro: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's rows of the global training batch for (seed, step, micro): random windows.

    The global batch is ``batch_size * world_size`` windows of ``seq_len + 1`` tokens with starts drawn
    from ``numpy.random.default_rng([seed, step, micro])``; rank ``r`` gets rows
    ``r*batch_size:(r+1)*batch_size``. So one process with batch 2B sees exactly what two processes with
    batch B see together, and resuming needs only the step.

    Returns
    -------
    x, y : torch.Tensor
        int64 (batch_size, seq_len); ``y`` is ``x`` shifted left by one token.

    Examples
    --------
    >>> tokens = np.arange(100, dtype=np.uint16)
    >>> x, y = batch_at(tokens, seed=0, step=0, micro=0, batch_size=2, seq_len=4)
    >>> bool((y[:, :-1] == x[:, 1:]).all())
    True
    """
    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if min(seed, step, micro) < 0:
        raise DataError(f"seed, step and micro must be non-negative, got {seed}, {step}, {micro}")
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"the split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, n - seq_len, size=batch_size * world_size)[
        rank * batch_size : (rank + 1) * batch_size
    ]
    window = tokens[starts[:, None] + np.arange(seq_len + 1)]  # (B, T+1)
    window = torch.from_numpy(window.astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def fixed_batches(
    tokens: np.ndarray, n_tokens: int, *, batch_size: int, seq_len: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of a split, in batches (the last may be smaller).

    Window ``i`` predicts tokens ``i*seq_len + 1 .. (i+1)*seq_len``; there are
    ``min(n_tokens, len(tokens) - 1) // seq_len`` windows, so the predicted tokens lie within the first
    ``min(n_tokens, available)`` positions and no token is predicted twice. Used for the fixed validation
    slice and the test loss.

    Yields
    ------
    x, y : torch.Tensor
        int64 (b, seq_len) with ``b <= batch_size``.

    Examples
    --------
    >>> tokens = np.arange(11, dtype=np.uint16)
    >>> [tuple(x.shape) for x, _ in fixed_batches(tokens, 10, batch_size=2, seq_len=3)]
    [(2, 3), (1, 3)]
    """
    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    n_windows = min(n_tokens, len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"n_tokens={n_tokens} is smaller than seq_len={seq_len}: no window fits")
    for first in range(0, n_windows, batch_size):
        count = min(batch_size, n_windows - first)
        starts = (first + np.arange(count)) * seq_len
        window = torch.from_numpy(
            tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        )  # (b, T+1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
