"""The figures ``collapse-spectra plot KIND`` draws, by kind: :data:`FIGURE_KINDS` and :data:`PLOTTERS`.

See docs/figures.md for how to read each. No torch here.
"""

from __future__ import annotations

from spectra.figures.final_checkpoint import data_complexity, waterfall
from spectra.figures.gamma import gamma_scatter
from spectra.figures.surgery import surgery_curves
from spectra.figures.trajectories import heatmap, loss_curves, pr_vs_loss, trajectory

__all__ = ["FIGURE_KINDS", "PLOTTERS"]

PLOTTERS = {
    "trajectory": trajectory,
    "heatmap": heatmap,
    "waterfall": waterfall,
    "data-complexity": data_complexity,
    "surgery": surgery_curves,
    "gamma": gamma_scatter,
    "loss": loss_curves,
    "pr-vs-loss": pr_vs_loss,
}
"""Figure kind (as in ``collapse-spectra plot KIND``) -> function."""
FIGURE_KINDS = tuple(PLOTTERS)
"""The kinds, in the order ``collapse-spectra plot --help`` lists them."""
