"""The learning-rate sweep of a study: final validation loss against the swept rate, the choice marked.

A pure function of the tables :class:`spectra.study.Study` reads from ``sweep.json``; no torch, no I/O.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from spectra.errors import SpectraError
from spectra.figures.toolkit import figure_legend, label_palette, new_figure, suptitle

__all__ = ["lr_sweep", "swept_rate"]


def swept_rate(table: pd.DataFrame, optimizers: dict[str, str]) -> pd.Series:
    """The rate a sweep moves, per row: ``optim.muon_lr`` for a Muon configuration, ``optim.lr`` for AdamW."""
    muon = table["label"].map(optimizers).eq("muon")
    return table["muon_lr"].where(muon, table["lr"]).astype(float)


def lr_sweep(table: pd.DataFrame, configurations: pd.DataFrame, study: str = "") -> Figure:
    """Final validation loss of every sweep run against its learning rate, one line per configuration.

    ``table`` is :meth:`spectra.study.Study.sweep_table`, ``configurations`` :meth:`~spectra.study.Study.
    configurations`. x is the swept rate on a log scale (Muon's rate for Muon configurations, AdamW's for
    AdamW ones, so the two families sit apart); the chosen run of each configuration is a star; a run that
    diverged (or has no finite loss) is an ``x`` on the top edge, where its loss would be off the scale.

    Raises :class:`SpectraError` when no sweep run has finished.
    """
    if table.empty:
        raise SpectraError("nothing to plot for the learning-rate figure: the study has no sweep runs")
    optimizers = dict(zip(configurations["label"], configurations["optimizer"]))
    df = table.assign(rate=swept_rate(table, optimizers))
    finite = df[np.isfinite(df["final_val_loss"])]
    if finite.empty:
        raise SpectraError(
            "nothing to plot for the learning-rate figure: no sweep run has a final validation loss yet"
        )
    labels = [lab for lab in configurations["label"] if lab in set(df["label"])]
    palette = label_palette(labels)
    fig, axes = new_figure()
    ax = axes[0, 0]
    top = finite["final_val_loss"].max()
    for label in labels:
        runs = df[df["label"] == label].sort_values("rate")
        ok = runs[np.isfinite(runs["final_val_loss"])]
        color = palette[label]
        ax.plot(
            ok["rate"],
            ok["final_val_loss"],
            marker="o",
            markersize=4,
            color=color,
            label=f"{label} ({optimizers[label]})",
        )
        chosen = ok[ok["chosen"]]
        ax.scatter(
            chosen["rate"],
            chosen["final_val_loss"],
            marker="*",
            s=160,
            color=color,
            edgecolors="black",
            zorder=4,
        )
        bad = runs[~np.isfinite(runs["final_val_loss"]) & runs["status"].eq("diverged")]
        ax.scatter(bad["rate"], np.full(len(bad), top), marker="x", s=40, color=color, zorder=4)
    ax.scatter(
        [], [], marker="*", s=160, color="white", edgecolors="black", label="chosen (lowest final val loss)"
    )
    ax.scatter([], [], marker="x", s=40, color="black", label="diverged (drawn at the top edge)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a log axis crowd each other
    ax.set_xlabel("swept learning rate (Muon: optim.muon_lr; AdamW: optim.lr)")
    ax.set_ylabel("validation loss at the end of the sweep run\n(nats/token)")
    figure_legend(fig, *ax.get_legend_handles_labels())
    n = len(df)
    suptitle(
        fig,
        f"Learning-rate sweep{' of ' + study if study else ''}: one short run per point",
        f"{n} sweep run(s), one seed each: a single draw per learning rate, no interval",
    )
    return fig
