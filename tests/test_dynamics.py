"""Phase detection: piecewise-linear fits on constructed series with known breakpoints, the sudden and plateau
rules, and the tables over cubes with many checkpoints (the dense trajectories of `train.milestones = "log"`)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.optimize
from helpers import CENTERINGS, SITES, make_cube, stack

from spectra.analysis import checkpoints, piecewise, stats
from spectra.analysis.dynamics import (
    breakpoint_spread,
    breakpoint_table,
    loss_breakpoint_table,
    plateau_coincidence,
)
from spectra.analysis.kernels import participation_ratio_sv
from spectra.analysis.piecewise import fit_piecewise, plateau_segments, sudden_segment
from spectra.errors import SpectraError

TOKENS = np.geomspace(1e5, 1e8, 13)  # 4 checkpoints per decade: the grid holds every half of an interval
X = np.log10(TOKENS)


def hinge(x: np.ndarray, level: float, slopes: list[float], breakpoints: list[float]) -> np.ndarray:
    """A continuous piecewise-linear curve: ``level`` at x[0], then the given slopes between the breakpoints."""
    y = level + slopes[0] * (x - x[0])
    for change, t in zip(np.diff(slopes), breakpoints):
        y = y + change * np.maximum(x - t, 0.0)
    return y


# --------------------------------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [0.0, -3.0, 2.5])
def test_a_straight_line_has_no_breakpoint(slope: float) -> None:
    fit = fit_piecewise(TOKENS, 30.0 + slope * X)
    assert fit.n_breakpoints == 0 and fit.breakpoints == ()
    assert fit.slopes == pytest.approx((slope,), abs=1e-9)
    assert fit.predict(X) == pytest.approx(30.0 + slope * X)
    noisy = 30.0 + slope * X + np.random.default_rng(0).normal(0.0, 0.2, X.size)
    assert fit_piecewise(TOKENS, noisy).n_breakpoints == 0


@pytest.mark.parametrize("t", [5.75, 6.0, 6.5, 7.25])
def test_one_known_breakpoint_and_its_slopes_are_recovered(t: float) -> None:
    y = hinge(X, 40.0, [-1.0, -12.0], [t])
    fit = fit_piecewise(TOKENS, y)
    assert fit.n_breakpoints == 1
    assert fit.breakpoints[0] == pytest.approx(t, abs=1e-9)
    assert fit.breakpoint_tokens[0] == pytest.approx(10.0**t)
    assert fit.slopes == pytest.approx((-1.0, -12.0), abs=1e-8)
    assert fit.main_breakpoint == 0


def test_two_known_breakpoints_are_recovered() -> None:
    tokens = np.geomspace(1e5, 1e8, 25)  # 8 per decade
    x = np.log10(tokens)
    y = hinge(x, 50.0, [0.0, -25.0, -1.0], [6.0, 6.75])
    fit = fit_piecewise(tokens, y)
    assert fit.n_breakpoints == 2
    assert fit.breakpoints == pytest.approx((6.0, 6.75), abs=1e-9)
    assert fit.slopes == pytest.approx((0.0, -25.0, -1.0), abs=1e-7)
    assert fit.main_breakpoint in (0, 1)  # both changes are 24-25 per decade
    # with at most one breakpoint allowed, the two-breakpoint model is not tried
    assert np.isnan(fit_piecewise(tokens, y, max_breakpoints=1).bic[2])


def test_a_breakpoint_off_the_grid_is_located_within_its_spacing() -> None:
    t = 6.0 + 0.1  # between grid positions (6.0, 6.125, 6.25, ...): the refinement finds it
    y = hinge(X, 40.0, [0.0, -10.0], [t])
    fit = fit_piecewise(TOKENS, y)
    assert fit.n_breakpoints == 1 and fit.breakpoints[0] == pytest.approx(t, abs=1e-6)
    noisy = y + np.random.default_rng(1).normal(0.0, 0.3, y.size)
    fit = fit_piecewise(TOKENS, noisy)
    assert fit.n_breakpoints == 1 and abs(fit.breakpoints[0] - t) < 0.25  # within one checkpoint spacing


def test_an_outlier_at_the_end_is_no_segment() -> None:
    y = 30.0 - 2.0 * X
    y[-1] -= 10.0  # one point cannot make a segment of its own
    fit = fit_piecewise(TOKENS, y)
    assert all(np.sum(fit.x >= t) >= piecewise.MIN_POINTS_PER_SEGMENT for t in fit.breakpoints)


def test_step_zero_nan_and_too_few_points() -> None:
    y = hinge(X, 40.0, [0.0, -10.0], [6.5])
    with_zero = fit_piecewise(np.r_[0.0, TOKENS], np.r_[99.0, y])  # step 0 has no log tokens
    assert with_zero.breakpoints == pytest.approx(fit_piecewise(TOKENS, y).breakpoints)
    assert len(with_zero.x) == len(TOKENS)
    holes = y.copy()
    holes[3] = np.nan
    assert len(fit_piecewise(TOKENS, holes).x) == len(TOKENS) - 1
    with pytest.raises(SpectraError, match="at least 3 checkpoints"):
        fit_piecewise([0, 10, 20], [1.0, 2.0, 3.0])
    with pytest.raises(SpectraError, match="same token count"):
        fit_piecewise([10, 10, 20, 30], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(SpectraError, match="max_breakpoints"):
        fit_piecewise(TOKENS, y, max_breakpoints=3)
    # with 4 points no segment pair holds 3 points each: only the straight line is possible
    fit = fit_piecewise(TOKENS[:4], y[:4])
    assert fit.n_breakpoints == 0 and np.isnan(fit.bic[1]) and np.isnan(fit.bic[2])


# --------------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------------


def test_sudden_means_most_of_the_range_in_a_short_span() -> None:
    cliff = hinge(X, 40.0, [0.0, -60.0, 0.0], [6.5, 7.0])  # 30 of 30 within half a decade of three
    fit = fit_piecewise(TOKENS, cliff)
    assert fit.n_breakpoints == 2 and sudden_segment(fit) == 1
    assert sudden_segment(fit_piecewise(TOKENS, 40.0 - 10.0 * X)) is None  # steep but over the whole range
    slow = hinge(X, 40.0, [0.0, -10.0], [5.5])  # falls over 2.5 of 3 decades
    assert sudden_segment(fit_piecewise(TOKENS, slow)) is None
    rise = hinge(X, 10.0, [0.0, 60.0, 0.0], [6.5, 7.0])  # a sudden rise is no drop
    assert sudden_segment(fit_piecewise(TOKENS, rise)) is None


def test_plateaus_are_the_flat_segments_of_a_loss_fit() -> None:
    loss = hinge(X, 8.0, [-0.1, -2.0, -0.8], [6.0, 7.0])
    fit = fit_piecewise(TOKENS, loss)
    assert fit.n_breakpoints == 2 and plateau_segments(fit) == [0]  # 0.1 <= 0.25 * 2.0 < 0.8
    assert plateau_segments(fit_piecewise(TOKENS, 8.0 - X)) == []  # no breakpoint, no plateau


# --------------------------------------------------------------------------------------------------
# tables over cubes with many checkpoints
# --------------------------------------------------------------------------------------------------

D, N_LAYERS, N_KV = 8, 2, 2
STEPS = np.r_[0, np.unique(np.round(np.geomspace(8, 4000, 46)).astype(int))]  # 47 checkpoints, 10^3.6..10^6.3
TOKENS_PER_STEP = 512


def spectrum_with_pr(pr: float, d: int = D) -> np.ndarray:
    """Singular values (1, c, ..., c) whose singular-value participation ratio is exactly ``pr``."""
    if pr >= d:
        return np.ones(d)

    def excess(c: float) -> float:
        return float(participation_ratio_sv(np.r_[1.0, np.full(d - 1, c)])) - pr

    c = scipy.optimize.brentq(excess, 0.0, 1.0, xtol=1e-15)
    return np.r_[1.0, np.full(d - 1, c)]


def dense_cube(run_name: str, seed: int, breakpoints: tuple[float, float], optimizer: str = "muon"):
    """A cube of 47 checkpoints whose layer-l keys have PR 7 until log10 tokens = breakpoints[l], then fall by 3
    per decade."""
    x = np.log10(np.maximum(STEPS * TOKENS_PER_STEP, 1))
    k = np.ones((len(STEPS), N_LAYERS, N_KV, len(SITES), len(CENTERINGS), D))
    for layer, t in enumerate(breakpoints):
        pr = 7.0 - 3.0 * np.maximum(x - t, 0.0)  # >= 1.5 over the whole run for t >= 4.5
        for i, value in enumerate(pr):
            k[i, layer] = spectrum_with_pr(value)
    cube = make_cube(
        run_name=run_name,
        optimizer=optimizer,
        seed=seed,
        steps=tuple(int(s) for s in STEPS),
        tokens_per_step=TOKENS_PER_STEP,
        n_layers=N_LAYERS,
        n_heads=4,
        n_kv_heads=N_KV,
        head_dim=D,
        k_sv=k,
    )
    # validation loss: flat until 10^4.2 tokens, then falling 1.0 per decade, then 0.1 per decade from 10^5.2
    loss = hinge(np.log10(np.maximum(STEPS * TOKENS_PER_STEP, 1.0)), 8.0, [0.0, -1.0, -0.1], [4.2, 5.2])
    return cube.assign(val_loss=("step", loss, cube.val_loss.attrs))


def test_breakpoint_table_finds_each_layers_breakpoint_in_a_dense_trajectory() -> None:
    ds = stack([dense_cube("A1-s0", 0, (4.5, 5.5))])
    assert ds.sizes["step"] == 47
    table = breakpoint_table(ds)
    assert table["series"].tolist() == ["all", "0", "1"]
    assert (table["n_points"] == 46).all()  # step 0 left out
    layer0, layer1 = (table[table.series == s].iloc[0] for s in ("0", "1"))
    spacing = np.log10(STEPS[-1] / STEPS[-2])  # the coarsest interval near the end, log tokens
    for row, t in ((layer0, 4.5), (layer1, 5.5)):
        assert row["n_breakpoints"] >= 1
        assert abs(np.log10(row["main_breakpoint"]) - t) < spacing, row
        assert row["slope_before"] == pytest.approx(0.0, abs=0.2)
        assert row["slope_after"] == pytest.approx(-3.0, abs=0.2)
    assert table["metric"].unique().tolist() == ["pr_sv"] and table["label"].unique().tolist() == ["A1"]


def test_loss_table_plateaus_and_the_coincidence_with_rank_breakpoints() -> None:
    ds = stack([dense_cube("A1-s0", 0, (4.6, 5.7))])
    losses = loss_breakpoint_table(ds)
    row = losses.iloc[0]
    assert row["n_breakpoints"] == 2 and row["series"] == "val_loss"
    assert np.log10([row["breakpoint_1"], row["breakpoint_2"]]) == pytest.approx([4.2, 5.2], abs=0.05)
    assert len(row["plateaus"]) == 2  # the flat start and the slow end; the middle falls 10x faster
    ranks = breakpoint_table(ds)
    coincide = plateau_coincidence(ranks, losses)
    layer0 = coincide[(coincide.series == "0") & coincide["main"]].iloc[0]
    layer1 = coincide[(coincide.series == "1") & coincide["main"]].iloc[0]
    assert not layer0["in_loss_plateau"]  # 10^4.6 lies where the loss falls fastest
    assert layer1["in_loss_plateau"] and layer1["plateau_start"] == pytest.approx(10**5.2, rel=0.15)
    assert layer0["decades_to_loss_breakpoint"] == pytest.approx(4.6 - 4.2, abs=0.1)


def test_spread_of_breakpoints_across_seeds() -> None:
    cubes = [dense_cube(f"A1-s{s}", s, (4.5 + 0.25 * s, 4.5 + 0.25 * s)) for s in range(3)]
    cubes.append(dense_cube("B1-s0", 0, (5.5, 5.5), optimizer="adamw"))
    ranks = breakpoint_table(stack(cubes))
    spread = breakpoint_spread(ranks)
    a1 = spread[spread.label == "A1"].iloc[0]
    assert a1["n_seeds"] == 3 and a1["n_with_breakpoint"] == 3
    assert np.log10(a1["geometric_mean"]) == pytest.approx(4.75, abs=0.1)
    assert a1["sd_decades"] == pytest.approx(0.25, abs=0.08)
    b1 = spread[spread.label == "B1"].iloc[0]
    assert b1["n_seeds"] == 1 and np.isnan(b1["sd_decades"])
    assert spread["label"].tolist() == ["A1", "B1"]


def test_a_run_with_too_few_checkpoints_gets_a_note_not_an_error() -> None:
    ds = checkpoints.as_runs(make_cube(run_name="A1", steps=(0, 10, 20)))  # two checkpoints after step 0
    table = breakpoint_table(ds)
    assert table["n_breakpoints"].isna().all() and table["note"].str.contains("at least 3").all()
    assert table["n_points"].tolist() == [2, 2, 2]
    coincide = plateau_coincidence(table, loss_breakpoint_table(ds))
    assert coincide.empty


def test_docstring_examples_run() -> None:
    # the examples are in the fits' module
    result = doctest.testmod(piecewise, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_metrics_tables_and_figures_take_a_dense_trajectory() -> None:
    """`train.milestones = "plan+log"` gives 40-50 checkpoints: every consumer of the steps must take them."""
    from spectra.analysis.summary import summary_table
    from spectra.figures import trajectories

    ds = stack([dense_cube("A1-s0", 0, (4.5, 5.5)), dense_cube("A1-s1", 1, (4.6, 5.4))])
    assert ds.sizes["step"] == len(STEPS) == 47
    table = summary_table(ds)
    assert len(table) == 2 * 47 * (N_LAYERS + 1)
    assert stats.checkpoint_table(ds)["step"].nunique() == 47
    for figure in (
        trajectories.trajectory(ds),
        trajectories.heatmap(ds, run="A1-s0"),
        trajectories.pr_vs_loss(ds),
    ):
        assert figure.axes
