"""Figures at each run's final checkpoint: the shape of the spectrum, and the per-layer rank of the C1/C2 pair.

``waterfall`` (normalised singular values against their index) and ``data_complexity`` (per-layer PR of simple
against complex data), built with [`toolkit`][spectra.figures.toolkit]. No torch here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from spectra import cube
from spectra.analysis import checkpoints, plan, stats
from spectra.errors import SpectraError
from spectra.figures.toolkit import (
    VECTORS,
    labelled_runs,
    legend_below,
    new_figure,
    pr_axis_label,
    require_rows,
    seed_lineplot,
    subtitle,
    suptitle,
)

__all__ = ["data_complexity", "waterfall"]


def waterfall(
    ds: xr.Dataset,
    *,
    layer: int | None = None,
    site: str = cube.DEFAULT_SITE,
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """Normalised singular values σ_i/σ_1 against i at each run's final checkpoint (log scale).

    Each head's spectrum is divided by its own largest singular value, then averaged over heads (and
    over layers unless ``layer`` is given); one line per configuration, band = range over seeds.
    """
    ds = checkpoints.as_runs(ds)
    # a figure of the spectrum itself: no participation-ratio convention
    measurement = cube.Measurement(which=which, site=site, centering=centering)
    runs = labelled_runs(ds, simple_data, complex_data)
    sv = measurement.spectra(ds)
    if layer is not None:
        if layer not in ds["layer"].values:
            raise SpectraError(f"layer {layer} not in the cubes (layers 0 … {ds.sizes['layer'] - 1})")
        sv = sv.sel(layer=[layer])
    final = checkpoints.final_checkpoint(sv, ds)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ratio = (final / final.max("sv")).mean(["layer", measurement.head_dim])
    df = (
        ratio.drop_vars([c for c in ratio.coords if c not in ("run", "sv")])
        .to_dataframe(name="ratio")
        .reset_index()
    )
    df = df.dropna(subset=["ratio"])
    require_rows(df, "waterfall", f"no defined spectrum at site {site!r} ({centering})")
    df["index"] = df["sv"] + 1
    df["label"] = df["run"].map(runs["label"])
    labels = plan.label_order(df["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = seed_lineplot(ax, df, "index", "ratio", labels, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i (descending)")
    ax.set_ylabel("σ_i / σ_1 (mean over heads)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_below(ax, title)
    where = f"layer {layer}" if layer is not None else "mean over layers"
    suptitle(
        fig,
        f"Singular-value spectrum of the {VECTORS[which]} at the final checkpoint",
        subtitle(measurement, where, convention=False),
    )
    return fig


def data_complexity(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """Per-layer PR at the final checkpoint for the data-complexity pair C1 (simple) vs C2 (complex).

    Raises :class:`SpectraError` unless runs of both C1 and C2 are present.
    """
    ds = checkpoints.as_runs(ds)
    runs = labelled_runs(ds, simple_data, complex_data)
    present = set(runs["plan_cell"])  # a study's own labels count for the plan's cells
    if not {"C1", "C2"} <= present:
        missing = sorted({"C1", "C2"} - present)
        raise SpectraError(
            "the data-complexity figure needs runs of C1 (learned QK-norm, Muon, simple data) and C2 (the same "
            f"on complex data); missing: {', '.join(missing)}. Runs' datasets: "
            f"{', '.join(sorted(set(runs['data'])))} (name them with --simple-data / --complex-data)"
        )
    measurement = cube.Measurement(which=which, site=site, centering=centering, convention=convention)
    keep = runs.index[runs["plan_cell"].isin(["C1", "C2"])].tolist()
    values = stats.head_values(ds.sel(run=keep), **measurement.keywords())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = values.mean(measurement.head_dim)
    df = (
        per_layer.drop_vars([c for c in per_layer.coords if c not in ("run", "layer")])
        .to_dataframe(name="pr")
        .reset_index()
        .dropna(subset=["pr"])
    )
    require_rows(df, "data-complexity", f"no defined PR at site {site!r} for C1 or C2")
    df["label"] = df["run"].map(runs["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    pair = [
        lab for cell in ("C1", "C2") for lab in plan.label_order(runs.loc[runs["plan_cell"] == cell, "label"])
    ]
    title = seed_lineplot(ax, df, "layer", "pr", pair)
    ax.set_xlabel("layer")
    ax.set_ylabel(pr_axis_label(convention, "mean over heads", mean=False))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    legend_below(ax, title)
    suptitle(
        fig,
        "Does data complexity change the rank? C1 (simple) vs C2 (complex), per layer",
        subtitle(measurement, "final checkpoint"),
    )
    return fig
