"""Effective-rank metrics of singular-value spectra, each named by its convention.

Three layers (as in xskillscore):

1. numpy kernels that reduce over ``axis=``, in [`kernels`][spectra.analysis.kernels]
   (``participation_ratio_sv``, ``participation_ratio_eig``, ``energy_rank_kernel``, ...);
2. here, public functions that take a labelled singular-value `xarray.DataArray` and reduce over
   ``dim="sv"`` (``participation_ratio``, ``energy_rank``, ``condition_number``, ``effective_rank``,
   ``stable_rank``, ``rankme``, ``decay_exponent``, and ``compute`` which dispatches by metric name);
3. the ``.spectra`` accessor in [`accessor`][spectra.analysis.accessor], which only forwards here.

A table of one metric per run, step and layer (what ``collapse-spectra metrics`` prints) is
[`summary_table`][spectra.analysis.summary.summary_table].

Conventions shared by every metric:

- the input is a spectrum of singular values ``s_i >= 0`` (not eigenvalues); its order does not matter,
  and where a definition needs the largest singular value it uses the maximum, not the first element;
- every metric is invariant to the scale of ``s`` (the kernels divide by ``max(s)`` first, which also keeps
  ``s**4`` far from overflow and underflow);
- an all-zero spectrum has no effective dimension: every metric returns NaN for it;
- NaN anywhere in a spectrum makes that spectrum's metric NaN (the ``unit`` read-out site is NaN for models
  without QK-norm, and an outer join of runs pads missing steps with NaN);
- negative singular values are an input error (`SpectraError`).

No I/O here, and no torch: a notebook reads cubes and computes every metric without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import xarray as xr

from spectra.analysis.kernels import (
    CONDITION_RTOL,
    RANKME_EPS,
    condition_number_kernel,
    decay_exponent_kernel,
    effective_rank_kernel,
    energy_rank_kernel,
    participation_ratio_eig,
    participation_ratio_sv,
    rankme_kernel,
    stable_rank_kernel,
)
from spectra.errors import SpectraError

__all__ = [
    "METRIC_NAMES",
    "compute",
    "condition_number",
    "decay_exponent",
    "effective_rank",
    "energy_rank",
    "participation_ratio",
    "rankme",
    "stable_rank",
]

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


_ENERGY_RANK_NAME = re.compile(r"energy_rank_(\d+(?:\.\d+)?)")


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
        floor of float32 activations (see [`CONDITION_RTOL`][spectra.analysis.kernels.CONDITION_RTOL]).
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
    ``d epsilon log(1/epsilon)`` relative (``1e-4`` at ``d = 64``; see [`RANKME_EPS`][spectra.analysis.kernels.RANKME_EPS]).

    Parameters
    ----------
    sv : xarray.DataArray
        Singular values along ``dim``.
    eps : float
        The additive constant ``epsilon`` (>= 0), [`RANKME_EPS`][spectra.analysis.kernels.RANKME_EPS] by default.
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
