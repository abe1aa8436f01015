"""The gamma-vs-importance figure: |gamma_j| against the energy share of coordinate j (docs/gamma.md).

Built from [`gamma`][spectra.analysis.gamma]'s tables with [`toolkit`][spectra.figures.toolkit]. No torch here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spectra.analysis import checkpoints
from spectra.analysis import gamma as gamma_analysis
from spectra.errors import SpectraError
from spectra.figures.toolkit import VECTOR, format_tokens, labelled_runs, new_figure, suptitle

__all__ = ["gamma_scatter"]


def gamma_scatter(
    ds: xr.Dataset,
    *,
    which: str = "k",
    site: str = gamma_analysis.DEFAULT_GAMMA_SITE,
    run: str | None = None,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """|gamma_j| against the energy share of coordinate j, one panel per run with a varying gamma.

    Each point is one coordinate of one head at the run's final checkpoint; colour = layer. The panel
    title gives the median Spearman rho over the run's heads. Runs without QK-norm or with a frozen
    gamma are listed in the subtitle, not drawn.
    """
    ds = checkpoints.as_runs(ds)
    runs = labelled_runs(ds, simple_data, complex_data)
    points = gamma_analysis.gamma_points(ds, which=which, site=site, run=run)
    skipped = [r for r in runs.index if r not in set(points["run"]) and (run is None or r == run)]
    if points.empty:
        result = gamma_analysis.gamma_energy_correlation(ds, which=which, site=site)
        final = checkpoints.final_checkpoint(result["status"], ds)
        reasons = {str(r): sorted(set(final.sel(run=r).values.ravel().astype(str))) for r in skipped}
        raise SpectraError(
            "nothing to plot for the gamma figure: no run has a QK-norm gamma that varies across coordinates ("
            + "; ".join(f"{r}: {', '.join(v)}" for r, v in reasons.items())
            + ")"
        )
    result = gamma_analysis.gamma_energy_correlation(
        ds.sel(run=sorted(set(points["run"]))), which=which, site=site
    )
    rho = checkpoints.final_checkpoint(result["rho"], ds.sel(run=sorted(set(points["run"]))))
    shown = [r for r in runs.index if r in set(points["run"])]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = new_figure(4.2 * ncols + 1.2, 3.8 * nrows + 0.8, nrows=nrows, ncols=ncols, sharey=True)
    n_layers = ds.sizes["layer"]
    cmap = sns.color_palette("viridis", as_cmap=True)
    for k, r in enumerate(shown):
        ax = axes[k // ncols, k % ncols]
        p = points[points["run"] == r]
        sc = ax.scatter(
            p["abs_gamma"],
            p["energy_fraction"],
            c=p["layer"],
            cmap=cmap,
            vmin=0,
            vmax=max(n_layers - 1, 1),
            s=10,
            alpha=0.7,
            edgecolors="none",
            rasterized=True,  # thousands of points: a raster inside the SVG keeps the file small
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = float(np.nanmedian(rho.sel(run=r).values))
        ax.set_title(
            f"{r} ({runs.loc[r, 'label']}), {format_tokens(p['tokens'].iloc[0])} tokens\nmedian Spearman ρ over heads = {med:.2f}",
            fontsize=9,
        )
        ax.set_yscale("log")
        ax.set_xlabel("|gamma_j| (QK-norm gain of coordinate j)")
        if k % ncols == 0:
            ax.set_ylabel(f"share of the head's {VECTOR[which]} energy\nin coordinate j (site {site})")
    for k in range(len(shown), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    cbar = fig.colorbar(sc, ax=axes[:, -1].tolist(), label="layer")
    cbar.locator = MaxNLocator(integer=True)
    cbar.update_ticks()
    extra = f"site {site}: " + (
        "before gamma (importance independent of the gain)"
        if site == "unit"
        else "after gamma: contains gamma² by construction, biased toward positive ρ"
    )
    if skipped:
        extra += " · not shown (no varying gamma): " + ", ".join(skipped)
    suptitle(fig, f"Does the QK-norm gain track the importance of the {VECTOR[which]} coordinates?", extra)
    return fig
