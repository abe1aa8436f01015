"""A metric per run, step and layer, summarised over heads: the table ``collapse-spectra metrics`` prints.

:func:`summary_table` computes one metric ([`compute`][spectra.analysis.metrics.compute]) on every head of one
spectrum variable and reduces it per layer (and over all layers) to the mean, the extremes and where they
occur. No I/O and no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from spectra.analysis.metrics import compute
from spectra.cube import DEFAULT_SITE
from spectra.errors import SpectraError

__all__ = ["summary_table"]

_DEFAULT_SELECTION = {"site": DEFAULT_SITE, "centering": "uncentered"}


def _select(da: xr.DataArray, dim: str, value: str | None) -> tuple[xr.DataArray, str | None]:
    """Select ``value`` (or the default) along ``dim``; refuse a value for a variable without ``dim``."""
    if dim not in da.dims:
        if value is not None:
            raise SpectraError(f"{da.name} has no {dim!r} dimension; do not pass a {dim} for it")
        return da, None
    value = _DEFAULT_SELECTION[dim] if value is None else value
    available = [str(v) for v in da[dim].values]
    if value not in available:
        raise SpectraError(f"unknown {dim} {value!r} for {da.name}; the cube has {', '.join(available)}")
    return da.sel({dim: value}), value


def summary_table(
    ds: xr.Dataset,
    metric: str = "pr_sv",
    var: str = "k_sv",
    site: str | None = None,
    centering: str | None = None,
    **metric_kwargs: Any,
) -> pd.DataFrame:
    """Per-run, per-step, per-layer summary of a metric over heads, plus an all-layers row per step.

    Parameters
    ----------
    ds : xarray.Dataset
        One cube ([`open_cube`][spectra.cube.open_cube]) or several along ``run``
        ([`open_cubes`][spectra.cube.open_cubes]).
    metric : str
        A name understood by [`compute`][spectra.analysis.metrics.compute]; ``pr_sv`` (the source documents'
        convention) by default.
    var : str
        Spectrum variable: ``k_sv``, ``q_sv`` (activations) or ``wk_sv``, ``wq_sv`` (weights).
    site, centering : str or None
        Read-out site and centring of an activation variable; ``None`` means ``normed`` and ``uncentered``,
        where the source documents' probe read the keys (after QK-norm, uncentred). Weight variables have
        neither dimension, and passing a value for them is an error.
    **metric_kwargs
        Passed on to the metric (for example ``rtol=``).

    Returns
    -------
    pandas.DataFrame
        One row per (run, step, layer) in cube order, then a row with ``layer = "all"`` per (run, step).
        Columns: ``run, step, tokens, layer``; ``mean`` over the heads in the row's scope (one layer, or every
        head of every layer); ``min`` and ``max`` with the ``min_layer, min_head`` / ``max_layer, max_head``
        where they occur; ``heads``, the number of heads with a defined (non-NaN) value, over which mean, min
        and max are taken; and ``metric, var, site, centering`` naming what was computed. Steps a run has no
        checkpoint for (NaN tokens and no values, after an outer join) are left out; ``tokens`` is float with
        NaN where a checkpoint's token count is unknown (public models). Two columns say what each spectrum was
        computed from: ``n_tokens``, the N token vectors per head behind an activation spectrum (the cube's
        ``n_tokens``; ``<NA>`` for the weight variables, whose spectra are over ``d_model`` columns instead), and
        ``head_dim``, the length of each spectrum. ``df.attrs`` repeats the selection.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> sv = xr.DataArray(np.ones((1, 1, 2, 4)), dims=("step", "layer", "kv_head", "sv"),
    ...                   coords={"step": [0], "tokens": ("step", [0])})
    >>> ds = xr.Dataset({"wk_sv": sv}, attrs={"run_name": "demo"})
    >>> summary_table(ds, var="wk_sv")[["run", "layer", "mean", "heads", "head_dim"]].values.tolist()
    [['demo', 0, 4.0, 2, 4], ['demo', 'all', 4.0, 2, 4]]
    """
    values, head_dim, site, centering = _per_head(ds, metric, var, site, centering, **metric_kwargs)
    df = _summary_rows(values, head_dim)
    tokens = ds["tokens"]
    if "run" not in tokens.dims:
        tokens = tokens.expand_dims(run=values["run"].values)
    tok = tokens.transpose("run", "step").values.astype(np.float64)[df["_r"], df["_s"]]
    # NaN tokens and nothing measured: the run has no checkpoint at this step (an outer join's gap); NaN
    # tokens with measured keys: a checkpoint whose token count is unknown (a public model without a tokens rule)
    present = ~np.isnan(tok) | _measured(ds, values)[df["_r"], df["_s"]]
    df, tok = df[present].copy(), tok[present]
    df.insert(0, "run", values["run"].values[df["_r"]].astype(str))
    df.insert(1, "step", values["step"].values[df["_s"]].astype(np.int64))
    df.insert(2, "tokens", tok.astype(np.int64) if not np.isnan(tok).any() else tok)
    df = df.sort_values(["_r", "_s", "_order"], kind="stable").drop(columns=["_r", "_s", "_order"])
    df["metric"], df["var"], df["site"], df["centering"] = metric, var, site, centering
    activations = "site" in ds[var].dims
    n_tokens = _n_tokens_by_run(ds, values["run"].values) if activations else {}
    df["n_tokens"] = pd.array([n_tokens.get(r, pd.NA) for r in df["run"]], dtype="Int64")
    df["head_dim"] = int(ds[var].sizes["sv"])
    df = df.reset_index(drop=True)
    df.attrs = {"metric": metric, "var": var, "site": site, "centering": centering}
    return df


def _per_head(
    ds: xr.Dataset, metric: str, var: str, site: str | None, centering: str | None, **metric_kwargs: Any
) -> tuple[xr.DataArray, str, str | None, str | None]:
    """The metric of every head, ``(run, step, layer, head|kv_head)``, with the head dimension's name and the
    site and centring it was computed at (None for a weight variable, which has neither)."""
    if var not in ds.data_vars:
        known = [str(v) for v, x in ds.data_vars.items() if "sv" in x.dims]
        raise SpectraError(f"no variable {var!r} in the cube; spectrum variables: {', '.join(known)}")
    da = ds[var]
    head_dim = next((d for d in ("head", "kv_head") if d in da.dims), None)
    if head_dim is None or "layer" not in da.dims or "step" not in da.dims:
        raise SpectraError(f"{var} has dimensions {da.dims}; expected step, layer and head or kv_head")
    da, site = _select(da, "site", site)
    da, centering = _select(da, "centering", centering)
    values = compute(da, metric, **metric_kwargs)
    if "run" not in values.dims:  # a single cube
        values = values.expand_dims(run=[str(ds.attrs.get("run_name", "run"))])
    return values.transpose("run", "step", "layer", head_dim), head_dim, site, centering


def _summary_rows(values: xr.DataArray, head_dim: str) -> pd.DataFrame:
    """One row per (run, step, layer), then one per (run, step) over all layers, with the mean, extremes and
    count of ``values`` (run, step, layer, head); ``_r``, ``_s``, ``_order`` index the run, step and row order."""
    v = values.values  # (R, S, L, H)
    R, S, L, H = v.shape
    layers, heads = values["layer"].values, values[head_dim].values
    per_layer = _extremes(v)  # each (R, S, L)
    whole = _extremes(v.reshape(R, S, 1, L * H))  # each (R, S, 1); flat index f = layer * H + head

    r_idx, s_idx, l_idx = (
        a.ravel() for a in np.meshgrid(np.arange(R), np.arange(S), np.arange(L), indexing="ij")
    )
    rows_layer = pd.DataFrame(
        {
            "_r": r_idx,
            "_s": s_idx,
            "_order": l_idx,
            "layer": pd.Series(layers[l_idx].tolist(), dtype=object),
            **_located(per_layer, lambda arg: (l_idx, arg), layers, heads),
        }
    )
    r_all, s_all = (a.ravel() for a in np.meshgrid(np.arange(R), np.arange(S), indexing="ij"))
    rows_all = pd.DataFrame(
        {
            "_r": r_all,
            "_s": s_all,
            "_order": L,
            "layer": pd.Series(["all"] * (R * S), dtype=object),
            **_located(whole, lambda arg: divmod(arg, H), layers, heads),
        }
    )
    return pd.concat([rows_layer, rows_all], ignore_index=True)


def _measured(ds: xr.Dataset, values: xr.DataArray) -> np.ndarray:
    """(run, step) booleans: whether the run has a checkpoint there, from its keys at ``proj`` (measured for
    every model) when the dataset has them, else from ``values``."""
    k = ds.get("k_sv")
    if k is not None and "site" in k.dims and "proj" in k["site"].values:
        k = k.sel(site="proj")
        found = k.notnull().any([d for d in k.dims if d not in ("run", "step")])
    else:
        found = values.notnull().any([d for d in values.dims if d not in ("run", "step")])
    if "run" not in found.dims:
        found = found.expand_dims(run=values["run"].values)
    return found.transpose("run", "step").values


def _n_tokens_by_run(ds: xr.Dataset, runs: np.ndarray) -> dict[str, int]:
    """N per run label: the ``n_tokens`` run coordinate of stacked cubes, or a single cube's attribute."""
    if "n_tokens" in ds.coords and "run" in ds["n_tokens"].dims:
        return {str(r): int(n) for r, n in zip(ds["run"].values, ds["n_tokens"].values)}
    if "n_tokens" in ds.attrs:
        return {str(r): int(ds.attrs["n_tokens"]) for r in runs}
    return {}


def _extremes(v: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, min, max over the last axis ignoring NaN, with argmin/argmax and the count of defined values."""
    defined = ~np.isnan(v)
    count = defined.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined, v, 0.0).sum(axis=-1) / count  # 0/0 -> NaN where no head is defined
    low = np.where(defined, v, np.inf)
    high = np.where(defined, v, -np.inf)
    argmin, argmax = low.argmin(axis=-1), high.argmax(axis=-1)
    none = count == 0
    return {
        "mean": mean,
        "min": np.where(none, np.nan, low.min(axis=-1)),
        "argmin": np.where(none, -1, argmin),
        "max": np.where(none, np.nan, high.max(axis=-1)),
        "argmax": np.where(none, -1, argmax),
        "heads": count,
    }


def _located(
    stats: dict[str, np.ndarray],
    locate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    layers: np.ndarray,
    heads: np.ndarray,
) -> dict[str, Any]:
    """Columns mean/min/max, with the layer and head coordinates of the extremes (<NA> where undefined).

    ``locate`` maps the flat argmin/argmax of each row to (layer index, head index).
    """
    cols: dict[str, Any] = {"mean": stats["mean"].ravel()}
    for which in ("min", "max"):
        arg = stats[f"arg{which}"].ravel()
        undefined = arg < 0
        layer_i, head_i = locate(np.where(undefined, 0, arg))
        cols[which] = stats[which].ravel()
        for name, coord, i in (("layer", layers, layer_i), ("head", heads, head_i)):
            column = pd.array(coord[i], dtype="Int64")
            column[undefined] = pd.NA
            cols[f"{which}_{name}"] = column
    cols["heads"] = stats["heads"].ravel()
    return cols
