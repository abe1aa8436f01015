"""Gamma vs importance: does the QK-norm gain of a coordinate track how much that coordinate carries?

For every run, checkpoint, layer and head, the Spearman rank correlation between ``|gamma_j|`` (the
QK-norm gain of coordinate ``j`` of the keys, or of the queries) and the **energy** of coordinate ``j``:
the mean over the fixed batch's tokens of ``x_j²`` (uncentred), which equals
``(1/N) Σ_k σ_k² V_jk²``, the share of the spectrum's energy that the right singular vectors place on
coordinate ``j``. The cube stores it as ``k_energy`` / ``q_energy``; Spearman is invariant to the
positive factor ``1/N``, so the result is the same as with ``Σ_k σ_k² V_jk²``.

Which energy (``site``):

- ``unit`` (default): the RMS-normalised vectors **before** gamma multiplies them. The importance of
  coordinate ``j`` to the representation independently of the gain: a positive correlation then says
  the gain grew where the representation already put its energy.
- ``normed``: after gamma. ``x_j = gamma_j u_j``, so its energy is ``gamma_j² E[u_j²]``: it contains
  ``gamma²`` mechanically and the correlation is biased toward +1 whatever the representation does.
  Offered for comparison with analyses that read the keys after the norm.

Runs without QK-norm have no gamma: their rows say ``"no QK-norm"`` with a NaN correlation. A frozen
gamma is constant, where Spearman's correlation is undefined: ``"gamma frozen (constant)"``. A learned
gamma that is still constant (step 0, at its initial value 1) says ``"gamma constant"``. None of these is
an error. ``n`` is the number of coordinates correlated (``head_dim``).

No I/O and no torch here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from spectra.analysis.checkpoints import as_runs, final_checkpoint, measured_steps, token_count, tokens_of
from spectra.analysis.plan import run_table
from spectra.cube import head_dim_name
from spectra.errors import SpectraError

GAMMA_SITES = ("unit", "normed")
DEFAULT_GAMMA_SITE = "unit"

STATUS_OK = "ok"
STATUS_NO_QK_NORM = "no QK-norm"
STATUS_FROZEN = "gamma frozen (constant)"
STATUS_CONSTANT = "gamma constant"
STATUS_GAMMA_MISSING = "gamma missing (NaN)"
STATUS_ENERGY_MISSING = "energy missing (NaN)"
STATUS_ENERGY_CONSTANT = "energy constant"
STATUS_NOT_MEASURED = "no checkpoint at this step"


def spearman_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman's rho and its two-sided p-value between ``x[i]`` and ``y[i]`` for every row ``i``.

    Numpy kernel: ``x`` and ``y`` have shape (M, D); returns two arrays of shape (M,). Rows with a NaN
    or a constant vector give NaN (Spearman's rho is undefined there) without calling scipy.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    >>> y = np.array([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    >>> spearman_rows(x, y)[0].tolist()
    [1.0, -1.0]
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise SpectraError(
            f"spearman_rows needs two (M, D) arrays of the same shape, got {x.shape} and {y.shape}"
        )
    rho = np.full(x.shape[0], np.nan)
    p = np.full(x.shape[0], np.nan)
    valid = _defined_rows(x) & _defined_rows(y)
    for i in np.flatnonzero(valid):
        res = scipy.stats.spearmanr(x[i], y[i])
        rho[i], p[i] = float(res.statistic), float(res.pvalue)
    return rho, p


def _defined_rows(a: np.ndarray) -> np.ndarray:
    # a row can be ranked meaningfully if it has no NaN and is not constant
    return ~np.isnan(a).any(axis=-1) & (
        np.nanmax(a, axis=-1, initial=-np.inf) > np.nanmin(a, axis=-1, initial=np.inf)
    )


def gamma_energy_correlation(
    ds: xr.Dataset, *, which: str = "k", site: str = DEFAULT_GAMMA_SITE
) -> xr.Dataset:
    """Spearman correlation between ``|gamma_j|`` and the energy of coordinate ``j``, per head.

    Parameters
    ----------
    ds
        Run-stacked cubes (``spectra.cube.open_cubes``) or one cube.
    which
        ``"k"`` (keys, ``k_gamma`` vs ``k_energy``, per key/value head) or ``"q"`` (queries, per head).
    site
        Where the energy is read: ``"unit"`` (before gamma; default) or ``"normed"`` (after gamma,
        mechanically biased toward positive correlation, see the module docstring).

    Returns
    -------
    xarray.Dataset
        Over (run, step, layer, kv_head|head): ``rho`` (Spearman's rho), ``pvalue`` (two-sided, from
        ``scipy.stats.spearmanr``), ``status`` (``"ok"`` or why rho is NaN); ``n`` (scalar) is the number
        of coordinates per correlation. Attributes record ``which`` and ``site``.

    Examples
    --------
    >>> res = gamma_energy_correlation(cubes, which="k", site="unit")  # doctest: +SKIP
    >>> res.rho.sel(run="A1-s0").isel(step=-1).mean("kv_head")          # doctest: +SKIP
    """
    ds = as_runs(ds)
    hd = head_dim_name(which)
    if site not in GAMMA_SITES:
        raise SpectraError(f"gamma analysis site must be one of {list(GAMMA_SITES)}, got {site!r}")
    for var in (f"{which}_gamma", f"{which}_energy"):
        if var not in ds:
            raise SpectraError(f"dataset lacks {var!r}, needed for the gamma analysis")
    energy = ds[f"{which}_energy"].sel(site=site).transpose("run", "step", "layer", hd, "dim")
    gamma = np.abs(ds[f"{which}_gamma"]).broadcast_like(energy).transpose(*energy.dims)
    shape = energy.shape[:-1]
    n_dim = energy.sizes["dim"]
    e = energy.values.reshape(-1, n_dim)
    g = gamma.values.reshape(-1, n_dim)
    rho, p = spearman_rows(g, e)

    qk = xr.DataArray(ds["qk_norm"].values, dims="run").broadcast_like(energy.isel(dim=0)).values.reshape(-1)
    measured = (
        measured_steps(ds).broadcast_like(energy.isel(dim=0)).transpose(*energy.dims[:-1]).values.reshape(-1)
    )
    status = _status(g, e, qk, measured, which)
    rho[status != STATUS_OK] = np.nan
    p[status != STATUS_OK] = np.nan

    coords = {k: v for k, v in energy.isel(dim=0, drop=True).coords.items() if k != "site"}
    dims = energy.dims[:-1]
    what = "keys" if which == "k" else "queries"
    out = xr.Dataset(
        {
            "rho": (
                dims,
                rho.reshape(shape),
                {
                    "long_name": f"Spearman rho between |gamma_j| and the energy of {what}' coordinate j",
                    "units": "1",
                },
            ),
            "pvalue": (
                dims,
                p.reshape(shape),
                {"long_name": "two-sided p-value of Spearman's rho (scipy.stats.spearmanr)", "units": "1"},
            ),
            "status": (
                dims,
                status.reshape(shape).astype(str),
                {"long_name": "'ok', or why rho is undefined"},
            ),
            "n": ((), n_dim, {"long_name": "coordinates per correlation (head_dim)", "units": "1"}),
        },
        coords=coords,
        attrs={
            "which": which,
            "site": site,
            "method": "scipy.stats.spearmanr per (run, step, layer, head) over the head's coordinates",
            "energy": f"{which}_energy at site {site!r}: mean over tokens of x_j^2, uncentred",
        },
    )
    return out


def _status(
    g: np.ndarray, e: np.ndarray, qk_norm: np.ndarray, measured: np.ndarray, which: str
) -> np.ndarray:
    status = np.full(g.shape[0], STATUS_OK, dtype=object)
    gamma_const = ~_defined_rows(g) & ~np.isnan(g).any(axis=-1)
    energy_nan = np.isnan(e).any(axis=-1)
    energy_const = ~_defined_rows(e) & ~energy_nan
    # later assignments win: the most fundamental reason is assigned last
    status[energy_const] = STATUS_ENERGY_CONSTANT
    status[energy_nan] = STATUS_ENERGY_MISSING
    status[gamma_const] = STATUS_CONSTANT
    frozen = (qk_norm == "frozen") | ((qk_norm == "frozen_k") & (which == "k"))  # frozen_k: the key gain only
    status[gamma_const & frozen] = STATUS_FROZEN
    status[np.isnan(g).any(axis=-1)] = STATUS_GAMMA_MISSING
    status[~measured] = STATUS_NOT_MEASURED
    status[qk_norm == "none"] = STATUS_NO_QK_NORM
    return status


def correlation_table(result: xr.Dataset, ds: xr.Dataset, **label_options: Iterable[str]) -> pd.DataFrame:
    """The correlation result as a long table, one row per (run, step, layer, head) the run has.

    ``ds`` supplies the runs' labels and tokens; ``label_options`` are passed to
    :func:`spectra.analysis.plan.run_table` (``simple_data``, ``complex_data``). Columns: ``run``, ``label``,
    ``which``, ``site``, ``step``, ``tokens``, ``layer``, ``head``, ``n``, ``rho``, ``pvalue``, ``status``.
    """
    ds = as_runs(ds)
    hd = "kv_head" if "kv_head" in result.dims else "head"
    df = result[["rho", "pvalue", "status"]].to_dataframe().reset_index()
    df = df[df["status"] != STATUS_NOT_MEASURED].rename(columns={hd: "head"})
    runs = run_table(ds, **label_options).set_index("run")
    df["label"] = df["run"].map(runs["label"])
    tokens = tokens_of(ds).to_series()  # indexed by (run, step)
    df["tokens"] = [token_count(tokens.loc[(r, s)]) for r, s in zip(df["run"], df["step"])]
    df["which"] = result.attrs["which"]
    df["site"] = result.attrs["site"]
    df["n"] = int(result["n"])
    cols = [
        "run",
        "label",
        "which",
        "site",
        "step",
        "tokens",
        "layer",
        "head",
        "n",
        "rho",
        "pvalue",
        "status",
    ]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True)


def layer_summary(result: xr.Dataset, ds: xr.Dataset, *, alpha: float = 0.05) -> pd.DataFrame:
    """Per run and layer at the run's final checkpoint: median rho over heads and how many are significant.

    Columns: ``run``, ``step``, ``tokens``, ``layer``, ``median_rho``, ``min_rho``, ``max_rho``,
    ``n_heads``, ``n_significant`` (p < ``alpha``), ``status`` (``ok`` or the reason rho is undefined).
    """
    ds = as_runs(ds)
    hd = "kv_head" if "kv_head" in result.dims else "head"
    final = final_checkpoint(result, ds)
    rows = []
    for i, run in enumerate(final["run"].values):
        for layer in final["layer"].values:
            cell = final.isel(run=i).sel(layer=layer)
            rho = cell["rho"].values
            st = [str(s) for s in cell["status"].values]
            ok = ~np.isnan(rho)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layer: NaN summary, as intended
                med, lo, hi = (
                    np.nanmedian(rho),
                    np.nanmin(rho) if ok.any() else np.nan,
                    np.nanmax(rho) if ok.any() else np.nan,
                )
            reasons = sorted({s for s in st if s != STATUS_OK})
            rows.append(
                {
                    "run": str(run),
                    "step": int(final["step"].values[i]),
                    "tokens": token_count(final["tokens"].values[i]),
                    "layer": int(layer),
                    "median_rho": float(med),
                    "min_rho": float(lo),
                    "max_rho": float(hi),
                    "n_heads": int(cell.sizes[hd]),
                    "n_significant": int(np.sum(cell["pvalue"].values[ok] < alpha)),
                    "status": STATUS_OK if not reasons else "; ".join(reasons),
                }
            )
    return pd.DataFrame(rows)


def gamma_points(
    ds: xr.Dataset, *, which: str = "k", site: str = DEFAULT_GAMMA_SITE, run: str | None = None
) -> pd.DataFrame:
    """Points of the gamma-vs-energy scatter at each run's final checkpoint.

    One row per (run, layer, head, dim) of runs whose gamma varies (learned QK-norm past
    initialisation). ``energy_fraction`` is coordinate ``j``'s share of its head's total energy at
    ``site``, so heads and layers of different scale share one axis. Columns: ``run``, ``step``,
    ``tokens``, ``layer``, ``head``, ``dim``, ``abs_gamma``, ``energy``, ``energy_fraction``.
    An empty frame means no run has a varying gamma.
    """
    ds = as_runs(ds)
    if run is not None:
        if run not in [str(r) for r in ds["run"].values]:
            raise SpectraError(f"run {run!r} not found; runs: {[str(r) for r in ds['run'].values]}")
        ds = ds.sel(run=[run])
    hd = head_dim_name(which)
    if site not in GAMMA_SITES:
        raise SpectraError(f"gamma analysis site must be one of {list(GAMMA_SITES)}, got {site!r}")
    energy = final_checkpoint(ds[f"{which}_energy"].sel(site=site, drop=True), ds)
    gamma = np.abs(final_checkpoint(ds[f"{which}_gamma"], ds))
    frames = []
    for i, r in enumerate(energy["run"].values):
        g = gamma.isel(run=i)
        if str(ds["qk_norm"].values[i]) == "none" or np.isnan(g.values).all():
            continue
        if (g.max("dim") == g.min("dim")).all():
            continue  # frozen or untrained gamma: Spearman undefined, nothing to scatter
        e = energy.isel(run=i)
        frac = e / e.sum("dim")
        frame = (
            xr.Dataset({"energy": e, "energy_fraction": frac, "abs_gamma": g.broadcast_like(e)})
            .drop_vars(
                [
                    c
                    for c in ("step", "tokens", "run", "qk_norm", "optimizer", "seed", "data")
                    if c in e.coords
                ],
                errors="ignore",
            )
            .to_dataframe()
            .reset_index()
            .rename(columns={hd: "head"})
        )
        frame.insert(0, "run", str(r))
        frame.insert(1, "step", int(energy["step"].values[i]))
        frame.insert(2, "tokens", token_count(energy["tokens"].values[i]))
        frames.append(frame)
    cols = ["run", "step", "tokens", "layer", "head", "dim", "abs_gamma", "energy", "energy_fraction"]
    if not frames:
        return pd.DataFrame(columns=cols)
    return pd.concat(frames, ignore_index=True)[cols].dropna(
        subset=["abs_gamma", "energy", "energy_fraction"]
    )
