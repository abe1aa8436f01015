"""Figures (spectra.figures): every figure has data on its axes, says what it shows, and refuses empty input."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from helpers import stack, surgery_result, synthetic_cube

from spectra.errors import SpectraError
from spectra.figures import final_checkpoint, gamma, kinds, surgery, toolkit, trajectories


@pytest.fixture(scope="module")
def cubes() -> xr.Dataset:
    rank = np.array([7.0, 5.0, 4.0])[:, None, None]
    return stack(
        [
            synthetic_cube("a1-s0", seed=0, rank=rank),
            synthetic_cube("a1-s1", seed=1, rank=rank + 1),
            synthetic_cube("a2-s0", qk_norm="none", rank=6.0),
            synthetic_cube("c1-s0", data="bible-bbe", rank=3.0),
            synthetic_cube("c2-s0", data="bible-kjv", rank=5.0),
            synthetic_cube("fz-s0", qk_norm="frozen", rank=2.0),
        ]
    )


def assert_readable(fig) -> None:
    """Every visible axes holds data, and the figure says what it shows."""
    assert fig._suptitle is not None and fig._suptitle.get_text().strip()
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert visible
    for ax in visible:
        assert ax.lines or ax.collections or ax.images, f"empty axes {ax}"
    assert any(ax.get_xlabel().strip() for ax in visible), "no labelled x axis"
    assert any(ax.get_ylabel().strip() for ax in visible), "no labelled y axis"


@pytest.mark.parametrize(
    "kind", ["trajectory", "waterfall", "data-complexity", "gamma", "loss", "pr-vs-loss"]
)
def test_every_cube_figure_has_data(cubes, kind):
    fig = kinds.PLOTTERS[kind](cubes)
    assert_readable(fig)


def test_heatmap_of_one_run_has_an_image_of_layers_by_checkpoints(cubes):
    fig = trajectories.heatmap(cubes, run="a1-s0", convention="eig", site="rope")
    assert_readable(fig)
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().shape == (2, 3)  # (layer, checkpoint)
    assert np.allclose(mesh.get_array()[:, -1], 4.0)
    assert "site rope" in fig._suptitle.get_text() and "eigenvalue" in fig._suptitle.get_text()


def test_heatmap_needs_a_run_when_there_are_several(cubes):
    with pytest.raises(SpectraError, match="choose one with run="):
        trajectories.heatmap(cubes)
    with pytest.raises(SpectraError, match="run 'nope' not found"):
        trajectories.heatmap(cubes, run="nope")


def test_trajectory_lines_are_seed_means(cubes):
    fig = trajectories.trajectory(cubes.sel(run=["a1-s0", "a1-s1"]))
    ys = [line.get_ydata() for line in fig.axes[0].lines if len(line.get_ydata()) == 3]
    assert any(np.allclose(y, [7.5, 5.5, 4.5]) for y in ys)  # mean of the two seeds at each checkpoint


def test_waterfall_of_one_layer(cubes):
    fig = final_checkpoint.waterfall(cubes, layer=1)
    assert_readable(fig)
    assert "layer 1" in fig._suptitle.get_text()
    with pytest.raises(SpectraError, match="layer 7 not in the cubes"):
        final_checkpoint.waterfall(cubes, layer=7)


def test_surgery_curves_show_every_random_draw_and_their_range():
    fig = surgery.surgery_curves([surgery_result("a1-s0"), surgery_result("a2-s0", gamma_applicable=False)])
    assert_readable(fig)
    first, second = fig.axes[0], fig.axes[1]
    # svd, gamma, random, then the baseline
    assert len(first.lines) == 4 and len(second.lines) == 3
    assert np.allclose(first.lines[0].get_ydata(), 4.0 + np.array([0.0, 0.25, 0.5, 0.75]))
    dots, band = first.collections  # the random draws, then their range
    assert len(dots.get_offsets()) == 4 * 3  # every draw of every fraction
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    draws = surgery_result()["loss"].sel(strategy="random").values
    assert np.isclose(low, draws.min()) and np.isclose(high, draws.max())  # never beyond what was measured
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "random: each draw (n = 3 seeds)" in legend and "random: range of the draws" in legend
    assert not any("CI" in t or "interval" in t for t in legend)
    assert "not applicable (model has no QK-norm)" in second.get_title()


def test_a_single_runs_surgery_legend_fits_the_figure():
    fig = surgery.surgery_curves(surgery_result("a1-s0"))
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width  # not clipped at either side


def test_surgery_without_any_finite_loss_is_an_error():
    empty = surgery_result()
    empty["loss"][:] = np.nan
    with pytest.raises(SpectraError, match="no finite loss"):
        surgery.surgery_curves(empty)
    with pytest.raises(SpectraError, match="surgery schema"):
        surgery.surgery_curves(empty.drop_vars("baseline_loss"))


def test_data_complexity_without_the_pair_says_why(cubes):
    with pytest.raises(SpectraError, match="missing: C2"):
        final_checkpoint.data_complexity(cubes.sel(run=["a1-s0", "c1-s0"]))
    # the override makes a standard dataset the complex one
    fig = final_checkpoint.data_complexity(cubes.sel(run=["a1-s0", "c1-s0"]), complex_data=["bible-mix"])
    assert_readable(fig)


def test_gamma_without_a_learned_gamma_says_why(cubes):
    with pytest.raises(SpectraError, match="a2-s0: no QK-norm; fz-s0: gamma frozen"):
        gamma.gamma_scatter(cubes.sel(run=["a2-s0", "fz-s0"]))


def test_empty_trajectory_is_an_error(cubes):
    with pytest.raises(SpectraError, match="nothing to plot for the trajectory figure"):
        trajectories.trajectory(cubes.sel(run=["a2-s0"]), site="unit")  # no unit site without QK-norm


def test_save_figure_writes_png_and_svg(tmp_path, cubes):
    fig = trajectories.loss_curves(cubes)
    written = toolkit.save_figure(fig, tmp_path / "sub" / "loss.svg")
    assert [p.name for p in written] == ["loss.png", "loss.svg"]
    assert written[0].read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in written[1].read_bytes()[:500]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "loss.png",
        "loss.svg",
    ]  # no temporaries left
    with pytest.raises(SpectraError, match="ending in .png or .svg"):
        toolkit.save_figure(fig, tmp_path / "loss.pdf")


def test_format_tokens():
    assert [toolkit.format_tokens(n) for n in (0, 500, 65_536, 1_500_000, 25_000_000)] == [
        "0",
        "500",
        "65.5k",
        "1.5M",
        "25M",
    ]


@pytest.mark.parametrize("kind", ["trajectory", "waterfall", "gamma", "pr-vs-loss"])
def test_query_figures(cubes, kind):
    fig = kinds.PLOTTERS[kind](cubes.sel(run=["a1-s0", "a2-s0"]), which="q")
    assert_readable(fig)
    assert "quer" in fig._suptitle.get_text()


def _legend(fig) -> tuple[str, list[str]]:
    legend = fig.legends[0]
    return legend.get_title().get_text(), [t.get_text() for t in legend.get_texts()]


def test_legends_say_how_many_seeds_and_announce_a_band_only_where_there_is_one(cubes):
    title, entries = _legend(trajectories.trajectory(cubes))
    assert title == "configuration: mean over seeds (band: range over the seeds)"
    assert any(e.startswith("A1") and e.endswith("(n=2 seeds)") for e in entries)
    assert any(e.startswith("A2") and e.endswith("(n=1 seed)") for e in entries)
    one_seed = cubes.sel(run=["a1-s0", "a2-s0"])
    for fig in (
        trajectories.trajectory(one_seed),
        final_checkpoint.waterfall(one_seed),
        trajectories.loss_curves(one_seed),
    ):
        title, entries = _legend(fig)
        assert "band" not in title.replace("no band", "") and "one seed each" in title


def test_a_legend_too_wide_for_two_columns_falls_back_to_one(cubes):
    fig = trajectories.trajectory(cubes)  # six configurations with long names and seed counts
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width
