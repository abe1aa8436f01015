"""The "Does rank predict reasoning?" figure: each run's headline PR against its score on one task.

Built from [`scores`][spectra.evals.scores]' tables with [`toolkit`][spectra.figures.toolkit]. No torch here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from spectra.analysis import plan
from spectra.errors import SpectraError
from spectra.figures.toolkit import label_palette, new_figure, pr_label, suptitle

__all__ = ["pr_vs_score"]


def pr_vs_score(points: pd.DataFrame, correlation: dict[str, Any] | None = None) -> Figure:
    """Each run's headline PR against its score on one task, with both intervals and the chance level.

    ``points`` is [`rank_vs_score`][spectra.evals.scores.rank_vs_score]'s table, ``correlation`` optionally
    [`rank_score_correlation`][spectra.evals.scores.rank_score_correlation]'s result (shown in the subtitle).
    Horizontal bars: the PR's bootstrap interval over heads (not across seeds); vertical bars: the score's 95%
    interval; dashed line: chance. Read it as: if rank predicted the score, the points would rise from left to
    right beyond the vertical bars; points on the chance line say the model is too small for the task to tell.
    """
    if points.empty:
        raise SpectraError(
            "nothing to plot for the PR-against-score figure: no run has both a PR and a score"
        )
    labels = plan.label_order(points["label"])
    palette = label_palette(labels)
    fig, axes = new_figure()
    ax = axes[0, 0]
    for label in labels:
        g = points[points["label"] == label]
        ax.errorbar(
            g["pr"],
            g["score"],
            xerr=[g["pr"] - g["pr_ci_low"], g["pr_ci_high"] - g["pr"]],
            yerr=[g["score"] - g["score_ci_low"], g["score_ci_high"] - g["score"]],
            fmt="o",
            color=palette[label],
            capsize=3,
            label=f"{plan.describe_label(label)} (n={len(g)} seed{'s' if len(g) != 1 else ''})",
        )
    chance = pd.to_numeric(points["chance"], errors="coerce").dropna()
    if len(chance):
        ax.axhline(float(chance.mean()), color="0.4", linestyle="--", linewidth=1, label="chance")
    task, metric = points.attrs.get("task", "task"), points.attrs.get("metric", "score")
    convention = points.attrs.get("convention", "sv")
    ax.set_xlabel(f"mean key {pr_label(convention)} at the final checkpoint")
    ax.set_ylabel(f"{task}: {metric}")
    handles, texts = ax.get_legend_handles_labels()
    fig.legend(handles, texts, fontsize=8, loc="outside lower center", ncols=1)
    corr = ""
    if correlation is not None:
        corr = (
            f"Spearman rho = {correlation['rho']:.2f}, p = {correlation['p']:.2g}"
            if np.isfinite(correlation["rho"])
            else "no rank correlation"
        )
        corr += f" over {correlation['n_runs']} runs ({correlation['n_configurations']} configurations)"
        if correlation.get("note"):
            corr += f"; {correlation['note']}"
    suptitle(
        fig,
        f"Does rank predict the score? {task} ({metric}) against key PR",
        "one point per run · bars: PR interval over heads (not across seeds), score 95% interval · dashed: chance",
        corr,
    )
    return fig
