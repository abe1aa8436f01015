"""The Gaussian null baseline: what each metric would read for random vectors of the same shape.

A participation ratio of 40 means little on its own: with ``N`` tokens and head dimension ``D``, even keys with
no structure at all, independent standard Gaussian vectors, give a PR below ``D``, and further below it the
closer ``N`` is to ``D``. The reference for a measured metric is therefore its value on an ``N x D`` matrix of
independent ``N(0, 1)`` entries, the **null**, and a measured PR reads best as a fraction of its null.

The null is computed by simulation, once per shape: :data:`NULL_DRAWS` matrices drawn with
``numpy.random.default_rng(NULL_SEED)``, their singular values in float64 (``numpy.linalg.svd``, as the cube's),
centred first when the measured spectra are. The spectra of each (N, D, centring, draws, seed) are kept in an
in-process cache (:func:`functools.lru_cache`), so a report over many runs of one shape simulates once; every
metric of :data:`spectra.analysis.metrics.METRIC_NAMES` is then computed from them, and the mean over draws is the null
value, with its standard deviation and the Monte Carlo standard error of the mean beside it.

Closed form to check against: for a Gaussian ``X`` (N x D), ``E tr(X^T X) = N D``, ``E tr((X^T X)^2) = N D
(N + D + 1)`` and ``E (tr X^T X)^2 = N D (N D + 2)``, so the eigenvalue-convention PR has the ratio of
expectations ``(N D + 2) / (N + D + 1)``; the mean over draws agrees with it to ``O(1 / (N D))``.

What the null does not model: the QK-norm sites divide every token vector by its RMS, which a plain Gaussian
does not (the normalised vectors are uniform on a sphere, whose spectra fluctuate slightly less), and the
uncentred null has mean zero, whereas real keys have a mean direction that the uncentred spectrum counts. The
fraction of the null is a scale, not a test.

No torch here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from spectra.analysis import metrics
from spectra.errors import SpectraError

__all__ = [
    "NULL_DRAWS",
    "NULL_SEED",
    "NullValue",
    "fraction_of_null",
    "headline_with_null",
    "null_metric",
    "null_spectra",
    "null_values",
]

NULL_DRAWS = 100
"""Gaussian matrices per shape. The Monte Carlo standard error of the mean PR is then about a tenth of its
spread over draws: ``0.0008`` at N = 4096, D = 64 (spread ``0.008``) and ``0.006`` at N = 72, D = 8 (spread
``0.06``), far below any difference the report discusses; it is reported with every null value."""
NULL_SEED = 0
"""Seed of ``numpy.random.default_rng`` for the draws: the null of a shape is the same number everywhere."""

_CHUNK_ELEMENTS = 2**24  # matrices drawn and decomposed per batch: 128 MiB of float64 at most


@dataclass(frozen=True)
class NullValue:
    """A metric's expected value under the Gaussian null, and how it was computed."""

    metric: str
    """Metric name, as in [`compute`][spectra.analysis.metrics.compute]."""
    n_tokens: int
    """N, rows of each Gaussian matrix (token vectors)."""
    head_dim: int
    """D, its columns."""
    centering: str
    """``uncentered`` or ``centered`` (column means subtracted before the SVD, as for centred spectra)."""
    mean: float
    """Mean of the metric over the draws: the null value."""
    sd: float
    """Standard deviation over the draws (ddof 1)."""
    se: float
    """Monte Carlo standard error of ``mean``, ``sd / sqrt(draws)``."""
    draws: int
    """Gaussian matrices drawn."""
    seed: int
    """Seed of the draws."""


def _check_shape(n_tokens: int, head_dim: int, draws: int) -> None:
    for name, value in (("n_tokens", n_tokens), ("head_dim", head_dim), ("draws", draws)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise SpectraError(f"null baseline: {name} must be a positive integer, got {value!r}")
    if draws < 2:
        raise SpectraError(f"null baseline: draws must be at least 2 for a spread, got {draws}")


@functools.lru_cache(maxsize=32)
def _cached_spectra(n_tokens: int, head_dim: int, centering: str, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_ELEMENTS // (n_tokens * head_dim))
    parts = []
    for start in range(0, draws, per_chunk):
        x = rng.standard_normal((min(per_chunk, draws - start), n_tokens, head_dim))  # (b, N, D)
        if centering == "centered":
            x -= x.mean(axis=1, keepdims=True)
        parts.append(np.linalg.svd(x, compute_uv=False))  # (b, min(N, D)), descending
    s = np.concatenate(parts)
    if s.shape[1] < head_dim:  # N < D: the missing singular values are exactly zero, as in a cube
        s = np.pad(s, ((0, 0), (0, head_dim - s.shape[1])))
    s.flags.writeable = False  # shared by every caller through the cache
    return s


def null_spectra(
    n_tokens: int,
    head_dim: int,
    *,
    centering: str = "uncentered",
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
) -> np.ndarray:
    """Singular values of ``draws`` Gaussian ``n_tokens x head_dim`` matrices, (draws, head_dim), cached.

    Parameters
    ----------
    n_tokens, head_dim
        N and D of the measured spectra.
    centering
        ``centered`` subtracts each matrix's column means first, as the extraction does for centred spectra.
    draws, seed
        Number of matrices and the seed of ``numpy.random.default_rng``.

    Returns
    -------
    numpy.ndarray
        float64, read-only (shared through the cache), each row in descending order; zeros beyond
        ``min(N, D)``.

    Examples
    --------
    >>> s = null_spectra(72, 8)
    >>> s.shape, bool(np.all(np.diff(s, axis=1) <= 0))
    ((100, 8), True)
    """
    _check_shape(n_tokens, head_dim, draws)
    if centering not in ("uncentered", "centered"):
        raise SpectraError(f"null baseline: centering must be uncentered or centered, got {centering!r}")
    return _cached_spectra(int(n_tokens), int(head_dim), centering, int(draws), int(seed))


def null_metric(
    n_tokens: int,
    head_dim: int,
    metric: str = "pr_sv",
    *,
    centering: str = "uncentered",
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
    **metric_kwargs: Any,
) -> NullValue:
    """The expected value of ``metric`` for Gaussian ``n_tokens x head_dim`` matrices (mean over draws).

    Parameters
    ----------
    n_tokens, head_dim
        N and D of the measured spectra (a cube's ``n_tokens`` attribute and ``sv`` length).
    metric
        A name understood by [`compute`][spectra.analysis.metrics.compute].
    centering, draws, seed
        See [`null_spectra`][spectra.analysis.null.null_spectra].
    **metric_kwargs
        Passed on to the metric (for example ``rtol=``).

    Returns
    -------
    NullValue
        Mean, spread and Monte Carlo standard error over the draws.

    Examples
    --------
    >>> null = null_metric(256, 16, "pr_eig")
    >>> round(null.mean, 1), round((256 * 16 + 2) / (256 + 16 + 1), 1)  # the closed form of the module
    (15.0, 15.0)
    """
    s = null_spectra(n_tokens, head_dim, centering=centering, draws=draws, seed=seed)
    values = metrics.compute(xr.DataArray(s, dims=("draw", "sv")), metric, **metric_kwargs).values
    values = values[~np.isnan(values)]
    if values.size < 2:
        raise SpectraError(
            f"null baseline: {metric} is undefined for Gaussian {n_tokens} x {head_dim} matrices"
        )
    sd = float(values.std(ddof=1))
    return NullValue(
        metric=metric,
        n_tokens=int(n_tokens),
        head_dim=int(head_dim),
        centering=centering,
        mean=float(values.mean()),
        sd=sd,
        se=sd / math.sqrt(values.size),
        draws=int(draws),
        seed=int(seed),
    )


def _n_tokens(ds: xr.Dataset) -> xr.DataArray:
    """N per run: the ``n_tokens`` run coordinate of stacked cubes, or a single cube's attribute (0-d)."""
    if "n_tokens" in ds.coords:
        return ds["n_tokens"]
    if "n_tokens" not in ds.attrs:
        raise SpectraError("the cube records no n_tokens: the null baseline needs the N behind its spectra")
    return xr.DataArray(int(ds.attrs["n_tokens"]))


def null_values(
    ds: xr.Dataset,
    metric: str = "pr_sv",
    *,
    var: str = "k_sv",
    centering: str = "uncentered",
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
    **metric_kwargs: Any,
) -> xr.DataArray:
    """The null value of ``metric`` for each run of ``ds``, at the run's own N and the cube's head dimension.

    Parameters
    ----------
    ds
        One cube or several along ``run`` ([`open_cubes`][spectra.cube.open_cubes]).
    metric
        Metric name.
    var
        An activation spectrum (``k_sv`` or ``q_sv``): its N is the cube's ``n_tokens``. Weight spectra have
        another N (``d_model``); call [`null_metric`][spectra.analysis.null.null_metric] with it directly.
    centering, draws, seed, **metric_kwargs
        As for [`null_metric`][spectra.analysis.null.null_metric].

    Returns
    -------
    xarray.DataArray
        Over ``run`` (0-d for a single cube), named ``<metric>_null``; its attributes say how it was made.
    """
    if var not in ds.data_vars or "site" not in ds[var].dims:
        raise SpectraError(
            f"null_values needs an activation spectrum (k_sv or q_sv), got {var!r}; for a weight spectrum "
            "call null_metric with its N (d_model)"
        )
    head_dim = int(ds.sizes["sv"])
    n = _n_tokens(ds)

    def one(n_tokens: int) -> float:
        return null_metric(
            int(n_tokens), head_dim, metric, centering=centering, draws=draws, seed=seed, **metric_kwargs
        ).mean

    out = xr.apply_ufunc(np.vectorize(one, otypes=[np.float64]), n)
    out.name = f"{metric}_null"
    out.attrs = {
        "long_name": f"mean {metric} of Gaussian N x {head_dim} matrices at each run's N",
        "units": "1",
        "null": f"{draws} draws of independent N(0, 1) entries, numpy default_rng seed {seed}, {centering}",
        "head_dim": head_dim,
    }
    return out


def fraction_of_null(
    values: xr.DataArray,
    ds: xr.Dataset,
    metric: str = "pr_sv",
    *,
    centering: str = "uncentered",
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
    **metric_kwargs: Any,
) -> xr.DataArray:
    """``values / null``: a measured metric as a fraction of its Gaussian null, run by run.

    Parameters
    ----------
    values
        The metric as computed from ``ds``'s key or query spectra (any dimensions, ``run`` among them for stacked
        cubes), e.g. ``spectra.participation_ratio(ds.k_sv.sel(site="normed", centering="uncentered"))``.
    ds
        The cubes the values come from (for each run's N and the head dimension).
    metric, centering, draws, seed, **metric_kwargs
        What ``values`` is, and how the null is drawn; ``centering`` must be the one ``values`` were computed at.

    Returns
    -------
    xarray.DataArray
        Same dimensions as ``values``; 1 means "as spread as random vectors of that shape".

    Examples
    --------
    >>> import xarray as xr
    >>> ds = xr.Dataset({"k_sv": (("site", "sv"), np.ones((1, 8)))}, attrs={"n_tokens": 72})
    >>> pr = xr.DataArray(4.0)
    >>> round(float(fraction_of_null(pr, ds)), 3)  # half of the 8 directions, but the null is 7.76
    0.515
    """
    null = null_values(ds, metric, var="k_sv", centering=centering, draws=draws, seed=seed, **metric_kwargs)
    out = values / null
    out.name = f"{metric}_fraction_of_null"
    out.attrs = {
        "long_name": f"{metric} as a fraction of its Gaussian null",
        "units": "1",
        "null": null.attrs["null"],
    }
    return out


def headline_with_null(
    summaries: pd.DataFrame,
    ds: xr.Dataset,
    *,
    draws: int = NULL_DRAWS,
    seed: int = NULL_SEED,
) -> pd.DataFrame:
    """The headline table with each run's PR against its null: what the report's headline section shows.

    Parameters
    ----------
    summaries
        [`run_summaries`][spectra.analysis.stats.run_summaries]' output (its ``convention`` and ``centering`` columns
        say which PR it holds).
    ds
        The cubes it was computed from.
    draws, seed
        How the null is drawn.

    Returns
    -------
    pandas.DataFrame
        ``summaries`` with ``n_tokens``, ``head_dim``, ``null_mean``, ``null_se`` (Monte Carlo standard error),
        and ``fraction_of_null``, ``fraction_ci_low``, ``fraction_ci_high`` (the mean and its interval over heads
        divided by the null; the null's own error is two orders of magnitude smaller and is not propagated).

    Notes
    -----
    The section should state, per run, "mean PR p, which is f of the p0 that Gaussian vectors of the same N and
    head_dim give", and say that a fraction well below 1 is collapse beyond what the finite N alone explains,
    whereas a raw PR below ``head_dim`` is not: even random vectors read below it.
    """
    n_by_run = _n_tokens(ds)
    runs = [str(r) for r in ds["run"].values] if "run" in ds.dims else [str(summaries["run"].iloc[0])]
    n_tokens = dict(zip(runs, np.atleast_1d(n_by_run.values).tolist()))
    head_dim = int(ds.sizes["sv"])
    rows = []
    for _, row in summaries.iterrows():
        if str(row["run"]) not in n_tokens:
            raise SpectraError(f"run {row['run']!r} of the summaries is not among the cubes given")
        null = null_metric(
            int(n_tokens[str(row["run"])]),
            head_dim,
            f"pr_{row['convention']}",
            centering=str(row["centering"]),
            draws=draws,
            seed=seed,
        )
        rows.append(
            {
                "n_tokens": null.n_tokens,
                "head_dim": head_dim,
                "null_mean": null.mean,
                "null_se": null.se,
                "fraction_of_null": row["mean"] / null.mean,
                "fraction_ci_low": row["ci_low"] / null.mean,
                "fraction_ci_high": row["ci_high"] / null.mean,
            }
        )
    out = pd.concat([summaries.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    out.attrs = {"null": f"{draws} Gaussian draws, numpy default_rng seed {seed}"}
    return out
