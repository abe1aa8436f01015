"""Checkpoints of run-stacked cubes: which steps each run has, their token counts, each run's final one.

Stacked cubes ([`open_cubes`][spectra.cube.open_cubes]) share the union of their steps; a run that lacks a step
holds NaN there. These helpers say which (run, step) cells are checkpoints and select them, for every analysis.
:func:`as_runs` lets each of them take a single cube too. No I/O and no torch.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from spectra.cube import DEFAULT_VARIANT
from spectra.errors import SpectraError

__all__ = ["as_runs", "final_checkpoint", "measured_steps", "token_count", "tokens_of"]


def as_runs(ds: xr.Dataset) -> xr.Dataset:
    """Give a single cube a ``run`` dimension with its metadata as coordinates (a stack is returned as is).

    ``spectra.cube.open_cubes`` stacks cubes along ``run`` with ``qk_norm``, ``optimizer``, ``seed``
    and ``data`` as coordinates on ``run``; a cube opened on its own keeps them as global attributes.
    """
    if "run" in ds.dims:
        missing = [c for c in ("qk_norm", "optimizer", "seed", "data") if c not in ds.coords]
        if missing:
            raise SpectraError(f"run-stacked dataset lacks the run coordinates {missing}")
        return ds
    missing = [a for a in ("qk_norm", "optimizer", "seed", "data") if a not in ds.attrs]
    if missing:
        raise SpectraError(f"cube {ds.attrs.get('run_name', '?')!r} lacks the global attributes {missing}")
    name = str(ds.attrs.get("run_name", "run"))
    out = ds.expand_dims(run=[name])
    for key in ("qk_norm", "optimizer", "data"):
        out = out.assign_coords({key: ("run", [str(ds.attrs[key])])})
    for key, default in DEFAULT_VARIANT.items():  # absent from cubes written before the fields existed
        out = out.assign_coords({key: ("run", [str(ds.attrs.get(key, default))])})
    return out.assign_coords(seed=("run", [int(ds.attrs["seed"])]))


def token_count(value: float | None) -> int | None:
    """A checkpoint's token count as an integer, None where it is unknown (NaN or None: a public model
    without a tokens rule, see docs/public-models.md).

    >>> token_count(np.float64(2.5e7)), token_count(np.nan)
    (25000000, None)
    """
    if value is None or np.isnan(float(value)):
        return None
    return int(value)


def tokens_of(ds: xr.Dataset) -> xr.DataArray:
    """Training tokens at each (run, step); ``tokens`` may be a (step) or a (run, step) coordinate."""
    ds = as_runs(ds)
    if "tokens" not in ds.coords and "tokens" not in ds:
        raise SpectraError("dataset has no 'tokens' coordinate")
    return ds["tokens"].broadcast_like(ds["run"]).transpose("run", "step")


def measured_steps(ds: xr.Dataset) -> xr.DataArray:
    """Boolean (run, step): whether the run has a checkpoint at that step.

    Stacked runs share the union of their steps; a step a run never had is all-NaN in its spectra.
    The ``proj`` site is measured for every model, so it decides.
    """
    ds = as_runs(ds)
    k = ds["k_sv"].sel(site="proj", centering="uncentered")
    return k.notnull().any([d for d in k.dims if d not in ("run", "step")]).transpose("run", "step")


def final_checkpoint(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Select each run's own final checkpoint from a (run, step, …) array; ``step`` and ``tokens`` become (run).

    A run without any checkpoint is an error naming it.
    """
    measured = measured_steps(ds)
    empty = [str(r) for r, m in zip(measured["run"].values, measured.values) if not m.any()]
    if empty:
        raise SpectraError(f"runs without any checkpoint in their cube: {empty}")
    # index of the last measured step of every run
    last = measured.shape[1] - 1 - np.argmax(measured.values[:, ::-1], axis=1)
    out = da.isel(step=xr.DataArray(last, dims="run"))
    return out.assign_coords(tokens=("run", tokens_of(ds).values[np.arange(len(last)), last]))
