"""Effective-rank metrics: closed forms, an independent route through numpy.linalg, invariances, NaN policy,
the labelled wrappers, the accessor, and the no-torch import contract."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import spectra
from spectra.analysis import accessor, kernels, metrics, summary
from spectra.analysis.kernels import (
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

KERNELS = {
    "pr_sv": participation_ratio_sv,
    "pr_eig": participation_ratio_eig,
    "energy_rank_90": energy_rank_kernel,
    "condition_number": condition_number_kernel,
    "effective_rank": effective_rank_kernel,
    "stable_rank": stable_rank_kernel,
    "rankme": rankme_kernel,
    "decay_exponent": decay_exponent_kernel,
}


# --------------------------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 7, 10, 64])
def test_identity_matrix_has_every_rank_equal_to_d(d: int) -> None:
    s = np.linalg.svd(np.eye(d), compute_uv=False)
    assert participation_ratio_sv(s) == pytest.approx(d, rel=1e-12)
    assert participation_ratio_eig(s) == pytest.approx(d, rel=1e-12)
    assert effective_rank_kernel(s) == pytest.approx(d, rel=1e-12)
    assert stable_rank_kernel(s) == pytest.approx(d, rel=1e-12)
    assert condition_number_kernel(s) == pytest.approx(1.0, rel=1e-12)
    # the smallest r with r / d >= 0.9: the tie at d = 10 (9 / 10 exactly) must not round up to 10
    assert energy_rank_kernel(s, threshold=0.9) == int(np.ceil(0.9 * d - 1e-9))


def test_rank_one_matrix_has_every_rank_equal_to_one() -> None:
    rng = np.random.default_rng(0)
    x = np.outer(rng.standard_normal(50), rng.standard_normal(16))  # (N, D), rank one
    s = np.linalg.svd(x, compute_uv=False)  # s_2.. are rounding noise ~1e-15 s_1
    for kernel in (
        participation_ratio_sv,
        participation_ratio_eig,
        effective_rank_kernel,
        stable_rank_kernel,
    ):
        assert kernel(s) == pytest.approx(1.0, abs=1e-9), kernel.__name__
    assert energy_rank_kernel(s, threshold=0.9) == 1
    assert energy_rank_kernel(s, threshold=1.0) == 1
    assert condition_number_kernel(s) == 1.0  # the noise is below rtol * s_1
    assert condition_number_kernel(s, rtol=None) > 1e12  # the source formula s_1 / s_d sees the noise
    exact = np.array([5.0, 0.0, 0.0, 0.0])
    for name, kernel in KERNELS.items():
        if name not in ("rankme", "decay_exponent"):
            assert kernel(exact) == 1.0, name
    # RankMe adds eps to every p_k: p = (1 + eps, eps, eps, eps), and exp of its entropy in closed form
    eps = RANKME_EPS
    entropy = -(1 + eps) * np.log(1 + eps) - 3 * eps * np.log(eps)
    assert rankme_kernel(exact) == pytest.approx(np.exp(entropy), rel=1e-14)
    assert rankme_kernel(exact, eps=0.0) == 1.0
    assert np.isnan(decay_exponent_kernel(exact))  # one value above the floor: no slope to fit


def test_energy_rank_of_a_known_spectrum() -> None:
    s = np.array([1.0, 4.0, 2.0, 3.0])  # energies 1, 16, 4, 9 of 30; sorted: 16, 25, 29, 30 cumulative
    expected = {0.5: 1, 0.53: 1, 0.54: 2, 0.8: 2, 25 / 30: 2, 0.9: 3, 29 / 30: 3, 0.97: 4, 1.0: 4}
    for threshold, rank in expected.items():
        assert energy_rank_kernel(s, threshold=threshold) == rank, threshold
    # a threshold equal to an energy fraction written by hand is reached there, although the kernel's
    # cumulative sum of normalised energies lands one ulp below it (81/184: 0.44021739130434784 by hand)
    assert energy_rank_kernel([9.0, 3.0, 3.0, 7.0, 6.0], threshold=81 / 184) == 1
    assert energy_rank_kernel([4.0, 9.0, 6.0, 9.0, 1.0, 5.0, 8.0, 7.0], threshold=226 / 353) == 3


def test_worked_example_of_the_docs() -> None:
    s = np.array([1.0, 1.0, 0.1])
    assert participation_ratio_sv(s) == pytest.approx(2.1**2 / 2.01, rel=1e-14)
    assert participation_ratio_eig(s) == pytest.approx(2.01**2 / 2.0001, rel=1e-14)
    p = s / s.sum()
    assert effective_rank_kernel(s) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-14)
    assert stable_rank_kernel(s) == pytest.approx(2.01, rel=1e-14)
    assert condition_number_kernel(s) == pytest.approx(10.0, rel=1e-14)
    assert energy_rank_kernel(s) == 2
    # one dominant direction over a flat tail: the two conventions disagree by a factor of ten
    tail = np.r_[1.0, np.full(63, 0.1)]
    assert participation_ratio_sv(tail) == pytest.approx(7.3**2 / 1.63, rel=1e-12)
    assert participation_ratio_eig(tail) == pytest.approx(1.63**2 / 1.0063, rel=1e-12)


@pytest.mark.parametrize("d", [2, 8, 64])
def test_rankme_closed_forms_and_its_equality_with_the_effective_rank(d: int) -> None:
    eps = RANKME_EPS
    flat = np.ones(d)  # p_k = 1/d + eps for every k
    expected = np.exp(-d * (1 / d + eps) * np.log(1 / d + eps))
    assert rankme_kernel(flat) == pytest.approx(expected, rel=1e-14)
    assert rankme_kernel(flat, eps=0.0) == pytest.approx(d, rel=1e-14)
    s = np.abs(np.random.default_rng(d).standard_normal((50, d)))
    np.testing.assert_allclose(rankme_kernel(s, eps=0.0), effective_rank_kernel(s), rtol=1e-14)
    bound = d * eps * np.log(1 / eps)  # what RANKME_EPS promises
    np.testing.assert_allclose(rankme_kernel(s), effective_rank_kernel(s), rtol=bound)
    with pytest.raises(SpectraError, match="eps"):
        rankme_kernel(s, eps=-1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
def test_decay_exponent_recovers_a_power_law(alpha: float) -> None:
    i = np.arange(1, 65, dtype=np.float64)
    s = 3.0 * i**-alpha
    assert decay_exponent_kernel(s) == pytest.approx(alpha, abs=1e-12)
    assert decay_exponent_kernel(s, first=5, last=40) == pytest.approx(alpha, abs=1e-12)
    # a power law of the eigenvalues s^2 has twice the exponent of the singular values
    assert decay_exponent_kernel(np.sqrt(s)) == pytest.approx(alpha / 2, abs=1e-12)


def test_decay_exponent_fits_only_the_chosen_ranks_above_the_floor() -> None:
    i = np.arange(1, 33, dtype=np.float64)
    broken = np.where(i <= 8, i**-0.5, 8**-0.5 * (i / 8) ** -2.0)  # a knee at rank 8
    assert decay_exponent_kernel(broken, first=1, last=8) == pytest.approx(0.5, abs=1e-12)
    assert decay_exponent_kernel(broken, first=8, last=32) == pytest.approx(2.0, abs=1e-12)
    x, y = np.log(i), np.log(broken)  # the whole range: one ordinary least-squares line through all 32 ranks
    assert decay_exponent_kernel(broken) == pytest.approx(-np.polyfit(x, y, 1)[0], rel=1e-12)
    # zeros and values below rtol * s_1 are left out instead of pulling the slope to -inf
    padded = np.r_[i[:16] ** -1.0, np.zeros(8), np.full(8, 1e-9)]
    assert decay_exponent_kernel(padded) == pytest.approx(1.0, abs=1e-12)
    assert decay_exponent_kernel(padded, rtol=0.0) > 1.0  # the 1e-9 values now count
    assert np.isnan(decay_exponent_kernel([1.0, 1e-8, 0.0]))  # one value above the floor
    for first, last in ((0, 8), (8, 8), (1, 33)):
        with pytest.raises(SpectraError, match="rank range"):
            decay_exponent_kernel(i, first=first, last=last)


def test_condition_number_tolerance() -> None:
    assert condition_number_kernel([10.0, 2.0, 0.0]) == 5.0
    assert condition_number_kernel([10.0, 2.0, 0.0], rtol=None) == np.inf
    assert condition_number_kernel([10.0, 2.0, 1e-9]) == 5.0  # 1e-10 relative: below the float32 floor
    assert condition_number_kernel([10.0, 2.0, 1e-9], rtol=0.0) == pytest.approx(1e10)
    assert condition_number_kernel([10.0, 2.0, 1e-4], rtol=1e-6) == pytest.approx(1e5)
    assert condition_number_kernel([10.0, 2.0, 1e-4], rtol=0.1) == 5.0


# --------------------------------------------------------------------------------------------------------
# agreement with numpy.linalg on random matrices, through an independent route
# --------------------------------------------------------------------------------------------------------


def _random_matrices(rng: np.random.Generator, n: int, rows: int, cols: int) -> np.ndarray:
    scales = np.exp(rng.normal(0.0, 1.5, (n, 1, cols)))  # anisotropic columns: spectra far from flat
    return rng.standard_normal((n, rows, cols)) * scales  # (n, N, D)


@pytest.mark.parametrize(("rows", "cols"), [(200, 16), (40, 64), (64, 64)])
def test_kernels_agree_with_direct_matrix_formulas(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows * cols)
    for x in _random_matrices(rng, 5, rows, cols):
        s = np.linalg.svd(x, compute_uv=False)
        gram = x.T @ x  # C = X^T X, eigenvalues s^2
        # the non-zero eigenvalues of X^T X are those of the smaller Gram matrix; taking it avoids the square
        # roots of rounding noise that a rank-deficient X^T X would add; descending, independent of the SVD
        small = gram if rows >= cols else x @ x.T
        lam = np.clip(np.linalg.eigvalsh(small)[::-1], 0.0, None)
        fro2 = np.sum(x * x)
        assert participation_ratio_eig(s) == pytest.approx(
            np.trace(gram) ** 2 / np.trace(gram @ gram), rel=1e-10
        )
        assert participation_ratio_sv(s) == pytest.approx(np.linalg.norm(x, "nuc") ** 2 / fro2, rel=1e-10)
        assert stable_rank_kernel(s) == pytest.approx(fro2 / np.linalg.norm(x, 2) ** 2, rel=1e-10)
        assert condition_number_kernel(s, rtol=None) == pytest.approx(np.linalg.cond(x), rel=1e-8)
        sv = np.sqrt(lam)
        p = sv / sv.sum()
        assert effective_rank_kernel(s) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-8)
        cumulative = np.cumsum(lam) / lam.sum()
        for threshold in (0.5, 0.9, 0.99):
            assert energy_rank_kernel(s, threshold=threshold) == 1 + np.searchsorted(cumulative, threshold)


def test_ordering_between_metrics_holds_for_any_spectrum() -> None:
    """stable rank <= PR_eig <= PR_sv <= effective rank <= number of non-zero values (see docs/metrics.md)."""
    rng = np.random.default_rng(1)
    s = np.exp(rng.normal(0.0, rng.uniform(0.01, 4.0, (2000, 1)), (2000, 32)))  # (batch, d), flat to spiky
    s[::7, 20:] = 0.0  # some rank-deficient spectra
    kernels = (stable_rank_kernel, participation_ratio_eig, participation_ratio_sv, effective_rank_kernel)
    srank, pr_eig, pr_sv, erank = (kernel(s, axis=-1) for kernel in kernels)
    slack = 1 + 1e-12
    assert np.all(srank <= pr_eig * slack)
    assert np.all(pr_eig <= pr_sv * slack)
    assert np.all(pr_sv <= erank * slack)
    assert np.all(erank <= np.count_nonzero(s, axis=-1) * slack)
    assert np.all(srank >= 1 / slack)


# --------------------------------------------------------------------------------------------------------
# invariances, axes, NaN policy, bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KERNELS))
def test_order_and_scale_invariance(name: str) -> None:
    kernel = KERNELS[name]
    rng = np.random.default_rng(2)
    s = np.abs(rng.standard_normal((6, 12))) ** 3  # (batch, d)
    reference = kernel(s, axis=-1)
    shuffled = rng.permuted(s, axis=-1)
    np.testing.assert_allclose(kernel(shuffled, axis=-1), reference, rtol=1e-12)
    np.testing.assert_allclose(kernel(s[:, ::-1], axis=-1), reference, rtol=1e-12)
    for scale in (1e-150, 1e-30, 7.0, 1e30, 1e150):  # s**4 would under/overflow without normalisation
        np.testing.assert_allclose(kernel(s * scale, axis=-1), reference, rtol=1e-12)
    # the spectrum on another axis gives the same values
    np.testing.assert_allclose(kernel(s.T, axis=0), reference, rtol=1e-12)
    np.testing.assert_allclose(kernel(s[:, None, :].repeat(3, 1), axis=-1), reference[:, None].repeat(3, 1))


@pytest.mark.parametrize("name", list(KERNELS))
def test_nan_and_all_zero_spectra_give_nan_without_touching_others(name: str) -> None:
    kernel = KERNELS[name]
    s = np.array([[3.0, 2.0, 1.0], [np.nan, np.nan, np.nan], [3.0, np.nan, 1.0], [0.0, 0.0, 0.0]])
    with np.errstate(all="raise"):  # no floating-point warnings leak out
        out = kernel(s, axis=-1)
    assert np.isfinite(out[0])
    assert np.isnan(out[1:]).all()
    assert out[0] == kernel(s[0])


def test_bad_input_raises_spectra_error() -> None:
    with pytest.raises(SpectraError, match="negative singular values"):
        participation_ratio_sv([1.0, -0.5])
    with pytest.raises(SpectraError, match="empty spectrum"):
        stable_rank_kernel(np.zeros((3, 0)))
    with pytest.raises(SpectraError, match="scalar"):
        effective_rank_kernel(1.0)
    for threshold in (0.0, -0.1, 1.5):
        with pytest.raises(SpectraError, match="threshold"):
            energy_rank_kernel([1.0], threshold=threshold)
    for rtol in (-1e-3, 1.0):
        with pytest.raises(SpectraError, match="rtol"):
            condition_number_kernel([1.0], rtol=rtol)


# --------------------------------------------------------------------------------------------------------
# labelled functions
# --------------------------------------------------------------------------------------------------------


def _labelled(rng: np.random.Generator) -> xr.DataArray:
    """(step, layer, kv_head, sv) spectra with a non-dimension coordinate on step, like a cube's k_sv."""
    s = np.sort(np.abs(rng.standard_normal((3, 2, 4, 8))), axis=-1)[..., ::-1]
    return xr.DataArray(
        s,
        dims=("step", "layer", "kv_head", "sv"),
        coords={
            "step": [0, 10, 20],
            "tokens": ("step", [0, 5120, 10240]),
            "layer": [0, 1],
            "sv": np.arange(8),
        },
        name="k_sv",
        attrs={"long_name": "key singular values", "units": "activation units"},
    )


FUNCTIONS = {
    "pr_sv": (
        lambda da, **kw: metrics.participation_ratio(da, convention="sv", **kw),
        participation_ratio_sv,
    ),
    "pr_eig": (
        lambda da, **kw: metrics.participation_ratio(da, convention="eig", **kw),
        participation_ratio_eig,
    ),
    "energy_rank_90": (metrics.energy_rank, energy_rank_kernel),
    "condition_number": (metrics.condition_number, condition_number_kernel),
    "effective_rank": (metrics.effective_rank, effective_rank_kernel),
    "stable_rank": (metrics.stable_rank, stable_rank_kernel),
    "rankme": (metrics.rankme, rankme_kernel),
    "decay_exponent": (metrics.decay_exponent, decay_exponent_kernel),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_labelled_functions_keep_other_dims_coords_and_describe_themselves(name: str) -> None:
    function, kernel = FUNCTIONS[name]
    da = _labelled(np.random.default_rng(3))
    out = function(da)
    assert out.name == name
    assert out.dims == ("step", "layer", "kv_head")
    assert out["tokens"].values.tolist() == [0, 5120, 10240] and "sv" not in out.coords
    np.testing.assert_array_equal(out.values, kernel(da.values, axis=-1))
    assert out.attrs["units"] == "1" and out.attrs["input"] == "k_sv"
    for key in ("long_name", "convention", "formula", "reference"):
        assert out.attrs[key], key
    # the spectrum dimension need not be last, and may have another name
    moved = da.transpose("sv", "kv_head", "step", "layer").rename(sv="singular")
    xr.testing.assert_allclose(function(moved, dim="singular").transpose(*out.dims), out)
    np.testing.assert_array_equal(metrics.compute(da, name).values, out.values)


def test_labelled_functions_report_bad_dims_and_types() -> None:
    da = _labelled(np.random.default_rng(4))
    with pytest.raises(SpectraError, match="no dimension 'dim'.*'step', 'layer', 'kv_head', 'sv'"):
        metrics.stable_rank(da, dim="dim")
    with pytest.raises(SpectraError, match="DataArray"):
        metrics.stable_rank(da.values)
    with pytest.raises(SpectraError, match="convention"):
        metrics.participation_ratio(da, convention="eigen")


def test_compute_dispatches_by_name() -> None:
    da = _labelled(np.random.default_rng(5))
    out = metrics.compute(da, "energy_rank_99.5")
    assert out.name == "energy_rank_99.5"
    np.testing.assert_array_equal(out.values, energy_rank_kernel(da.values, threshold=0.995))
    assert metrics.energy_rank(da).name == "energy_rank_90"
    np.testing.assert_array_equal(
        metrics.compute(da, "condition_number", rtol=None).values,
        condition_number_kernel(da.values, rtol=None),
    )
    for bad in ("pr", "energy_rank_0", "energy_rank_101", "energy_rank_x"):
        with pytest.raises(SpectraError, match="metric"):
            metrics.compute(da, bad)


# --------------------------------------------------------------------------------------------------------
# accessor, package surface, docstrings
# --------------------------------------------------------------------------------------------------------


def test_accessor_forwards_and_holds_no_state() -> None:
    da = _labelled(np.random.default_rng(6))
    ds = da.to_dataset().assign(wk_sv=da * 2.0)
    assert vars(da.spectra) == {"_obj": da} and vars(ds.spectra) == {"_obj": ds}
    calls = {
        "participation_ratio": {"convention": "eig"},
        "energy_rank": {"threshold": 0.8},
        "condition_number": {"rtol": 1e-3},
        "effective_rank": {},
        "stable_rank": {},
        "rankme": {"eps": 0.0},
        "decay_exponent": {"first": 2, "last": 6},
    }
    for method, kwargs in calls.items():
        expected = getattr(metrics, method)(da, **kwargs)
        xr.testing.assert_identical(getattr(da.spectra, method)(**kwargs), expected)
        xr.testing.assert_identical(getattr(ds.spectra, method)(var="k_sv", **kwargs), expected)
    xr.testing.assert_identical(da.spectra.compute("pr_eig"), metrics.compute(da, "pr_eig"))
    xr.testing.assert_identical(
        ds.spectra.compute("pr_eig", var="wk_sv"), metrics.compute(ds.wk_sv, "pr_eig")
    )
    with pytest.raises(SpectraError, match="no variable 'q_sv'"):
        ds.spectra.stable_rank(var="q_sv")


def test_package_exports_and_lazy_extract() -> None:
    names = (
        "open_cube open_cubes participation_ratio energy_rank condition_number effective_rank stable_rank "
        "rankme decay_exponent"
    )
    for name in [*names.split(), "compute", "summary_table", "SpectraError"]:
        assert callable(getattr(spectra, name)), name
    assert spectra.participation_ratio is metrics.participation_ratio
    assert "extract" in dir(spectra) and "extract" in spectra.__all__
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        spectra.nonexistent  # noqa: B018


def test_import_spectra_does_not_import_torch() -> None:
    code = (
        "import sys, spectra, spectra.analysis.metrics, spectra.analysis.accessor, spectra.cube; "
        "import xarray as xr; xr.DataArray([1.0], dims='sv').spectra.stable_rank(); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# the doctests of the metrics (kernels, labelled functions, summary table) and of the accessor
@pytest.mark.parametrize("module", [kernels, metrics, summary, accessor])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
