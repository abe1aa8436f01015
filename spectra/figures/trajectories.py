"""Figures over training: the participation ratio and the loss against training tokens, run by run or per layer.

``trajectory`` (the plan's signature figure), ``heatmap`` (one run, layer by checkpoint), ``loss_curves`` and
``pr_vs_loss``, built with [`toolkit`][spectra.figures.toolkit]. See docs/figures.md for how to read each.
No torch here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from spectra import cube
from spectra.analysis import checkpoints, plan, stats
from spectra.errors import SpectraError
from spectra.figures.toolkit import (
    VECTORS,
    figure_legend,
    format_tokens,
    label_palette,
    labelled_runs,
    legend_below,
    new_figure,
    pr_axis_label,
    require_rows,
    seed_lineplot,
    subtitle,
    suptitle,
    tokens_axis,
)

__all__ = ["heatmap", "loss_curves", "pr_vs_loss", "trajectory"]


def trajectory(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """PR against training tokens: one line per configuration (mean over its seeds), band = seed range.

    The plan's signature figure (seed 002, figure 1). The value of a run at a checkpoint is its mean PR
    over layers and heads.
    """
    ds = checkpoints.as_runs(ds)
    measurement = cube.Measurement(which=which, site=site, centering=centering, convention=convention)
    table = stats.checkpoint_table(
        ds, site=site, centering=centering, which=which, simple_data=simple_data, complex_data=complex_data
    )
    y = measurement.metric
    table = table.dropna(subset=[y])
    require_rows(table, "trajectory", f"no defined PR at site {site!r} ({centering}) in any run")
    table = table.dropna(subset=["tokens"])  # public models without a tokens rule: no place on this axis
    require_rows(
        table, "trajectory", "no checkpoint has a known token count (public models: --tokens-per-step)"
    )
    labels = plan.label_order(table["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = seed_lineplot(ax, table, "tokens", y, labels)
    tokens_axis(ax)
    ax.set_ylabel(pr_axis_label(convention, "over layers and heads"))
    legend_below(ax, title)
    suptitle(
        fig,
        f"Effective rank of the {VECTORS[which]} during training",
        subtitle(measurement),
    )
    return fig


def heatmap(
    ds: xr.Dataset,
    *,
    run: str | None = None,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """Layer × tokens heatmap of one run's PR (mean over the layer's heads).

    The colour scale runs from 1 (one direction) to ``head_dim`` (all directions equal) for every run, so
    heatmaps of different runs can be compared by eye. ``run`` may be omitted when ``ds`` holds one run.
    """
    ds = checkpoints.as_runs(ds)
    names = [str(r) for r in ds["run"].values]
    if run is None:
        if len(names) > 1:
            raise SpectraError(f"the heatmap shows one run; choose one with run= (--run): {names}")
        run = names[0]
    if run not in names:
        raise SpectraError(f"run {run!r} not found; runs: {names}")
    measurement = cube.Measurement(which=which, site=site, centering=centering, convention=convention)
    runs = labelled_runs(ds, simple_data, complex_data)
    one = ds.sel(run=[run])
    pr = stats.head_pr(one, **measurement.keywords())
    measured = checkpoints.measured_steps(one).isel(run=0).values
    tokens = checkpoints.tokens_of(one).isel(run=0).values[measured]
    steps = one["step"].values[measured]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an undefined layer stays NaN (blank cell)
        grid = (
            pr.isel(run=0, step=np.flatnonzero(measured))
            .mean(measurement.head_dim)
            .transpose("layer", "step")
        )
    if np.isnan(grid.values).all():
        raise SpectraError(
            f"nothing to plot for the heatmap figure: run {run!r} has no defined PR at site {site!r}"
        )
    head_dim = one.sizes["sv"]
    n_layers, n_steps = grid.shape
    fig, axes = new_figure(max(6.5, 1.6 + 0.75 * n_steps), max(4.2, 2.0 + 0.3 * n_layers))
    ax = axes[0, 0]
    sns.heatmap(
        grid.values,
        ax=ax,
        vmin=1,
        vmax=head_dim,
        cmap="viridis",
        annot=n_layers * n_steps <= 120,
        fmt=".1f",
        annot_kws={"fontsize": 7},
        xticklabels=[format_tokens(t) if np.isfinite(t) else f"step {s}" for t, s in zip(tokens, steps)],
        yticklabels=[int(layer) for layer in grid["layer"].values],
        cbar_kws={"label": f"PR, {cube.CONVENTION_NAMES[convention]}"},
    )
    ax.invert_yaxis()  # layer 0 at the bottom, as in the model
    known = np.isfinite(tokens.astype(float)).all()
    ax.set_xlabel(
        "training tokens at checkpoint" if known else "checkpoint (training tokens; step where unknown)"
    )
    ax.set_ylabel("layer")
    label = runs.loc[run, "label"]
    suptitle(
        fig,
        f"Participation ratio of the {VECTORS[which]} per layer: run {run}",
        plan.describe_label(label),
        subtitle(measurement, f"mean over heads, colour scale 1 … head_dim = {head_dim}"),
    )
    return fig


def loss_curves(
    ds: xr.Dataset, *, simple_data: Iterable[str] = (), complex_data: Iterable[str] = ()
) -> Figure:
    """Training and validation loss against tokens: colour = configuration, line style = split."""
    ds = checkpoints.as_runs(ds)
    runs = labelled_runs(ds, simple_data, complex_data)
    tokens = checkpoints.tokens_of(ds)
    frames = []
    for var, split in (("train_loss", "train"), ("val_loss", "validation")):
        if var not in ds:
            continue
        loss = ds[var].broadcast_like(ds["run"]).transpose("run", "step")
        frame = pd.DataFrame(
            {
                "run": np.repeat(loss["run"].values.astype(str), loss.sizes["step"]),
                "tokens": tokens.values.ravel(),
                "loss": loss.values.ravel(),
                "split": split,
            }
        )
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True).dropna(subset=["loss", "tokens"]) if frames else pd.DataFrame()
    require_rows(df, "loss", "the cubes hold no train_loss or val_loss values")
    df["label"] = df["run"].map(runs["label"])
    labels = plan.label_order(df["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = seed_lineplot(
        ax, df, "tokens", "loss", labels, style="split", style_order=["train", "validation"]
    )
    tokens_axis(ax)
    ax.set_ylabel("loss (nats/token)")
    legend_below(ax, title.replace("configuration", "configuration / split", 1))
    suptitle(
        fig,
        "Training and validation loss",
        "train: mean over the last log window before each checkpoint · validation: the run's fixed validation slice",
    )
    return fig


def pr_vs_loss(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> Figure:
    """Mean PR against validation loss, one line per run through its checkpoints in training order."""
    ds = checkpoints.as_runs(ds)
    measurement = cube.Measurement(which=which, site=site, centering=centering, convention=convention)
    table = stats.checkpoint_table(
        ds, site=site, centering=centering, which=which, simple_data=simple_data, complex_data=complex_data
    )
    y = measurement.metric
    table = table.dropna(subset=[y, "val_loss"])
    require_rows(
        table, "pr-vs-loss", f"no checkpoint with both a validation loss and a defined PR at site {site!r}"
    )
    labels = plan.label_order(table["label"])
    palette = label_palette(labels)
    fig, axes = new_figure()
    ax = axes[0, 0]
    seen: set[str] = set()
    for _run, frame in table.sort_values("tokens").groupby("run", sort=False):
        label = frame["label"].iloc[0]
        ax.plot(
            frame["val_loss"],
            frame[y],
            marker="o",
            markersize=4,
            color=palette[label],
            label=plan.describe_label(label) if label not in seen else None,
        )
        ax.plot(
            frame["val_loss"].iloc[-1], frame[y].iloc[-1], marker="*", markersize=12, color=palette[label]
        )
        seen.add(label)
    ax.set_xlabel("validation loss (nats/token)")
    ax.set_ylabel(pr_axis_label(convention, "over layers and heads"))
    handles, texts = ax.get_legend_handles_labels()
    order = [texts.index(plan.describe_label(lab)) for lab in labels]
    figure_legend(
        fig,
        [handles[i] for i in order],
        [texts[i] for i in order],
        title="configuration (one line per run)",
        title_fontsize=8,
    )
    suptitle(
        fig,
        f"Effective rank of the {VECTORS[which]} against validation loss",
        subtitle(measurement, "points: checkpoints in training order, ★ = final"),
    )
    return fig
