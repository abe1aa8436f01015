"""The Gaussian null baseline: the closed form it must agree with, its cache and seed, and its tables."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import xarray as xr
from helpers import stack, synthetic_cube

from spectra.analysis import null, stats
from spectra.analysis.metrics import participation_ratio
from spectra.analysis.null import fraction_of_null, headline_with_null, null_metric, null_spectra, null_values
from spectra.errors import SpectraError


def eig_pr_ratio_of_expectations(n: int, d: int) -> float:
    """(E tr C)^2 ... : E (tr C)^2 / E tr C^2 = (N D + 2) / (N + D + 1) for C = X^T X, X Gaussian N x D."""
    return (n * d + 2) / (n + d + 1)


@pytest.mark.parametrize(("n", "d"), [(72, 8), (256, 16), (64, 64)])
def test_eigenvalue_pr_agrees_with_the_wishart_closed_form(n: int, d: int) -> None:
    value = null_metric(n, d, "pr_eig", draws=400)
    # the mean of the ratio differs from the ratio of the means by O(1 / (N D)); allow that plus 4 standard errors
    assert value.mean == pytest.approx(eig_pr_ratio_of_expectations(n, d), abs=4 * value.se + 2.0 / d)
    assert value.se == pytest.approx(value.sd / np.sqrt(400))


def test_centering_removes_one_token_of_freedom() -> None:
    # the centred Gaussian N x D matrix has the spectrum of an uncentred (N - 1) x D one
    centred = null_metric(40, 16, "pr_eig", centering="centered", draws=400)
    assert centred.mean == pytest.approx(eig_pr_ratio_of_expectations(39, 16), abs=4 * centred.se + 0.1)
    assert centred.mean < null_metric(40, 16, "pr_eig", draws=400).mean


def test_large_n_approaches_every_metrics_flat_value() -> None:
    d, n = 8, 20_000
    for metric in ("pr_sv", "pr_eig", "effective_rank"):  # their deficits are of order D / N = 4e-4 of D
        assert null_metric(n, d, metric, draws=20).mean == pytest.approx(d, rel=0.01), metric
    # The extreme singular values converge slowly: E s_1 <= sqrt(N) + sqrt(D) and E s_D >= sqrt(N) - sqrt(D)
    # (Gordon's inequality), reached as N / D grows (Yin, Bai & Krishnaiah 1988). Below, 4 standard errors of the
    # 20 draws' mean are the sampling allowance.
    root_n, root_d = np.sqrt(n), np.sqrt(d)
    # stable rank ||X||_F^2 / s_1^2: at most D, and, with ||X||_F^2 concentrated at N D (relative sd 0.004) and
    # E s_1^2 <= (sqrt(N) + sqrt(D))^2 + 1 (s_1 is 1-Lipschitz: variance <= 1), at least N D over that (Jensen)
    stable = null_metric(n, d, "stable_rank", draws=20)
    assert n * d / ((root_n + root_d) ** 2 + 1) - 4 * stable.se <= stable.mean <= d
    # decay exponent: minus the least-squares slope of log s_(i) on x = log i, >= 0 for a descending spectrum, and
    # at most R sum|x - mean x| / (2 sum (x - mean x)^2) for a log range R = log(s_1 / s_D), whose mean is at most
    # log((sqrt(N) + sqrt(D)) / (sqrt(N) - sqrt(D))) (+ 1 / (sqrt(N) - sqrt(D))^2, Jensen for the log of s_D)
    x = np.log(np.arange(1, d + 1))
    steepest = np.abs(x - x.mean()).sum() / (2 * ((x - x.mean()) ** 2).sum())  # 0.63 for D = 8
    log_range = np.log((root_n + root_d) / (root_n - root_d)) + 1 / (root_n - root_d) ** 2
    decay = null_metric(n, d, "decay_exponent", draws=20)
    assert 0 <= decay.mean <= steepest * log_range + 4 * decay.se  # 0.026 + 4 se


def test_draws_are_seeded_and_cached() -> None:
    null._cached_spectra.cache_clear()
    a = null_spectra(50, 8, draws=10, seed=3)
    b = null_spectra(50, 8, draws=10, seed=3)
    assert a is b and null._cached_spectra.cache_info().hits == 1  # simulated once
    assert not a.flags.writeable
    fresh = np.linalg.svd(np.random.default_rng(3).standard_normal((10, 50, 8)), compute_uv=False)
    np.testing.assert_array_equal(a, fresh)  # exactly the documented recipe
    assert not np.array_equal(a, null_spectra(50, 8, draws=10, seed=4))


def test_fewer_tokens_than_dimensions_pad_with_zeros() -> None:
    s = null_spectra(5, 8, draws=3)
    assert s.shape == (3, 8) and (s[:, 5:] == 0).all() and (s[:, :5] > 0).all()
    assert null_metric(5, 8, "pr_eig", draws=50).mean < 5


def test_bad_shapes_are_refused() -> None:
    bad = (
        {"n_tokens": 0, "head_dim": 8},
        {"n_tokens": 8, "head_dim": 2.5},
        {"n_tokens": True, "head_dim": 8},
    )
    for kwargs in bad:
        with pytest.raises(SpectraError, match="positive integer"):
            null_spectra(**kwargs)
    with pytest.raises(SpectraError, match="at least 2"):
        null_spectra(8, 8, draws=1)
    with pytest.raises(SpectraError, match="centering"):
        null_spectra(8, 8, centering="both")
    with pytest.raises(SpectraError, match="undefined"):
        null_metric(1, 8, "decay_exponent", draws=5)  # rank one: no slope in any draw


def test_null_values_and_fraction_follow_each_runs_n_tokens() -> None:
    a, b = synthetic_cube("A1-s0"), synthetic_cube("B1-s0", optimizer="adamw")
    b.attrs["n_tokens"] = 16
    ds = stack([a, b])
    nulls = null_values(ds, "pr_sv")
    assert nulls.dims == ("run",) and nulls.attrs["head_dim"] == 8
    assert nulls.sel(run="A1-s0") == null_metric(128, 8, "pr_sv").mean
    assert nulls.sel(run="B1-s0") == null_metric(16, 8, "pr_sv").mean
    pr = participation_ratio(ds.k_sv.sel(site="normed", centering="uncentered"))  # every head has PR 4
    fraction = fraction_of_null(pr, ds, "pr_sv")
    assert fraction.dims == pr.dims
    np.testing.assert_allclose(fraction.sel(run="B1-s0").values, 4.0 / nulls.sel(run="B1-s0").values)
    single = fraction_of_null(pr.sel(run="A1-s0"), a, "pr_sv")
    np.testing.assert_allclose(single.values, fraction.sel(run="A1-s0").values)
    with pytest.raises(SpectraError, match="activation spectrum"):
        null_values(ds, var="wk_sv")
    del a.attrs["n_tokens"]
    with pytest.raises(SpectraError, match="no n_tokens"):
        null_values(a)


def test_headline_with_null_divides_mean_and_interval() -> None:
    ds = stack([synthetic_cube("A1-s0", rank=4.0), synthetic_cube("A2-s0", qk_norm="none", rank=6.0)])
    for convention, centering in (("sv", "uncentered"), ("eig", "centered")):
        summaries = stats.run_summaries(ds, convention=convention, centering=centering, n_resamples=200)
        table = headline_with_null(summaries, ds)
        expected = null_metric(128, 8, f"pr_{convention}", centering=centering)
        assert (table["null_mean"] == expected.mean).all() and (table["n_tokens"] == 128).all()
        np.testing.assert_allclose(table["fraction_of_null"], table["mean"] / expected.mean)
        np.testing.assert_allclose(table["fraction_ci_low"], table["ci_low"] / expected.mean)
        assert table["run"].tolist() == ["A1-s0", "A2-s0"]


def test_docstring_examples_run() -> None:
    result = doctest.testmod(null, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_labelled_metrics_of_the_null_match_the_kernel() -> None:
    s = null_spectra(30, 8, draws=5)
    pr = participation_ratio(xr.DataArray(s, dims=("draw", "sv")))
    assert null_metric(30, 8, "pr_sv", draws=5).mean == pytest.approx(float(pr.mean()))
