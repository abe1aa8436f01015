"""``collapse-spectra watch --figures``: a run's trajectory and heatmap, redrawn whenever its cube grows.

Into ``RUN/figures/``: ``trajectory.png`` (mean key PR over layers and heads against training tokens,
[`trajectory`][spectra.figures.trajectories.trajectory]) and ``heatmap.png`` (layer by checkpoint,
[`heatmap`][spectra.figures.trajectories.heatmap]), each with its SVG, the same figures as ``collapse-spectra
plot trajectory|heatmap RUN``. Each file is replaced atomically
([`save_figure`][spectra.figures.toolkit.save_figure]), so an image viewer never shows half a file; a file
there that collapse-spectra did not write is never replaced. No torch here.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from spectra.figures.toolkit import check_figure_output, save_figure
from spectra.figures.trajectories import heatmap, trajectory

__all__ = ["FIGURES_DIR", "RUN_FIGURES", "figure_files", "write_run_figures"]

FIGURES_DIR = "figures"
"""The run directory's sub-directory of the watch's figures."""
RUN_FIGURES = {"trajectory": trajectory, "heatmap": heatmap}
"""The figures drawn for each run, by file name (``<name>.png`` and ``<name>.svg``)."""


def figure_files(run: Path) -> list[Path]:
    """The files :func:`write_run_figures` writes for ``run`` (PNG, then SVG, of each figure)."""
    return [run / FIGURES_DIR / f"{name}.{fmt}" for name in RUN_FIGURES for fmt in ("png", "svg")]


def write_run_figures(cube: xr.Dataset, run: Path) -> list[Path]:
    """Draw the figures of one run's ``cube`` into ``run/figures/``; return the files written.

    Raises
    ------
    SpectraError
        A file there was not written by collapse-spectra (checked for every figure before any is drawn),
        or the directory cannot be written.
    """
    for name in RUN_FIGURES:
        check_figure_output(run / FIGURES_DIR / f"{name}.png", change="move it away to let watch draw there")
    written = []
    for name, draw in RUN_FIGURES.items():
        written += save_figure(draw(cube), run / FIGURES_DIR / f"{name}.png")
    return written
