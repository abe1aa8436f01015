"""The "When does collapse happen?" figure: PR trajectories with their breakpoints, above the loss and its plateaus.

Built with [`toolkit`][spectra.figures.toolkit] (Agg canvas, no pyplot, colours by configuration, titles that say
what was measured) from the fits of [`dynamics`][spectra.analysis.dynamics]. No torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from spectra import cube
from spectra.analysis import checkpoints, dynamics, piecewise, plan
from spectra.errors import SpectraError
from spectra.figures.toolkit import VECTOR, format_tokens, label_palette, new_figure, subtitle, suptitle

__all__ = ["trajectory_with_breakpoints"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _log_tokens_axis(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_tokens(x)))
    ax.set_xlabel("training tokens (log scale)")


def _draw_fit(ax, fit: piecewise.PiecewiseFit, color, *, shade_sudden: bool, shade_plateaus: bool) -> None:
    """The fitted curve, its breakpoints (dotted), the sudden segment or the plateaus (shaded)."""
    x = np.linspace(fit.x[0], fit.x[-1], 200)
    ax.plot(10.0**x, fit.predict(x), color=color, linewidth=1.2, alpha=0.9)
    for t in fit.breakpoint_tokens:
        ax.axvline(t, color=color, linestyle=":", linewidth=1.0)
    knots = 10.0**fit.knots
    if shade_sudden:
        j = piecewise.sudden_segment(fit)
        if j is not None:
            ax.axvspan(knots[j], knots[j + 1], color=color, alpha=0.15, linewidth=0)
    if shade_plateaus:
        for j in piecewise.plateau_segments(fit):
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
    by [`sudden_segment`][spectra.analysis.piecewise.sudden_segment]'s rule; a grey band below is a loss plateau
    ([`plateau_segments`][spectra.analysis.piecewise.plateau_segments]). A run without a line had too few checkpoints to
    fit.
    """
    ds = checkpoints.as_runs(ds)
    measurement = cube.Measurement(which=which, site=site, centering=centering, convention=convention)
    runs = plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    fits = dynamics.trajectory_fits(ds, **measurement.keywords())
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
    suptitle(
        fig,
        f"When does the {VECTOR[which]} rank change? Breakpoints in log tokens",
        subtitle(measurement, f"mean {scope}"),
        "lines: piecewise-linear fits (0-2 breakpoints, BIC) · dotted: breakpoints · coloured band: sudden drop"
        + (" · grey band: loss plateau" if has_loss else ""),
    )
    return fig
