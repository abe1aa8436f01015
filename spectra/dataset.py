"""Read a dataset directory (docs/data.md) by its file format: ``meta.json`` and the token files of its splits.

The dataset directory is a file contract between the trainer (``collapse-train prepare-data`` writes it) and
spectra: this module reads it on its own, for pruning surgery's test split, the evals' tokenizer record and the
local eval tasks, and never imports the trainer's data code. The fixed eval batch (``eval_batch.safetensors``) is
read with torch by :mod:`spectra.extract.load`. No torch here.

Examples
--------
>>> from spectra.dataset import read_meta, read_split
>>> meta = read_meta("data/bible-bbe", splits=("test",))   # doctest: +SKIP
>>> read_split("data/bible-bbe", "test", meta)[:8]         # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from spectra.errors import SpectraError

__all__ = ["META_FILE", "TOKEN_DTYPES", "TOKENIZER_FILE", "read_meta", "read_split"]

META_FILE = "meta.json"
"""The dataset's description: sources, splits, token dtype, tokenizer, eval batch."""
TOKENIZER_FILE = "tokenizer.json"
"""The dataset's tokenizer (Hugging Face ``tokenizers`` format)."""
TOKEN_DTYPES = ("uint16", "uint32")
"""The dtypes a split's token file is written in."""

PathLike = str | os.PathLike[str]


def read_meta(data_dir: PathLike, *, splits: Iterable[str] = ()) -> dict[str, Any]:
    """``meta.json`` of a dataset directory, checked; with ``splits``, also its token dtype and those splits.

    Parameters
    ----------
    data_dir
        A prepared dataset directory.
    splits
        Splits the caller will read (``test``, ``validation``, ...): each must have an entry with its ``file`` and
        number of ``tokens``, and the token dtype must be one of :data:`TOKEN_DTYPES`.

    Raises
    ------
    SpectraError
        No such directory, no ``meta.json``, one that is not a JSON object, a bad dtype or a missing split; the
        message names the file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpectraError(f"dataset directory not found: {data_dir}")
    path = data_dir / META_FILE
    if not path.is_file():
        raise SpectraError(f"{path} not found: {data_dir} is not a prepared dataset directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpectraError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SpectraError(f"{path}: not a JSON object")
    _check_splits(meta, path, splits)
    return meta


def _check_splits(meta: dict[str, Any], path: Path, splits: Iterable[str]) -> None:
    """Refuse a ``meta.json`` (at ``path``) without a token dtype or an entry for one of ``splits``."""
    splits = list(splits)
    if splits and meta.get("dtype") not in TOKEN_DTYPES:
        raise SpectraError(f"{path}: dtype {meta.get('dtype')!r} is not 'uint16' or 'uint32'")
    for split in splits:
        entry = meta["splits"].get(split) if isinstance(meta.get("splits"), dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("file"), str)
            or not isinstance(entry.get("tokens"), int)
        ):
            raise SpectraError(f"{path}: splits.{split} with 'file' and 'tokens' is missing")


def read_split(data_dir: PathLike, split: str, meta: dict[str, Any] | None = None) -> np.memmap:
    """The token ids of one split as a read-only memmap, after checking the file against ``meta.json``.

    ``meta`` is the directory's ``meta.json`` when the caller has read it already (:func:`read_meta`).

    Raises
    ------
    SpectraError
        The checks of :func:`read_meta`, a missing or empty split file, or one whose size is not the number of
        tokens ``meta.json`` records.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / META_FILE
    if meta is None:
        meta = read_meta(data_dir, splits=(split,))
    else:
        _check_splits(meta, meta_path, (split,))
    entry = meta["splits"][split]
    path = data_dir / entry["file"]
    if not path.is_file():
        raise SpectraError(f"{path} not found (splits.{split} of {meta_path})")
    dtype = np.dtype(meta["dtype"])
    if entry["tokens"] <= 0:
        raise SpectraError(
            f"{meta_path}: splits.{split}.tokens is {entry['tokens']}: the {split} split is empty"
        )
    expected = entry["tokens"] * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise SpectraError(
            f"{path}: {size} bytes, but meta.json says {entry['tokens']} {dtype} tokens ({expected} bytes)"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(entry["tokens"],))
