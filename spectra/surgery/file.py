"""The surgery file, ``surgery.nc`` (docs/surgery.md): its format, schema, reading, writing and merging.

The one home of the format: :func:`empty_surgery` lays out a result's variables, :func:`with_loss` fills in the
measured losses with their mean and interval over seeds, :func:`write_surgery` writes it atomically,
:func:`read_surgery` reads results (the report, the figure) and :func:`read_own_surgery` the file a run is about
to extend; :func:`check_same_experiment` and :func:`merge_surgeries` decide which results share a file.
No torch here: the report reads surgery files on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from spectra.cube import read_netcdf
from spectra.errors import SpectraError
from spectra.fileio import atomic_write

PathLike = str | os.PathLike[str]

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GAMMA_OK",
    "IDENTITY_ATTRS",
    "INTERVAL_LEVEL",
    "SURGERY_FILENAME",
    "check_same_experiment",
    "empty_surgery",
    "merge_surgeries",
    "read_own_surgery",
    "read_surgery",
    "with_loss",
    "write_surgery",
]

FORMAT = "collapse-surgery"
"""Value of the file's global attribute ``format``."""
FORMAT_VERSION = "1"
SURGERY_FILENAME = "surgery.nc"
"""A run directory's surgery results."""
INTERVAL_LEVEL = 0.95
"""Level of the Student-t interval of the mean loss over the random draws."""
GAMMA_OK = "ok"
"""The ``gamma_status`` attribute where gamma can rank the key coordinates; otherwise it says why not."""
IDENTITY_ATTRS = (
    "run_name",
    "step",
    "tokens",
    "checkpoint_eval_batch_sha256",
    "eval_batch_sha256",
    "model_config",
    "layers",
    "pair_rope",
    "seq_len",
    "test_tokens",
    "head_dim",
    "mask_site",
)
"""Attributes two surgery results must share to be cells of one experiment (merged into one file)."""


def empty_surgery(
    strategies: Sequence[str],
    fractions: Sequence[float],
    seeds: int,
    removed_dims: Sequence[int],
    *,
    title: str,
    attrs: dict[str, Any],
) -> xr.Dataset:
    """A surgery file's dataset with every loss NaN: the schema of docs/surgery.md, filled in by the run.

    ``removed_dims`` holds the key coordinates removed per pruned head at each fraction; ``attrs`` describe the
    experiment (its identity, :data:`IDENTITY_ATTRS`, among them) and follow the format's own attributes.
    """
    loss = np.full((len(strategies), len(fractions), seeds), np.nan)
    ds = xr.Dataset(
        {
            "loss": (
                ("strategy", "fraction", "seed"),
                loss,
                {
                    "long_name": "mean next-token cross-entropy on the test split after pruning",
                    "units": "nats/token",
                    "comment": "deterministic strategies (gamma, svd) fill seed 0 only, NaN elsewhere; "
                    "a strategy that is not applicable is NaN everywhere",
                },
            ),
            "baseline_loss": (
                (),
                np.nan,
                {"long_name": "test loss of the unpruned model", "units": "nats/token"},
            ),
        },
        coords={
            "strategy": (
                "strategy",
                np.array(strategies, dtype=object),
                {"long_name": "pruning strategy", "units": "1"},
            ),
            "fraction": (
                "fraction",
                np.array(fractions, dtype=np.float64),
                {
                    "long_name": "requested fraction of head_dim removed from each pruned key head",
                    "units": "1",
                },
            ),
            "seed": (
                "seed",
                np.arange(seeds, dtype=np.int64),
                {"long_name": "random-pruning seed", "units": "1"},
            ),
            "removed_dims": (
                "fraction",
                np.array(removed_dims, dtype=np.int64),
                {"long_name": "key coordinates (or SVD directions) removed per pruned head", "units": "1"},
            ),
        },
        attrs={
            "Conventions": "CF-1.10",
            "title": title,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **attrs,
        },
    )
    return ds


def with_loss(ds: xr.Dataset, loss: np.ndarray, baseline: float) -> xr.Dataset:
    """``ds`` with its losses, their seed mean and interval, and the baseline filled in."""
    mean, low, high = _interval(loss)
    deterministic = np.array([s != "random" for s in ds["strategy"].values])
    low[deterministic], high[deterministic] = np.nan, np.nan
    dims = ("strategy", "fraction")
    out = ds.copy()
    out["loss"] = (ds["loss"].dims, loss, ds["loss"].attrs)
    out["baseline_loss"] = ((), baseline, ds["baseline_loss"].attrs)
    out["loss_mean"] = (dims, mean, {"long_name": "loss averaged over seeds", "units": "nats/token"})
    out["loss_ci_low"] = (
        dims,
        low,
        {
            "long_name": "lower bound of the 95% Student-t interval of the mean loss over seeds",
            "units": "nats/token",
            "comment": "NaN for deterministic strategies and for fewer than 2 seeds",
        },
    )
    out["loss_ci_high"] = (
        dims,
        high,
        {
            "long_name": "upper bound of the 95% Student-t interval of the mean loss over seeds",
            "units": "nats/token",
        },
    )
    return out


def _interval(values: np.ndarray, level: float = INTERVAL_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t interval of the mean over the last axis, ignoring NaN; NaN bounds for n < 2."""
    n = np.sum(~np.isnan(values), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, axis=-1) / np.where(n > 0, n, np.nan)
        sd = np.sqrt(np.nansum((values - mean[..., None]) ** 2, axis=-1) / np.where(n > 1, n - 1, np.nan))
        half = stats.t.ppf(0.5 + level / 2, np.where(n > 1, n - 1, np.nan)) * sd / np.sqrt(n)
    return mean, mean - half, mean + half


def check_same_experiment(existing: xr.Dataset, new: xr.Dataset) -> None:
    """Refuse to merge surgery results of different experiments, naming the first attribute that differs."""
    where = existing.encoding.get("source", "the existing surgery result")  # the file it was read from
    for key in IDENTITY_ATTRS:
        have, want = str(existing.attrs.get(key)), str(new.attrs.get(key))
        if have != want:
            raise SpectraError(
                f"{where} holds another experiment ({key} = {have}, this one has {want}): results measured "
                "differently cannot share a file; choose another --out"
            )


def merge_surgeries(existing: xr.Dataset, new: xr.Dataset) -> xr.Dataset:
    """The union of two results of one experiment: strategies in first-seen order, fractions sorted, seeds
    up to the larger count; where both hold a cell, ``existing`` wins (it was measured first)."""
    strategies = list(existing["strategy"].values) + [
        s for s in new["strategy"].values if s not in existing["strategy"].values
    ]
    fractions = sorted(set(map(float, existing["fraction"].values)) | set(map(float, new["fraction"].values)))
    seeds = max(existing.sizes["seed"], new.sizes["seed"])
    grid = dict(
        strategy=np.array(strategies, dtype=object), fraction=np.array(fractions), seed=np.arange(seeds)
    )
    a = existing["loss"].reindex(grid)
    b = new["loss"].reindex(grid)
    loss = a.where(~np.isnan(a), b)
    # the same experiment (head_dim and pair_rope among its identity) removes as many dimensions at a fraction
    removed = {
        float(f): int(r)
        for d in (new, existing)
        for f, r in zip(d["fraction"].values, d["removed_dims"].values)
    }
    merged = new.reindex(grid).copy()
    merged = merged.assign_coords(
        removed_dims=(
            "fraction",
            np.array([removed[f] for f in fractions], dtype=np.int64),
            new["removed_dims"].attrs,
        )
    )
    merged["loss"] = (("strategy", "fraction", "seed"), loss.values, new["loss"].attrs)
    merged["baseline_loss"] = existing["baseline_loss"]
    merged.attrs["history"] = f"{existing.attrs.get('history', '')}\n{new.attrs['history']}".strip()
    return merged


def write_surgery(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a surgery dataset as zlib-compressed NetCDF4, atomically (temporary name, then rename)."""
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    return atomic_write(
        path, lambda tmp: ds.to_netcdf(tmp, mode="w", engine="netcdf4", format="NETCDF4", encoding=encoding)
    )


def read_surgery(path: PathLike) -> xr.Dataset:
    """Read a ``surgery.nc`` (written by ``collapse-spectra surgery``) into memory and check its schema.

    The reader of results (the report, ``collapse-spectra plot surgery``). A run directory means its
    ``surgery.nc``; a file without a ``format`` attribute is read as one (hand-made results), one of another
    format is refused. Raises :class:`SpectraError` naming the file if it is
    missing, unreadable, or lacks ``loss(strategy, fraction, seed)`` and ``baseline_loss``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / SURGERY_FILENAME
    if not p.is_file():
        raise SpectraError(f"{p}: no such surgery file (run `collapse-spectra surgery CHECKPOINT` first)")
    ds = read_netcdf(p)
    fmt = ds.attrs.get("format", FORMAT)
    if fmt != FORMAT:
        raise SpectraError(
            f"{p}: not a surgery file (global attribute format = {fmt!r}, expected {FORMAT!r})"
        )
    if (
        "loss" not in ds
        or set(ds["loss"].dims) != {"strategy", "fraction", "seed"}
        or "baseline_loss" not in ds
    ):
        raise SpectraError(f"{p}: a surgery file needs loss(strategy, fraction, seed) and baseline_loss")
    ds.attrs.setdefault("run_name", p.parent.name)
    ds.attrs["path"] = str(p)
    return ds


def read_own_surgery(path: str | os.PathLike) -> xr.Dataset:
    """The surgery file at a command's output path, read only if it carries this format's tag.

    A file of another format at the path (a cube, metrics, a user's file, a NetCDF file without the tag) is never
    replaced: the error says so. Readers of results use the lenient :func:`read_surgery` instead.
    """
    path = Path(path)

    try:
        ds = read_netcdf(path)
    except SpectraError as e:
        raise SpectraError(
            f"{e}; {path} is not a surgery file, so it is left as it is: choose another --out"
        ) from None
    if ds.attrs.get("format") != FORMAT:
        raise SpectraError(
            f"{path}: not a surgery file (global attribute format = {ds.attrs.get('format')!r}), so it is left "
            "as it is: choose another --out"
        )
    return ds
