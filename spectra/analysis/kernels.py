"""Layer 1 of the metrics: numpy kernels that reduce a singular-value spectrum over ``axis=``.

``participation_ratio_sv``, ``participation_ratio_eig``, ``energy_rank_kernel``, ``condition_number_kernel``,
``effective_rank_kernel``, ``stable_rank_kernel``, ``rankme_kernel``, ``decay_exponent_kernel``: plain arrays in,
float64 arrays out, each with its formula and reference. The labelled functions of
[`metrics`][spectra.analysis.metrics] apply them over ``dim="sv"``; the conventions every metric shares (scale
invariance, NaN for all-zero or NaN spectra, negative values refused) are stated there and enforced here, by
:func:`_unit_max`, which every kernel calls first.

For ``k`` spectra of ``d`` values every kernel costs O(k d) (energy rank O(k d log d) for the sort). No torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import entr

from spectra.errors import SpectraError

__all__ = [
    "CONDITION_RTOL",
    "ENERGY_RTOL",
    "RANKME_EPS",
    "condition_number_kernel",
    "decay_exponent_kernel",
    "effective_rank_kernel",
    "energy_rank_kernel",
    "participation_ratio_eig",
    "participation_ratio_sv",
    "rankme_kernel",
    "stable_rank_kernel",
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

RANKME_EPS = 1e-7
"""The constant ``epsilon`` that RankMe adds to every normalised singular value (Garrido et al. 2023, eq. 1).

It keeps ``log p`` finite for zero singular values in their implementation; with ``epsilon = 0`` RankMe is
exactly the entropy effective rank of Roy & Vetterli. Adding ``epsilon`` changes the entropy by about
``-epsilon sum_k (log p_k + 1)``, at most ``d epsilon log(1/epsilon)``, so the two differ by less than that
relative: ``1e-4`` for spectra of 64 values, and about ``3e-5`` in practice (``d epsilon log d``)."""


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
        [`participation_ratio_sv`][spectra.analysis.kernels.participation_ratio_sv] of the same spectrum.

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
    slack of [`ENERGY_RTOL`][spectra.analysis.kernels.ENERGY_RTOL] keeps exact ties at the threshold from rounding up.

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
        [`CONDITION_RTOL`][spectra.analysis.kernels.CONDITION_RTOL] for the default). ``None`` uses the plain smallest
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

    The entropy effective rank ([`effective_rank_kernel`][spectra.analysis.kernels.effective_rank_kernel]) with the
    published constant ``eps`` added to every normalised singular value, as in the RankMe paper; ``eps = 0``
    gives the effective rank exactly.

    Parameters
    ----------
    s : array_like
        Singular values (>= 0) along ``axis``.
    eps : float
        The additive constant, >= 0; [`RANKME_EPS`][spectra.analysis.kernels.RANKME_EPS] (``1e-7``) by default.
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
        [`CONDITION_RTOL`][spectra.analysis.kernels.CONDITION_RTOL]), or ``-inf`` for exact zeros.
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
