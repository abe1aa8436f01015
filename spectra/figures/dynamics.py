"""Figures of the "When does collapse happen?" and "Does rank predict reasoning?" sections.

Built like [`plots`][spectra.figures.trajectories] (Agg canvas, no pyplot, colours by configuration, titles that say what was
measured) from the tables of [`dynamics`][spectra.analysis.dynamics] and [`evals_stats`][spectra.evals.scores]. No torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from spectra import cube
from spectra.analysis import checkpoints, dynamics, plan
from spectra.errors import SpectraError
from spectra.figures.trajectories import (
    _ONE,
    _pr_label,
    _subtitle,
    _title,
    format_tokens,
    label_palette,
    new_figure,
)

__all__ = ["pr_vs_score", "trajectory_with_breakpoints"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _log_tokens_axis(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_tokens(x)))
    ax.set_xlabel("training tokens (log scale)")


def _draw_fit(ax, fit: dynamics.PiecewiseFit, color, *, shade_sudden: bool, shade_plateaus: bool) -> None:
    """The fitted curve, its breakpoints (dotted), the sudden segment or the plateaus (shaded)."""
    x = np.linspace(fit.x[0], fit.x[-1], 200)
    ax.plot(10.0**x, fit.predict(x), color=color, linewidth=1.2, alpha=0.9)
    for t in fit.breakpoint_tokens:
        ax.axvline(t, color=color, linestyle=":", linewidth=1.0)
    knots = 10.0**fit.knots
    if shade_sudden:
        j = dynamics.sudden_segment(fit)
        if j is not None:
            ax.axvspan(knots[j], knots[j + 1], color=color, alpha=0.15, linewidth=0)
    if shade_plateaus:
        for j in dynamics.plateau_segments(fit):
            ax.axvspan(knots[j], knots[j + 1], color="0.5", alpha=0.12, linewidth=0)


def trajectory_with_breakpoints(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    series: str = "all",
    loss: str = "val_loss",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """PR trajectories with their piecewise-linear fits and breakpoints, above the loss with its plateaus.

    One column per configuration; in each, every seed's checkpoints (markers, step 0 left out), its chosen fit
    (line), its breakpoints (dotted verticals) and a sudden drop, if any, shaded in the configuration's colour.
    Below, the same for the validation loss, with its plateau segments shaded grey, so that one can see whether
    a PR breakpoint falls in a loss plateau. Log tokens on x, as the fits are.

    Read it as: a dotted line is where the slope of the PR changes; a coloured band is a drop that is "sudden"
    by [`sudden_segment`][spectra.analysis.dynamics.sudden_segment]'s rule; a grey band below is a loss plateau
    ([`plateau_segments`][spectra.analysis.dynamics.plateau_segments]). A run without a line had too few checkpoints to
    fit.
    """
    ds = checkpoints.as_runs(ds)
    runs = plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    fits = dynamics.trajectory_fits(ds, site=site, convention=convention, centering=centering, which=which)
    fits = {run: value for (run, name), value in fits.items() if name == series}
    if not fits:
        raise SpectraError(f"no series {series!r}: use 'all' or a layer index")
    has_loss = loss in ds and bool(np.isfinite(ds[loss].values).any())
    losses = dynamics.loss_fits(ds, loss) if has_loss else {}
    labels = plan.label_order(runs["label"])
    palette = label_palette(labels)
    nrows = 2 if has_loss else 1
    fig, axes = new_figure(max(5.0, 3.4 * len(labels)), 3.4 * nrows + 1.0, nrows=nrows, ncols=len(labels))
    for col, label in enumerate(labels):
        members = sorted(runs.index[runs["label"] == label], key=lambda r: int(runs.loc[r, "seed"]))
        ax = axes[0, col]
        for i, run in enumerate(members):
            tokens, values, fit, _note = fits[run]
            keep = tokens > 0
            marker = _MARKERS[i % len(_MARKERS)]
            ax.plot(tokens[keep], values[keep], marker, color=palette[label], markersize=3.5, alpha=0.7,
                    label=f"seed {runs.loc[run, 'seed']}")  # fmt: skip
            if fit is not None:
                _draw_fit(ax, fit, palette[label], shade_sudden=True, shade_plateaus=False)
            if has_loss:
                lt, lv, lfit, _ = losses[run]
                lax = axes[1, col]
                lax.plot(lt[lt > 0], lv[lt > 0], marker, color=palette[label], markersize=3.5, alpha=0.7)
                if lfit is not None:
                    _draw_fit(lax, lfit, palette[label], shade_sudden=False, shade_plateaus=True)
        ax.set_title(plan.describe_label(label), fontsize=8)
        ax.legend(fontsize=7, loc="best")
        _log_tokens_axis(ax)
        if col == 0:
            what = "mean PR" if series == "all" else f"layer {series} PR"
            ax.set_ylabel(f"{what} ({convention} convention)")
        if has_loss:
            _log_tokens_axis(axes[1, col])
            if col == 0:
                axes[1, col].set_ylabel(f"{loss.replace('_', ' ')} (nats/token)")
    scope = "over layers and heads" if series == "all" else f"layer {series}, over heads"
    _title(
        fig,
        f"When does the {_ONE[which]} rank change? Breakpoints in log tokens",
        _subtitle(which, site, centering, convention, f"mean {scope}"),
        "lines: piecewise-linear fits (0-2 breakpoints, BIC) · dotted: breakpoints · coloured band: sudden drop"
        + (" · grey band: loss plateau" if has_loss else ""),
    )
    return fig


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
    ax.set_xlabel(f"mean key {_pr_label(convention)} at the final checkpoint")
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
    _title(
        fig,
        f"Does rank predict the score? {task} ({metric}) against key PR",
        "one point per run · bars: PR interval over heads (not across seeds), score 95% interval · dashed: chance",
        corr,
    )
    return fig
