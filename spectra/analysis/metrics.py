"""Effective-rank metrics of singular-value spectra, each named by its convention.

Three layers (as in xskillscore):

1. numpy kernels that reduce over ``axis=`` (``participation_ratio_sv``, ``participation_ratio_eig``,
   ``energy_rank_kernel``, ``condition_number_kernel``, ``effective_rank_kernel``, ``stable_rank_kernel``,
   ``rankme_kernel``, ``decay_exponent_kernel``);
2. public functions that take a labelled singular-value `xarray.DataArray` and reduce over
   ``dim="sv"`` (``participation_ratio``, ``energy_rank``, ``condition_number``, ``effective_rank``,
   ``stable_rank``, ``rankme``, ``decay_exponent``, and ``compute`` which dispatches by metric name);
3. the ``.spectra`` accessor in [`accessor`][spectra.analysis.accessor], which only forwards here.

Conventions shared by every metric:

- the input is a spectrum of singular values ``s_i >= 0`` (not eigenvalues); its order does not matter,
  and where a definition needs the largest singular value it uses the maximum, not the first element;
- every metric is invariant to the scale of ``s`` (the kernels divide by ``max(s)`` first, which also keeps
  ``s**4`` far from overflow and underflow);
- an all-zero spectrum has no effective dimension: every metric returns NaN for it;
- NaN anywhere in a spectrum makes that spectrum's metric NaN (the ``unit`` read-out site is NaN for models
  without QK-norm, and an outer join of runs pads missing steps with NaN);
- negative singular values are an input error (`SpectraError`).

For ``k`` spectra of ``d`` values every kernel costs O(k d) (energy rank O(k d log d) for the sort).
No I/O here, and no torch: a notebook reads cubes and computes every metric without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import entr

from spectra.errors import SpectraError

__all__ = [
    "CONDITION_RTOL",
    "METRIC_NAMES",
    "compute",
    "RANKME_EPS",
    "condition_number",
    "condition_number_kernel",
    "decay_exponent",
    "decay_exponent_kernel",
    "effective_rank",
    "effective_rank_kernel",
    "energy_rank",
    "energy_rank_kernel",
    "participation_ratio",
    "participation_ratio_eig",
    "participation_ratio_sv",
    "rankme",
    "rankme_kernel",
    "stable_rank",
    "stable_rank_kernel",
    "summary_table",
]

CONDITION_RTOL = 1e-6
"""Default relative tolerance of [`condition_number`][spectra.analysis.metrics.condition_number].

Forward passes run in float32, so every activation carries a rounding error ``E`` with
``||E||_2 <= ||E||_F ~ eps32 ||X||_F <= eps32 sqrt(D) s_1`` (``eps32 = 1.2e-7``; about ``1e-6 s_1`` at
head dimension ``D = 64``). By Weyl's inequality every singular value moves by at most ``||E||_2``, so
singular values below ``1e-6 s_1`` cannot be told apart from zero and a ratio ``s_1 / s_min`` beyond ``1e6``
is not a measurement. Exact zeros (a rank-deficient matrix, e.g. a QK-norm gain pruned to zero) would
otherwise give ``inf``; with the tolerance they are left out and the rank deficiency shows in
[`energy_rank`][spectra.analysis.metrics.energy_rank] instead.
"""

ENERGY_RTOL = 1e-12
"""Slack on the energy threshold of [`energy_rank`][spectra.analysis.metrics.energy_rank].

Ties at the threshold are common (a flat spectrum of ten values reaches 90% at exactly nine), and the
cumulative sum's rounding (``~ d eps64 = 1e-14`` for ``d = 64``) must not add one to the count."""

METRIC_NAMES = (
    "pr_sv",
    "pr_eig",
    "energy_rank_90",
    "condition_number",
    "effective_rank",
    "stable_rank",
    "rankme",
    "decay_exponent",
)
"""Metric names understood by [`compute`][spectra.analysis.metrics.compute].

``energy_rank_<pct>`` takes any percentage in (0, 100]."""

RANKME_EPS = 1e-7
"""The constant ``epsilon`` that RankMe adds to every normalised singular value (Garrido et al. 2023, eq. 1).

It keeps ``log p`` finite for zero singular values in their implementation; with ``epsilon = 0`` RankMe is
exactly the entropy effective rank of Roy & Vetterli. Adding ``epsilon`` changes the entropy by about
``-epsilon sum_k (log p_k + 1)``, at most ``d epsilon log(1/epsilon)``, so the two differ by less than that
relative: ``1e-4`` for spectra of 64 values, and about ``3e-5`` in practice (``d epsilon log d``)."""

_ENERGY_RANK_NAME = re.compile(r"energy_rank_(\d+(?:\.\d+)?)")


# --------------------------------------------------------------------------------------------------------
# Layer 1: numpy kernels
# --------------------------------------------------------------------------------------------------------


def _unit_max(s: Any, axis: int) -> np.ndarray:
    """``s / max(s)`` along ``axis`` in float64, after checking it is a spectrum.

    Dividing by the maximum makes every metric scale-invariant by construction and keeps ``s**4`` finite; an
    all-zero spectrum becomes all-NaN (0/0) and a spectrum holding a NaN becomes all-NaN (``max`` propagates
    NaN), which is exactly the NaN policy of the metrics.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 0:
        raise SpectraError("a spectrum needs at least one axis; got a scalar")
    if s.shape[axis] == 0:
        raise SpectraError(f"empty spectrum: axis {axis} of an array of shape {s.shape} has length 0")
    if np.any(s < 0):  # NaN < 0 is False, so NaN passes through to the NaN policy
        raise SpectraError(
            f"negative singular values (min {np.nanmin(s):.6g}): the metrics take singular values, "
            "which are >= 0"
        )
    s_max = np.max(s, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / s_max


def participation_ratio_sv(s: Any, axis: int = -1) -> np.ndarray:
    """Participation ratio on singular values, ``(sum s)^2 / sum s^2`` (the source documents' formula).

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, in ``[1, d]`` for ``d`` values; NaN for all-zero spectra or spectra holding a NaN.

    Examples
    --------
    >>> round(float(participation_ratio_sv([1.0, 1.0, 0.1])), 4)  # 2.1^2 / 2.01
    2.194
    """
    u = _unit_max(s, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(u, axis=axis) ** 2 / np.sum(u**2, axis=axis)


def participation_ratio_eig(s: Any, axis: int = -1) -> np.ndarray:
    """Participation ratio on eigenvalues ``lambda = s^2``, ``(sum s^2)^2 / sum s^4`` (the literature's).

    The eigenvalues are those of the Gram matrix ``X^T X`` whose singular values are ``s``, so this is
    ``tr(C)^2 / tr(C^2)`` with ``C = X^T X``.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, in ``[1, d]``, never larger than
        [`participation_ratio_sv`][spectra.analysis.metrics.participation_ratio_sv] of the same spectrum.

    Examples
    --------
    >>> round(float(participation_ratio_eig([1.0, 1.0, 0.1])), 4)  # 2.01^2 / 2.0001
    2.0199
    """
    lam = _unit_max(s, axis) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(lam, axis=axis) ** 2 / np.sum(lam**2, axis=axis)


def energy_rank_kernel(s: Any, threshold: float = 0.9, axis: int = -1) -> np.ndarray:
    """Smallest number ``r`` of singular values whose energy ``sum_{i<=r} s_(i)^2`` reaches ``threshold``.

    ``s_(1) >= s_(2) >= ...`` is the spectrum sorted in descending order (the input may be in any order). A
    slack of [`ENERGY_RTOL`][spectra.analysis.metrics.ENERGY_RTOL] keeps exact ties at the threshold from rounding up.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    threshold : float
        Fraction of the total energy ``sum s^2``, in (0, 1].
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64 holding integers in ``[1, d]`` (float so that NaN can mark undefined spectra).

    Examples
    --------
    >>> float(energy_rank_kernel([3.0, 4.0, 0.0], threshold=0.9))  # energies 16/25, then 25/25
    2.0
    """
    if not 0.0 < threshold <= 1.0:
        raise SpectraError(f"energy threshold must be in (0, 1]; got {threshold!r}")
    energy = _unit_max(s, axis) ** 2
    energy = np.moveaxis(energy, axis, -1)  # (..., d)
    undefined = np.isnan(energy).any(axis=-1)
    descending = -np.sort(-energy, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.cumsum(descending, axis=-1) / np.sum(energy, axis=-1, keepdims=True)
    below = np.sum(fraction < threshold - ENERGY_RTOL, axis=-1)
    rank = np.minimum(below + 1, energy.shape[-1]).astype(np.float64)
    return np.where(undefined, np.nan, rank)


def condition_number_kernel(s: Any, rtol: float | None = CONDITION_RTOL, axis: int = -1) -> np.ndarray:
    """``s_1 / s_min``: largest singular value over the smallest one above ``rtol * s_1``.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    rtol : float or None
        Singular values ``<= rtol * s_1`` count as zero and are left out (see
        [`CONDITION_RTOL`][spectra.analysis.metrics.CONDITION_RTOL] for the default). ``None`` uses the plain smallest
        singular value, ``s_1 / s_d`` as in the source documents, which is ``inf`` for a rank-deficient
        matrix.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, >= 1.

    Examples
    --------
    >>> float(condition_number_kernel([10.0, 2.0, 0.0]))
    5.0
    >>> float(condition_number_kernel([10.0, 2.0, 0.0], rtol=None))
    inf
    """
    if rtol is not None and not 0.0 <= rtol < 1.0:
        raise SpectraError(f"condition-number rtol must be in [0, 1) or None; got {rtol!r}")
    u = _unit_max(s, axis)  # s_1 = 1
    undefined = np.isnan(u).any(axis=axis)
    kept = u if rtol is None else np.where(u > rtol, u, np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = 1.0 / np.min(kept, axis=axis)
    return np.where(undefined, np.nan, kappa)


def effective_rank_kernel(s: Any, axis: int = -1) -> np.ndarray:
    """Entropy effective rank ``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s`` (Roy & Vetterli 2007).

    ``0 log 0 = 0``, so zero singular values do not count.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, in ``[1, d]``.

    Examples
    --------
    >>> round(float(effective_rank_kernel([1.0, 1.0, 0.1])), 4)
    2.3434
    """
    u = _unit_max(s, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = u / np.sum(u, axis=axis, keepdims=True)
    return np.exp(np.sum(entr(p), axis=axis))  # entr(p) = -p log p, entr(0) = 0, entr(NaN) = NaN


def stable_rank_kernel(s: Any, axis: int = -1) -> np.ndarray:
    """Stable (numerical) rank ``sum s^2 / s_1^2 = ||X||_F^2 / ||X||_2^2`` (Rudelson & Vershynin 2007).

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``; ``s_1`` is their maximum.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, in ``[1, d]``.

    Examples
    --------
    >>> float(stable_rank_kernel([1.0, 1.0, 0.1]))
    2.01
    """
    return np.sum(_unit_max(s, axis) ** 2, axis=axis)


def rankme_kernel(s: Any, eps: float = RANKME_EPS, axis: int = -1) -> np.ndarray:
    """RankMe, ``exp(-sum p_k log p_k)`` with ``p_k = s_k / sum_j s_j + eps`` (Garrido et al. 2023).

    The entropy effective rank ([`effective_rank_kernel`][spectra.analysis.metrics.effective_rank_kernel]) with the
    published constant ``eps`` added to every normalised singular value, as in the RankMe paper; ``eps = 0``
    gives the effective rank exactly.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    eps : float
        The additive constant, >= 0; [`RANKME_EPS`][spectra.analysis.metrics.RANKME_EPS] (``1e-7``) by default.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64, in ``[1, d]`` up to terms of order ``d eps log(1/eps)``.

    Examples
    --------
    >>> round(float(rankme_kernel([1.0, 1.0, 0.1], eps=0.0)), 4)  # the effective rank
    2.3434
    >>> round(float(rankme_kernel([1.0, 0.0, 0.0, 0.0])), 6)  # rank one: 1 + 3 eps log(1/eps), about 1
    1.000005
    """
    if not (eps >= 0.0 and np.isfinite(eps)):
        raise SpectraError(f"RankMe eps must be a finite number >= 0; got {eps!r}")
    u = _unit_max(s, axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = u / np.sum(u, axis=axis, keepdims=True) + eps
    return np.exp(np.sum(entr(p), axis=axis))


def decay_exponent_kernel(
    s: Any, first: int = 1, last: int | None = None, rtol: float = CONDITION_RTOL, axis: int = -1
) -> np.ndarray:
    """Spectral decay exponent ``alpha`` of ``s_(i) ~ i^(-alpha)``: least squares of ``log s_(i)`` on ``log i``.

    ``s_(1) >= s_(2) >= ...`` is the spectrum sorted in descending order. The fit is ordinary least squares
    with equal weights over the ranks ``first <= i <= last`` (1-based, inclusive) whose value is above
    ``rtol * s_(1)``; ``alpha`` is minus the slope. At least two ranks must remain, else the result is NaN.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    first, last : int
        Rank range of the fit; ``last=None`` is the whole spectrum.
    rtol : float
        Values ``<= rtol * s_(1)`` are left out: their logarithm is rounding noise (see
        [`CONDITION_RTOL`][spectra.analysis.metrics.CONDITION_RTOL]), or ``-inf`` for exact zeros.
    axis : int
        Axis holding the spectrum; it is reduced.

    Returns
    -------
    numpy.ndarray
        float64: 0 for a flat spectrum, ``a`` for ``s_i = i^(-a)``; negative if the spectrum grows (it cannot
        once sorted, so never below 0 up to rounding). The eigenvalues ``s^2`` decay with exponent ``2 alpha``.

    Examples
    --------
    >>> i = np.arange(1, 33)
    >>> round(float(decay_exponent_kernel(i ** -1.5)), 12)
    1.5
    """
    if not 0.0 <= rtol < 1.0:
        raise SpectraError(f"decay-exponent rtol must be in [0, 1); got {rtol!r}")
    u = np.moveaxis(_unit_max(s, axis), axis, -1)  # (..., d), s_(1) = 1
    d = u.shape[-1]
    last = d if last is None else last
    if not 1 <= first < last <= d:
        raise SpectraError(
            f"decay-exponent rank range must satisfy 1 <= first < last <= {d}; got first={first}, last={last}"
        )
    undefined = np.isnan(u).any(axis=-1)
    descending = -np.sort(-np.nan_to_num(u, nan=0.0), axis=-1)[..., first - 1 : last]  # (..., m)
    x = np.log(np.arange(first, last + 1, dtype=np.float64))  # (m,)
    used = descending > rtol  # (..., m)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(used, np.log(np.where(used, descending, 1.0)), 0.0)
        n = used.sum(axis=-1)
        x_mean = np.sum(used * x, axis=-1) / n
        y_mean = np.sum(y, axis=-1) / n
        dx = np.where(used, x - x_mean[..., None], 0.0)
        slope = np.sum(dx * (y - y_mean[..., None]), axis=-1) / np.sum(dx**2, axis=-1)
    return np.where(undefined | (n < 2), np.nan, 0.0 - slope)  # 0.0 - slope: a flat spectrum gives +0.0


# --------------------------------------------------------------------------------------------------------
# Layer 2: labelled functions over dim="sv"
# --------------------------------------------------------------------------------------------------------


def _apply(
    sv: xr.DataArray,
    kernel: Callable[..., np.ndarray],
    dim: str,
    name: str,
    attrs: dict[str, str],
    **kernel_kwargs: Any,
) -> xr.DataArray:
    """Reduce ``sv`` over ``dim`` with ``kernel``; keep every other dimension and coordinate."""
    if not isinstance(sv, xr.DataArray):
        raise SpectraError(f"expected a singular-value xarray.DataArray, got {type(sv).__name__}")
    if dim not in sv.dims:
        label = f"{sv.name!r}" if sv.name is not None else "the array"
        raise SpectraError(f"{label} has no dimension {dim!r} to reduce; its dimensions are {sv.dims}")
    out = xr.apply_ufunc(
        kernel,
        sv,
        input_core_dims=[[dim]],
        kwargs={"axis": -1, **kernel_kwargs},  # apply_ufunc moves the core dim last
        dask="parallelized",
        output_dtypes=[np.float64],
        keep_attrs=False,  # the input's units (activation units) do not apply to a ratio
    )
    out.name = name
    out.attrs = {"long_name": attrs["long_name"], "units": "1", **attrs}
    if sv.name is not None:
        out.attrs["input"] = str(sv.name)
    return out


_PR_ATTRS = {
    "sv": {
        "long_name": "participation ratio of the singular values",
        "convention": "sv: weights are the singular values s_i (the source documents' formula)",
        "formula": "(sum_i s_i)^2 / sum_i s_i^2",
        "reference": "Bell & Dean (1970), Discuss. Faraday Soc. 50, 55-61, applied to singular values",
    },
    "eig": {
        "long_name": "participation ratio of the eigenvalues",
        "convention": "eig: weights are the eigenvalues lambda_i = s_i^2 of X^T X (the literature's)",
        "formula": "(sum_i s_i^2)^2 / sum_i s_i^4",
        "reference": "Gao et al. (2017), A theory of multineuronal dimensionality, dynamics and measurement, "
        "bioRxiv 214262",
    },
}
_PR_KERNELS = {"sv": participation_ratio_sv, "eig": participation_ratio_eig}


def participation_ratio(
    sv: xr.DataArray, convention: Literal["sv", "eig"] = "sv", dim: str = "sv"
) -> xr.DataArray:
    r"""Participation ratio of singular-value spectra, in one of two conventions.

    $$
    \mathrm{PR}_{sv} = \frac{(\sum_i s_i)^2}{\sum_i s_i^2}, \qquad
    \mathrm{PR}_{eig} = \frac{(\sum_i \lambda_i)^2}{\sum_i \lambda_i^2}
    = \frac{(\sum_i s_i^2)^2}{\sum_i s_i^4}, \quad \lambda_i = s_i^2 .
    $$

    Both are ``d`` for a flat spectrum of ``d`` values and 1 for rank one, and ``PR_eig <= PR_sv`` always:
    ``PR_eig`` weighs the large singular values more and reads a dominant direction with a flat tail as
    low-dimensional, where ``PR_sv`` still counts the tail.

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim`` (e.g. ``ds.k_sv``).
    convention : {"sv", "eig"}
        ``"sv"``: on singular values, the source documents' formula. ``"eig"``: on the eigenvalues of the
        Gram/covariance matrix, the usual definition (Gao et al. 2017).
    dim : str
        Dimension holding the spectrum; it is reduced, every other dimension is kept.

    Returns
    -------
    xarray.DataArray
        Named ``pr_sv`` or ``pr_eig``, with attributes ``long_name``, ``units``, ``convention``, ``formula``,
        ``reference``.

    References
    ----------
    Bell, R. J. & Dean, P. (1970). Atomic vibrations in vitreous silica. *Discuss. Faraday Soc.* 50, 55-61.
    Gao, P., Trautmann, E., Yu, B., Santhanam, G., Ryu, S., Shenoy, K. & Ganguli, S. (2017). A theory of
    multineuronal dimensionality, dynamics and measurement. *bioRxiv* 214262.

    Examples
    --------
    >>> import xarray as xr
    >>> sv = xr.DataArray([[1.0, 1.0, 0.1], [1.0, 0.0, 0.0]], dims=("head", "sv"))
    >>> participation_ratio(sv, convention="sv").round(4).values.tolist()
    [2.194, 1.0]
    >>> participation_ratio(sv, convention="eig").round(4).values.tolist()
    [2.0199, 1.0]
    """
    if convention not in _PR_KERNELS:
        raise SpectraError(f"unknown participation-ratio convention {convention!r}; use 'sv' or 'eig'")
    return _apply(sv, _PR_KERNELS[convention], dim, f"pr_{convention}", _PR_ATTRS[convention])


def energy_rank(sv: xr.DataArray, threshold: float = 0.9, dim: str = "sv") -> xr.DataArray:
    r"""Number of singular values needed to hold a fraction ``threshold`` of the energy.

    $$
    r_\tau = \min \Big\{ r : \frac{\sum_{i \le r} s_{(i)}^2}{\sum_i s_i^2} \ge \tau \Big\}
    $$

    with ``s_(1) >= s_(2) >= ...`` the sorted spectrum (the source documents' "90%-energy rank"; the
    cumulative-variance criterion of PCA when the spectrum is centred, Jolliffe 2002, section 6.1.1).

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    threshold : float
        Energy fraction ``tau`` in (0, 1]; 0.9 by default.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64 counts in ``[1, d]``, named ``energy_rank_<pct>`` (``energy_rank_90`` by default).

    References
    ----------
    Jolliffe, I. T. (2002). *Principal Component Analysis*, 2nd ed., Springer, section 6.1.1.

    Examples
    --------
    >>> import xarray as xr
    >>> sv = xr.DataArray([4.0, 3.0, 2.0, 1.0], dims="sv")  # energies 16, 9, 4, 1 of 30
    >>> int(energy_rank(sv, threshold=0.9))  # 25/30 = 0.83 < 0.9 <= 29/30
    3
    """
    pct = f"{threshold * 100:g}"
    attrs = {
        "long_name": f"number of singular values holding {pct}% of the energy",
        "convention": f"energy = s_i^2, threshold {threshold!r}, spectrum sorted in descending order",
        "formula": "min r such that sum_{i<=r} s_(i)^2 / sum_i s_i^2 >= threshold",
        "reference": "Jolliffe (2002), Principal Component Analysis, 2nd ed., section 6.1.1",
    }
    return _apply(sv, energy_rank_kernel, dim, f"energy_rank_{pct}", attrs, threshold=threshold)


def condition_number(sv: xr.DataArray, rtol: float | None = CONDITION_RTOL, dim: str = "sv") -> xr.DataArray:
    r"""Condition number ``s_1 / s_min`` over the singular values above a relative tolerance.

    $$
    \kappa = \frac{s_1}{\min \{ s_i : s_i > \mathrm{rtol} \cdot s_1 \}}, \qquad s_1 = \max_i s_i
    $$

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    rtol : float or None
        Singular values ``<= rtol * s_1`` are treated as zero and left out, so the result is the condition
        number of the numerically non-zero part (at most ``1 / rtol``). The default ``1e-6`` is the rounding
        floor of float32 activations (see [`CONDITION_RTOL`][spectra.analysis.metrics.CONDITION_RTOL]).
        ``None``: the source documents' ``s_1 / s_d`` with no tolerance, ``inf`` for a rank-deficient matrix.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64 >= 1, named ``condition_number``.

    References
    ----------
    Golub, G. H. & Van Loan, C. F. (2013). *Matrix Computations*, 4th ed., Johns Hopkins, section 2.6.

    Examples
    --------
    >>> import xarray as xr
    >>> sv = xr.DataArray([8.0, 2.0, 0.0], dims="sv")
    >>> float(condition_number(sv))
    4.0
    >>> float(condition_number(sv, rtol=None))
    inf
    """
    attrs = {
        "long_name": "condition number of the singular values",
        "convention": (
            f"s_1 over the smallest singular value > {rtol!r} * s_1"
            if rtol is not None
            else "s_1 / s_d with no tolerance (inf if rank-deficient)"
        ),
        "formula": "max_i s_i / min{s_i : s_i > rtol * max_i s_i}",
        "reference": "Golub & Van Loan (2013), Matrix Computations, 4th ed., section 2.6",
    }
    return _apply(sv, condition_number_kernel, dim, "condition_number", attrs, rtol=rtol)


def effective_rank(sv: xr.DataArray, dim: str = "sv") -> xr.DataArray:
    r"""Entropy effective rank of Roy & Vetterli (2007).

    $$
    \mathrm{erank} = \exp\Big(-\sum_i p_i \log p_i\Big), \qquad p_i = \frac{s_i}{\sum_j s_j},
    \quad 0 \log 0 = 0
    $$

    It is ``d`` for a flat spectrum, 1 for rank one, and never smaller than
    [`participation_ratio`][spectra.analysis.metrics.participation_ratio] in the ``sv`` convention (the exponential of
    the Shannon entropy of ``p`` bounds that of its order-2 Rényi entropy from above).

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64 in ``[1, d]``, named ``effective_rank``.

    References
    ----------
    Roy, O. & Vetterli, M. (2007). The effective rank: a measure of effective dimensionality. *15th European
    Signal Processing Conference (EUSIPCO)*, 606-610.

    Examples
    --------
    >>> import xarray as xr
    >>> round(float(effective_rank(xr.DataArray([2.0, 2.0, 2.0, 2.0], dims="sv"))), 12)
    4.0
    """
    attrs = {
        "long_name": "entropy effective rank of the singular values",
        "convention": "p_i = s_i / sum_j s_j on singular values, natural log, 0 log 0 = 0",
        "formula": "exp(-sum_i p_i log p_i)",
        "reference": "Roy & Vetterli (2007), The effective rank: a measure of effective dimensionality, "
        "EUSIPCO, 606-610",
    }
    return _apply(sv, effective_rank_kernel, dim, "effective_rank", attrs)


def stable_rank(sv: xr.DataArray, dim: str = "sv") -> xr.DataArray:
    r"""Stable (numerical) rank, the squared Frobenius norm over the squared spectral norm.

    $$
    \mathrm{srank} = \frac{\sum_i s_i^2}{s_1^2} = \frac{\lVert X \rVert_F^2}{\lVert X \rVert_2^2},
    \qquad s_1 = \max_i s_i
    $$

    Never larger than [`participation_ratio`][spectra.analysis.metrics.participation_ratio] in the ``eig`` convention.

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64 in ``[1, d]``, named ``stable_rank``.

    References
    ----------
    Rudelson, M. & Vershynin, R. (2007). Sampling from large matrices: an approach through geometric
    functional analysis. *Journal of the ACM* 54(4), article 21.

    Examples
    --------
    >>> import xarray as xr
    >>> float(stable_rank(xr.DataArray([2.0, 1.0, 1.0], dims="sv")))
    1.5
    """
    attrs = {
        "long_name": "stable rank of the singular values",
        "convention": "s_1 = max_i s_i",
        "formula": "sum_i s_i^2 / s_1^2",
        "reference": "Rudelson & Vershynin (2007), J. ACM 54(4), article 21",
    }
    return _apply(sv, stable_rank_kernel, dim, "stable_rank", attrs)


def rankme(sv: xr.DataArray, eps: float = RANKME_EPS, dim: str = "sv") -> xr.DataArray:
    r"""RankMe of Garrido et al. (2023): the entropy effective rank with their additive constant.

    $$
    \mathrm{RankMe} = \exp\Big(-\sum_k p_k \log p_k\Big), \qquad
    p_k = \frac{s_k}{\sum_j s_j} + \varepsilon
    $$

    The same quantity as [`effective_rank`][spectra.analysis.metrics.effective_rank] (Roy & Vetterli 2007) under the
    name the self-supervised-learning literature uses, where it predicts downstream performance from the rank
    of representations. With the default ``epsilon = 1e-7`` the two agree to better than
    ``d epsilon log(1/epsilon)`` relative (``1e-4`` at ``d = 64``; see [`RANKME_EPS`][spectra.analysis.metrics.RANKME_EPS]).

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    eps : float
        The additive constant ``epsilon`` (>= 0), [`RANKME_EPS`][spectra.analysis.metrics.RANKME_EPS] by default.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64, named ``rankme``.

    References
    ----------
    Garrido, Q., Balestriero, R., Najman, L. & LeCun, Y. (2023). RankMe: Assessing the downstream performance
    of pretrained self-supervised representations by their rank. *ICML 2023*, PMLR 202, 10929-10974.

    Examples
    --------
    >>> import xarray as xr
    >>> round(float(rankme(xr.DataArray([2.0, 2.0, 2.0, 2.0], dims="sv"), eps=0.0)), 12)
    4.0
    """
    attrs = {
        "long_name": "RankMe: exponential of the entropy of the normalised singular values",
        "convention": f"p_k = s_k / sum_j s_j + eps with eps = {eps!r}, natural log",
        "formula": "exp(-sum_k p_k log p_k)",
        "reference": "Garrido, Balestriero, Najman & LeCun (2023), RankMe, ICML, PMLR 202, 10929-10974",
    }
    return _apply(sv, rankme_kernel, dim, "rankme", attrs, eps=eps)


def decay_exponent(
    sv: xr.DataArray,
    first: int = 1,
    last: int | None = None,
    rtol: float = CONDITION_RTOL,
    dim: str = "sv",
) -> xr.DataArray:
    r"""Spectral decay exponent ``alpha``: the slope of the spectrum on log-log axes, ``s_(i) ~ i^(-alpha)``.

    $$
    \log s_{(i)} = c - \alpha \log i, \qquad \text{fitted by least squares over }
    \{ i : \mathrm{first} \le i \le \mathrm{last},\ s_{(i)} > \mathrm{rtol}\, s_{(1)} \}
    $$

    The fit is on **singular values** (the eigenvalues ``s^2`` of ``X^T X`` decay with ``2 alpha``, the
    exponent of Agrawal et al. 2022 and Stringer et al. 2019), over **every rank** by default, with equal
    weights. Why the whole range: a head has only ``head_dim`` values (64 in the source documents), too few to
    set aside a head and a tail without the choice deciding the number, and the power law is a summary of the
    shape, not a claim that the spectrum is one. Ranks below the float32 rounding floor ``rtol * s_(1)`` are
    left out, since their logarithm is noise. Equal weights in ``i`` put most points in the tail (the ranks
    are dense there on a log axis), so ``alpha`` mostly describes how the tail falls; restrict ``first`` and
    ``last`` to study one part. Larger ``alpha`` means a faster decay, that is a more collapsed head; a flat
    spectrum has ``alpha = 0``.

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    first, last : int
        1-based, inclusive rank range; ``last=None`` is the whole spectrum.
    rtol : float
        Relative floor below which values are left out of the fit.
    dim : str
        Dimension holding the spectrum; it is reduced.

    Returns
    -------
    xarray.DataArray
        float64, named ``decay_exponent``; NaN where fewer than two ranks remain (a rank-one spectrum).

    References
    ----------
    Agrawal, K. K., Mondal, A. K., Ghosh, A. & Richards, B. A. (2022). alpha-ReQ: Assessing representation
    quality in self-supervised learning by measuring eigenspectrum decay. *NeurIPS 2022*.
    Stringer, C., Pachitariu, M., Steinmetz, N., Carandini, M. & Harris, K. D. (2019). High-dimensional
    geometry of population responses in visual cortex. *Nature* 571, 361-365.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> sv = xr.DataArray(np.arange(1, 65) ** -0.5, dims="sv")
    >>> round(float(decay_exponent(sv)), 12)
    0.5
    """
    range_text = f"ranks {first} to {'d' if last is None else last}"
    attrs = {
        "long_name": "spectral decay exponent alpha of the singular values, s_(i) ~ i^-alpha",
        "convention": (
            f"least squares of log s_(i) on log i, equal weights, {range_text}, "
            f"values <= {rtol!r} * s_(1) left out; eigenvalue exponent = 2 alpha"
        ),
        "formula": "-slope of log s_(i) against log i",
        "reference": "Agrawal et al. (2022), alpha-ReQ, NeurIPS; Stringer et al. (2019), Nature 571, 361-365",
    }
    return _apply(sv, decay_exponent_kernel, dim, "decay_exponent", attrs, first=first, last=last, rtol=rtol)


def compute(sv: xr.DataArray, name: str, dim: str = "sv", **kwargs: Any) -> xr.DataArray:
    """Compute a metric by name (the names used by the command line and the report).

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    name : str
        ``pr_sv``, ``pr_eig``, ``energy_rank_<pct>`` (for example ``energy_rank_90``; the threshold is in the
        name), ``condition_number``, ``effective_rank``, ``stable_rank``, ``rankme`` or ``decay_exponent``.
    dim : str
        Dimension holding the spectrum.
    **kwargs
        Passed on to the metric function (for example ``rtol=`` of
        [`condition_number`][spectra.analysis.metrics.condition_number]).

    Returns
    -------
    xarray.DataArray
        The metric, named ``name``.

    Examples
    --------
    >>> import xarray as xr
    >>> sv = xr.DataArray([4.0, 3.0, 2.0, 1.0], dims="sv")
    >>> float(compute(sv, "energy_rank_50"))
    1.0
    """
    if name == "pr_sv":
        out = participation_ratio(sv, convention="sv", dim=dim, **kwargs)
    elif name == "pr_eig":
        out = participation_ratio(sv, convention="eig", dim=dim, **kwargs)
    elif name == "condition_number":
        out = condition_number(sv, dim=dim, **kwargs)
    elif name == "effective_rank":
        out = effective_rank(sv, dim=dim, **kwargs)
    elif name == "stable_rank":
        out = stable_rank(sv, dim=dim, **kwargs)
    elif name == "rankme":
        out = rankme(sv, dim=dim, **kwargs)
    elif name == "decay_exponent":
        out = decay_exponent(sv, dim=dim, **kwargs)
    elif match := _ENERGY_RANK_NAME.fullmatch(name):
        pct = float(match.group(1))
        if not 0.0 < pct <= 100.0:
            raise SpectraError(f"metric {name!r}: the energy percentage must be in (0, 100]")
        out = energy_rank(sv, threshold=pct / 100.0, dim=dim, **kwargs)
    else:
        raise SpectraError(
            f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)} "
            "(energy_rank_<pct> for any percentage)"
        )
    return out.rename(name)


# --------------------------------------------------------------------------------------------------------
# Per-layer summary (used by `collapse-spectra metrics`)
# --------------------------------------------------------------------------------------------------------

_DEFAULT_SELECTION = {"site": "normed", "centering": "uncentered"}


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
    tokens = ds["tokens"]
    if "run" not in values.dims:  # a single cube
        label = str(ds.attrs.get("run_name", "run"))
        values = values.expand_dims(run=[label])
    if "run" not in tokens.dims:
        tokens = tokens.expand_dims(run=values["run"].values)
    values = values.transpose("run", "step", "layer", head_dim)
    tokens = tokens.transpose("run", "step")

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
    df = pd.concat([rows_layer, rows_all], ignore_index=True)
    tok = tokens.values.astype(np.float64)[df["_r"], df["_s"]]
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
    df["head_dim"] = int(da.sizes["sv"])
    df = df.reset_index(drop=True)
    df.attrs = {"metric": metric, "var": var, "site": site, "centering": centering}
    return df


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
