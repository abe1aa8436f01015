"""Gamma vs importance (spectra.analysis.gamma): Spearman correlation on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from helpers import stack, synthetic_cube

from spectra.analysis import gamma as gm
from spectra.errors import SpectraError

D = 8
STEPS = (0, 10, 20)


def learned_gamma() -> np.ndarray:
    """(step, layer, dim): 1 at step 0 (initialisation), then distinct magnitudes, some negative."""
    g = np.ones((len(STEPS), 2, D))
    g[1:] = np.array([0.1, -0.4, 0.7, 1.0, -1.3, 1.6, 1.9, 2.2])
    return g


def test_energy_proportional_to_gamma_squared_gives_rho_one():
    g = learned_gamma()
    energy = 3.7 * g[:, :, None, :] ** 2 * np.ones((1, 1, 2, 1))  # (step, layer, kv_head, dim)
    res = gm.gamma_energy_correlation(synthetic_cube(gamma=g, energy=energy, steps=STEPS), site="unit")
    final = res.isel(run=0).sel(step=20)
    assert np.allclose(final["rho"].values, 1.0)
    assert (final["status"].values == gm.STATUS_OK).all()
    assert int(res["n"]) == D


def test_reversed_energy_gives_rho_minus_one():
    g = learned_gamma()
    energy = 1.0 / (g[:, :, None, :] ** 2) * np.ones((1, 1, 2, 1))
    res = gm.gamma_energy_correlation(synthetic_cube(gamma=g, energy=energy, steps=STEPS), site="unit")
    assert np.allclose(res["rho"].isel(run=0).sel(step=10).values, -1.0)


def test_rho_and_pvalue_match_scipy_per_head():
    rng = np.random.default_rng(3)
    g = learned_gamma()
    energy = rng.uniform(0.1, 2.0, size=(len(STEPS), 2, 2, D))
    res = gm.gamma_energy_correlation(synthetic_cube(gamma=g, energy=energy, steps=STEPS), site="unit")
    expected = scipy.stats.spearmanr(np.abs(g[2, 1]), energy[2, 1, 0])
    cell = res.isel(run=0).sel(step=20, layer=1, kv_head=0)
    assert float(cell["rho"]) == pytest.approx(expected.statistic)
    assert float(cell["pvalue"]) == pytest.approx(expected.pvalue)


def test_uses_absolute_gamma():
    g = learned_gamma()
    energy = np.abs(g)[:, :, None, :] * np.ones((1, 1, 2, 1))  # monotone in |gamma|, not in gamma
    res = gm.gamma_energy_correlation(synthetic_cube(gamma=g, energy=energy, steps=STEPS))
    assert np.allclose(res["rho"].isel(run=0).sel(step=20).values, 1.0)


def test_no_qk_norm_frozen_and_initial_gamma_are_statuses_not_errors():
    ds = stack(
        [
            synthetic_cube("learned", gamma=learned_gamma(), steps=STEPS),
            synthetic_cube("none", qk_norm="none", steps=STEPS),
            synthetic_cube("frozen", qk_norm="frozen", steps=STEPS),
        ]
    )
    res = gm.gamma_energy_correlation(ds, which="k", site="unit")
    status = res["status"]
    assert (status.sel(run="none").values == gm.STATUS_NO_QK_NORM).all()
    assert (status.sel(run="frozen").values == gm.STATUS_FROZEN).all()
    assert (status.sel(run="learned", step=0).values == gm.STATUS_CONSTANT).all()
    assert (status.sel(run="learned", step=20).values == gm.STATUS_OK).all()
    assert np.isnan(res["rho"].sel(run=["none", "frozen"]).values).all()
    assert np.isnan(res["rho"].sel(run="learned", step=0).values).all()
    # the normed site exists for models without QK-norm (= proj), but there is still no gamma
    normed = gm.gamma_energy_correlation(ds, site="normed")
    assert (normed["status"].sel(run="none").values == gm.STATUS_NO_QK_NORM).all()


def test_steps_a_run_lacks_are_marked_not_measured():
    ds = stack(
        [
            synthetic_cube("long", gamma=learned_gamma(), steps=STEPS),
            synthetic_cube("short", gamma=learned_gamma()[:2], steps=STEPS[:2]),
        ]
    )
    res = gm.gamma_energy_correlation(ds)
    assert (res["status"].sel(run="short", step=20).values == gm.STATUS_NOT_MEASURED).all()
    table = gm.correlation_table(res, ds)
    assert len(table[table["run"] == "short"]) == 2 * 2 * 2  # steps 0 and 10, 2 layers, 2 kv heads
    assert len(table[table["run"] == "long"]) == 3 * 2 * 2


def test_normed_site_is_biased_toward_positive_correlation():
    # energy before gamma is unrelated to gamma; after gamma it contains gamma^2 and correlates
    rng = np.random.default_rng(0)
    g = learned_gamma()
    energy = rng.uniform(0.9, 1.1, size=(len(STEPS), 2, 2, D))
    ds = synthetic_cube(gamma=g, energy=energy, steps=STEPS)
    unit = gm.gamma_energy_correlation(ds, site="unit")["rho"].sel(step=20).values
    normed = gm.gamma_energy_correlation(ds, site="normed")["rho"].sel(step=20).values
    assert np.all(normed > 0.9)
    assert np.mean(normed) > np.mean(unit) + 0.5


def test_queries_are_correlated_per_query_head():
    g = learned_gamma()
    energy = g[:, :, None, :] ** 2 * np.ones((1, 1, 2, 1))
    res = gm.gamma_energy_correlation(synthetic_cube(gamma=g, energy=energy, steps=STEPS), which="q")
    assert "head" in res.dims and "kv_head" not in res.dims
    assert np.allclose(res["rho"].isel(run=0).sel(step=20).values, 1.0)
    table = gm.correlation_table(res, synthetic_cube(gamma=g, energy=energy, steps=STEPS))
    assert set(table["which"]) == {"q"} and table["head"].max() == 3


def test_layer_summary_at_final_checkpoint():
    g = learned_gamma()
    energy = g[:, :, None, :] ** 2 * np.ones((1, 1, 2, 1))
    ds = stack(
        [
            synthetic_cube("a1", gamma=g, energy=energy, steps=STEPS),
            synthetic_cube("a2", qk_norm="none", steps=STEPS),
        ]
    )
    summary = gm.layer_summary(gm.gamma_energy_correlation(ds), ds).set_index(["run", "layer"])
    assert summary.loc[("a1", 0), "median_rho"] == pytest.approx(1.0)
    assert summary.loc[("a1", 0), "n_significant"] == 2  # rho = 1 with n = 8: p ~ 0
    assert summary.loc[("a1", 0), "step"] == 20
    assert summary.loc[("a2", 1), "status"] == gm.STATUS_NO_QK_NORM
    assert np.isnan(summary.loc[("a2", 1), "median_rho"])


def test_gamma_points_only_for_varying_gamma():
    ds = stack(
        [
            synthetic_cube("a1", gamma=learned_gamma(), steps=STEPS),
            synthetic_cube("a2", qk_norm="none", steps=STEPS),
            synthetic_cube("fz", qk_norm="frozen", steps=STEPS),
        ]
    )
    pts = gm.gamma_points(ds)
    assert set(pts["run"]) == {"a1"}
    assert len(pts) == 2 * 2 * D
    sums = pts.groupby(["layer", "head"])["energy_fraction"].sum()
    assert np.allclose(sums, 1.0)
    assert np.allclose(sorted(pts["abs_gamma"].unique()), sorted(np.abs(learned_gamma()[2, 0])))
    assert gm.gamma_points(ds, run="a2").empty


def test_bad_site_and_missing_variables_raise():
    ds = synthetic_cube(steps=STEPS)
    with pytest.raises(SpectraError, match="gamma analysis site"):
        gm.gamma_energy_correlation(ds, site="rope")
    with pytest.raises(SpectraError, match="lacks 'k_energy'"):
        gm.gamma_energy_correlation(ds.drop_vars("k_energy"))
    with pytest.raises(SpectraError, match="run 'zz' not found"):
        gm.gamma_points(ds, run="zz")


def test_spearman_rows_kernel_handles_constant_and_nan_rows():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, np.nan, 2.0]])
    y = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rho, p = gm.spearman_rows(x, y)
    assert rho[0] == pytest.approx(-1.0)
    assert np.isnan(rho[1:]).all() and np.isnan(p[1:]).all()
    with pytest.raises(SpectraError, match="same shape"):
        gm.spearman_rows(x, y[:, :2])


def test_frozen_k_freezes_the_key_gain_only():
    ds = stack([synthetic_cube("fk", qk_norm="frozen_k", gamma=np.ones((len(STEPS), 2, 8)), steps=STEPS)])
    assert (gm.gamma_energy_correlation(ds, which="k")["status"].values == gm.STATUS_FROZEN).all()
    # the query gain of a frozen_k run is learned: a constant one is merely constant (an untrained checkpoint)
    assert (gm.gamma_energy_correlation(ds, which="q")["status"].values == gm.STATUS_CONSTANT).all()
