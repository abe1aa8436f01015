"""What every figure is built with: the canvas, the saving, colours, legends, titles and axis labels.

Every figure is meant to be read without the code: a title that says what is compared, a subtitle that
says what was measured (keys or queries, read-out site, centring, participation-ratio convention,
checkpoint), axis labels with units and conventions, and a legend naming configurations by the plan's
labels (A1 … C2) with what they are. Colours follow the configuration, the same in every figure
(:func:`label_palette`).

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas (:func:`new_figure`), never through
``pyplot``: no global state, no display needed, nothing kept alive after the caller drops the figure, and
importing a figure module does not change a notebook's backend. :func:`save_figure` writes PNG and SVG
atomically. A figure that has nothing to show raises :class:`~spectra.errors.SpectraError` saying why
(:func:`require_rows`), instead of drawing empty axes.

The figure families build on this module: [`trajectories`][spectra.figures.trajectories],
[`final_checkpoint`][spectra.figures.final_checkpoint], [`gamma`][spectra.figures.gamma],
[`surgery`][spectra.figures.surgery], [`dynamics`][spectra.figures.dynamics], [`evals`][spectra.figures.evals],
[`sweep`][spectra.figures.sweep]; [`kinds`][spectra.figures.kinds] lists those ``collapse-spectra plot`` draws.
No torch here.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from spectra.analysis import plan
from spectra.cube import CONVENTION_NAMES, Measurement
from spectra.errors import SpectraError
from spectra.fileio import atomic_write, check_writable

DPI = 150
FIGURE_SOFTWARE = "collapse-spectra (matplotlib)"
"""Software tag in every figure's metadata (PNG ``Software``, SVG ``Creator``): how a later ``plot`` knows
a file at its output path is a figure it may replace, and not a user's."""
SEED_BAND = ("pi", 100)
"""Band over seeds in line plots: the full range (min to max) of the per-seed values."""
VECTORS = {"k": "keys", "q": "queries"}
"""What ``which`` measures, in a title."""
VECTOR = {"k": "key", "q": "query"}
"""The same in the singular, in a label."""


def new_figure(width: float = 7.5, height: float = 4.8, *, nrows: int = 1, ncols: int = 1, **subplot_kw):
    """A constrained-layout Figure on the Agg canvas and its axes (``squeeze=False`` grid)."""
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike) -> list[Path]:
    """Write ``fig`` as PNG and SVG beside each other, each atomically; returns both paths.

    ``path`` may end in ``.png``, ``.svg`` or have no suffix: ``figures/trajectory.png`` writes
    ``figures/trajectory.png`` and ``figures/trajectory.svg``. Any other suffix is an error.

    Examples
    --------
    >>> fig, axes = new_figure()
    >>> _ = axes[0, 0].plot([0, 1], [1, 0])
    >>> [p.suffix for p in save_figure(fig, tempfile.mkdtemp() + "/x.png")]  # doctest: +SKIP
    ['.png', '.svg']
    """
    written = []
    for target in figure_paths(path):
        fmt = target.suffix[1:]
        meta = {"Software": FIGURE_SOFTWARE} if fmt == "png" else {"Creator": FIGURE_SOFTWARE}
        # the format is given explicitly: the temporary name's suffix is not .png/.svg
        atomic_write(
            target,
            lambda tmp, fmt=fmt, meta=meta: fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta),
            suffix=".tmp",
        )
        written.append(target)
    return written


def figure_paths(path: str | os.PathLike) -> list[Path]:
    """The PNG and SVG files :func:`save_figure` writes for ``path`` (``.png``, ``.svg`` or no suffix)."""
    path = Path(path)
    if path.suffix.lower() in (".png", ".svg"):
        stem = path.with_suffix("")
    elif path.suffix == "":
        stem = path
    else:
        raise SpectraError(
            f"{path}: a figure is written as .png and .svg; give a path ending in .png or .svg"
        )
    return [stem.with_name(f"{stem.name}.{fmt}") for fmt in ("png", "svg")]


def is_own_figure(path: str | os.PathLike) -> bool:
    """Whether an existing PNG or SVG was written by :func:`save_figure` (its software tag says so)."""
    path = Path(path)
    head = path.read_bytes()[:8192]
    return FIGURE_SOFTWARE.encode() in head


def check_figure_output(path: str | os.PathLike, change: str = "choose another -o") -> list[Path]:
    """Check, before drawing, that :func:`save_figure` may write ``path``; return the PNG and SVG paths.

    A bad suffix, an unwritable place, or a file at either path that :func:`save_figure` did not write (a
    user's: it is never replaced) is a :class:`~spectra.errors.SpectraError`; ``change`` says what to do.
    """
    targets = figure_paths(path)
    for target in targets:  # suffix errors first, then a user's file at either path
        check_writable(target, "figure")
        if target.is_file() and not is_own_figure(target):
            raise SpectraError(
                f"{target} exists and was not written by collapse-spectra: refusing to replace it; {change}"
            )
    return targets


def label_palette(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per configuration label, fixed by the plan's order so every figure agrees."""
    planned = [c.label for c in plan.PLAN]
    base = sns.color_palette("colorblind", 10)
    extras = [lab for lab in plan.label_order(labels) if lab not in planned]
    colors = {lab: base[i] for i, lab in enumerate(planned)}
    colors.update({lab: base[(len(planned) + i) % len(base)] for i, lab in enumerate(extras)})
    return colors


def legend_names(labels: Iterable[str], seeds: dict[str, int] | None = None) -> dict[str, str]:
    """Legend entries; with ``seeds``, each says how many seeds its line is the mean of (``n=2 seeds``)."""
    names = {}
    for lab in labels:
        name = plan.describe_label(lab)
        if seeds is not None and lab in seeds:
            name += f" (n={seeds[lab]} seed{'s' if seeds[lab] != 1 else ''})"
        names[lab] = name
    return names


def subtitle(measurement: Measurement, extra: str = "", *, convention: bool = True) -> str:
    """What a figure measured, in one line: keys or queries, site, centring, the PR convention (unless
    ``convention`` is False: a figure of the spectrum itself), then ``extra``."""
    m = measurement
    parts = [VECTORS[m.which], f"site {m.site}", m.centering.replace("centered", "centred")]
    if convention:
        parts.append(f"PR {CONVENTION_NAMES[m.convention]}")
    if extra:
        parts.append(extra)
    return " · ".join(parts)


def pr_label(convention: str) -> str:
    return f"participation ratio ({CONVENTION_NAMES[convention]})"


def pr_axis_label(convention: str, scope: str, mean: bool = True) -> str:
    """A y-axis label for a PR, on three short lines, so that it fits the axes' height however tall the
    legend below them is."""
    return f"{'mean ' if mean else ''}participation ratio\n({CONVENTION_NAMES[convention]})\n{scope}"


def suptitle(fig: Figure, title: str, *subtitles: str) -> None:
    # wrap to the figure's width so that no line is clipped (about 11 characters per inch at 11 pt)
    width = max(40, int(fig.get_figwidth() * 11))
    lines = [textwrap.fill(title, width)] + [textwrap.fill(s, width) for s in subtitles if s]
    fig.suptitle("\n".join(lines), fontsize=11)


def format_tokens(n: float | None) -> str:
    """A token count for a label: ``0``, ``500k``, ``1.5M``, ``25M``, ``65.5k``; ``?`` where unknown (NaN)."""
    if n is None or math.isnan(float(n)):
        return "?"
    n = float(n)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def tokens_axis(ax) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_tokens(x)))
    ax.set_xlabel("training tokens")


def labelled_runs(ds: xr.Dataset, simple_data: Iterable[str], complex_data: Iterable[str]) -> pd.DataFrame:
    return plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")


def seed_lineplot(ax, df: pd.DataFrame, x: str, y: str, labels: Sequence[str], **kwargs) -> str:
    """Line per configuration (mean over its seeds) with the seed range as a band; returns the legend title.

    A configuration with one seed has no band (seaborn draws none for a single value), and the legend
    says so: every entry carries its number of seeds, and the title names the band only where there is one.
    """
    seeds = df.groupby("label")["run"].nunique().to_dict() if "run" in df else None
    names = legend_names(labels, seeds)
    palette = label_palette(labels)
    sns.lineplot(
        data=df.assign(configuration=df["label"].map(names)),
        x=x,
        y=y,
        hue="configuration",
        hue_order=[names[lab] for lab in labels],
        palette={names[lab]: palette[lab] for lab in labels},
        errorbar=SEED_BAND,
        marker="o",
        ax=ax,
        **kwargs,
    )
    if seeds and max(seeds.values()) >= 2:
        return "configuration: mean over seeds (band: range over the seeds)"
    return "configuration (one seed each: no band)" if seeds else "configuration"


def figure_legend(fig: Figure, handles: Sequence, texts: Sequence[str], ncols: int = 2, **kwargs) -> None:
    """A legend under the axes of ``fig``, in ``ncols`` columns if they fit the figure's width, else one.

    Long entries (a configuration's description and its number of seeds) in two columns can be wider
    than the figure, and a legend wider than its figure is clipped at both sides.
    """
    legend = fig.legend(handles, texts, loc="outside lower center", ncols=ncols, fontsize=8, **kwargs)
    if ncols > 1 and legend.get_window_extent(fig.canvas.get_renderer()).width > fig.bbox.width:
        legend.remove()
        fig.legend(handles, texts, loc="outside lower center", ncols=1, fontsize=8, **kwargs)


def legend_below(ax, title: str = "configuration") -> None:
    """Move the axes' legend under the plot, where it hides no data."""
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    handles, texts = ax.get_legend_handles_labels()
    if handles:
        figure_legend(ax.figure, handles, texts, title=title, title_fontsize=8)


def require_rows(df: pd.DataFrame, what: str, why: str) -> None:
    if df.empty:
        raise SpectraError(f"nothing to plot for the {what} figure: {why}")
