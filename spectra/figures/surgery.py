"""The pruning-surgery figure: test loss against the fraction of key dimensions removed, per strategy.

Built from surgery files ([`surgery`][spectra.surgery]) with [`toolkit`][spectra.figures.toolkit]. No torch here.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from spectra.errors import SpectraError
from spectra.figures.toolkit import figure_legend, format_tokens, new_figure, suptitle

__all__ = ["STRATEGY_COLORS", "STRATEGY_NAMES", "surgery_curve", "surgery_curves"]

STRATEGY_COLORS = {"svd": "#1b9e77", "gamma": "#d95f02", "random": "#7570b3"}
STRATEGY_NAMES = {
    "svd": "SVD: smallest singular directions of the keys",
    "gamma": "gamma: smallest |gamma_j|",
    "random": "random coordinates (mean of the draws)",
}


def surgery_curve(surgery: xr.Dataset, strategy: str) -> pd.DataFrame:
    """One strategy's test loss per fraction: the mean over its draws, their range and their number.

    ``min`` and ``max`` are the lowest and highest draw (equal to the mean for the deterministic
    strategies, which have one draw); no interval is estimated from so few draws.
    """
    loss = surgery["loss"].sel(strategy=strategy).transpose("fraction", "seed").values
    n = np.sum(~np.isnan(loss), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN fraction: NaN everywhere
        mean, low, high = np.nanmean(loss, axis=1), np.nanmin(loss, axis=1), np.nanmax(loss, axis=1)
    return pd.DataFrame(
        {"fraction": surgery["fraction"].values, "mean": mean, "min": low, "max": high, "n": n}
    )


def _surgery_strategies(s: xr.Dataset) -> list[str]:
    known = [st for st in ("svd", "gamma", "random") if st in s["strategy"].values]
    return known + [str(st) for st in s["strategy"].values if st not in STRATEGY_COLORS]


def _not_drawn_note(s: xr.Dataset, strategy: str) -> str:
    status = s.attrs.get("gamma_status", "") if strategy == "gamma" else ""
    if status.startswith("not applicable"):  # surgery's status already says so
        return f"{strategy}: {status}"
    return f"{strategy}: not applicable" + (f" ({status})" if status else "")


def _surgery_panel(ax, s: xr.Dataset, handles: dict[str, object]) -> None:
    """One run's panel: a line per strategy; for random every draw as a dot and their range as a band."""
    notes = []
    for strategy in _surgery_strategies(s):
        curve = surgery_curve(s, strategy).dropna(subset=["mean"])
        if curve.empty:
            notes.append(_not_drawn_note(s, strategy))
            continue
        color = STRATEGY_COLORS.get(strategy, "grey")
        x = 100 * curve["fraction"]
        (line,) = ax.plot(x, curve["mean"], marker="o", markersize=4, color=color)
        handles.setdefault(STRATEGY_NAMES.get(strategy, strategy), line)
        draws = s["loss"].sel(strategy=strategy).transpose("fraction", "seed").values
        n_max = int(curve["n"].max())
        if n_max >= 2:
            xs = np.repeat(100 * s["fraction"].values[:, None], draws.shape[1], axis=1)
            dots = ax.scatter(xs.ravel(), draws.ravel(), s=9, color=color, alpha=0.6, linewidths=0, zorder=3)
            band = ax.fill_between(x, curve["min"], curve["max"], color=color, alpha=0.15, linewidth=0)
            handles.setdefault(f"{strategy}: each draw (n = {n_max} seeds)", dots)
            handles.setdefault(f"{strategy}: range of the draws", band)
    if not ax.lines:
        raise SpectraError(
            f"nothing to plot for the surgery figure: run {s.attrs.get('run_name', '?')!r} has no finite loss"
        )
    base = ax.axhline(float(s["baseline_loss"]), color="black", linestyle="--", linewidth=1)
    handles.setdefault("unpruned model", base)
    head = f"{s.attrs.get('run_name', '?')}"
    if s.attrs.get("tokens") is not None:
        head += f", {format_tokens(s.attrs['tokens'])} tokens"
    if notes:
        # wrapped to the panel's width so that neighbouring titles never overlap
        head += "\n" + "\n".join(textwrap.fill(n, width=60) for n in notes)
    ax.set_title(head, fontsize=9)
    ax.set_xlabel("key dimensions removed per head (%)")
    ax.set_ylabel("test loss (nats/token)")


def surgery_curves(surgeries: xr.Dataset | Sequence[xr.Dataset]) -> Figure:
    """Test loss against the fraction of key dimensions pruned, one line per strategy; a panel per run.

    Input: datasets written by ``collapse-spectra surgery`` (``loss(strategy, fraction, seed)``,
    ``baseline_loss``). Deterministic strategies (gamma, svd) have one value per fraction. For random,
    every draw is shown as a dot, the line goes through their mean and the band is their range (lowest to
    highest draw), labelled with the number of draws: with a handful of seeds no interval of the mean is
    drawn, because one would claim more than the draws show. A strategy with no finite loss (gamma without
    QK-norm) is left out and its ``gamma_status`` shown.
    """
    items = [surgeries] if isinstance(surgeries, xr.Dataset) else list(surgeries)
    if not items:
        raise SpectraError("nothing to plot for the surgery figure: no surgery results given")
    for s in items:
        missing = [v for v in ("loss", "baseline_loss") if v not in s]
        if missing or "loss" in s and set(s["loss"].dims) != {"strategy", "fraction", "seed"}:
            raise SpectraError(
                f"surgery results of run {s.attrs.get('run_name', '?')!r} are not in the surgery schema "
                "(need loss(strategy, fraction, seed) and baseline_loss)"
            )
    ncols = min(3, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = new_figure(max(4.6 * ncols + 0.6, 7.0), 3.9 * nrows + 1.4, nrows=nrows, ncols=ncols)
    handles: dict[str, object] = {}
    for k, s in enumerate(items):
        _surgery_panel(axes[k // ncols, k % ncols], s, handles)
    for k in range(len(items), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    # as many legend columns as fit the figure's width: a single panel's legend must not be clipped
    figure_legend(fig, list(handles.values()), list(handles.keys()), ncols=min(2, ncols))
    test_tokens = {s.attrs.get("test_tokens") for s in items}
    sub = "loss on the held-out test split (never used for any SVD)"
    if len(test_tokens) == 1 and None not in test_tokens:
        sub += f", {format_tokens(next(iter(test_tokens)))} tokens"
    suptitle(fig, "Pruning surgery: which key dimensions can be removed?", sub)
    return fig
