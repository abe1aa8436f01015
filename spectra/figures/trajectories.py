"""The study's figures: one function per figure, each taking xarray/pandas inputs and returning a Figure.

Every figure is meant to be read without the code: a title that says what is compared, a subtitle that
says what was measured (keys or queries, read-out site, centring, participation-ratio convention,
checkpoint), axis labels with units and conventions, and a legend naming configurations by the plan's
labels (A1 … C2) with what they are. Colours follow the configuration, the same in every figure.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``:
no global state, no display needed, nothing kept alive after the caller drops the figure, and importing
this module does not change a notebook's backend. :func:`save_figure` writes PNG and SVG atomically.

A figure that has nothing to show (no data-complexity pair, no learned gamma, no surgery) raises
:class:`~spectra.errors.SpectraError` saying why, instead of drawing empty axes.

Kinds (:data:`FIGURE_KINDS`): ``trajectory``, ``heatmap``, ``waterfall``, ``data-complexity``,
``surgery``, ``gamma``, ``loss``, ``pr-vs-loss``. See docs/figures.md for how to read each.

No torch here.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from spectra import cube
from spectra.analysis import checkpoints, plan, stats
from spectra.analysis import gamma as gamma_analysis
from spectra.errors import SpectraError
from spectra.fileio import atomic_write

FIGURE_KINDS = (
    "trajectory",
    "heatmap",
    "waterfall",
    "data-complexity",
    "surgery",
    "gamma",
    "loss",
    "pr-vs-loss",
)
DPI = 150
FIGURE_SOFTWARE = "collapse-spectra (matplotlib)"
"""Software tag in every figure's metadata (PNG ``Software``, SVG ``Creator``): how a later ``plot`` knows
a file at its output path is a figure it may replace, and not a user's."""
SEED_BAND = ("pi", 100)
"""Band over seeds in line plots: the full range (min to max) of the per-seed values."""
STRATEGY_COLORS = {"svd": "#1b9e77", "gamma": "#d95f02", "random": "#7570b3"}
STRATEGY_NAMES = {
    "svd": "SVD: smallest singular directions of the keys",
    "gamma": "gamma: smallest |gamma_j|",
    "random": "random coordinates (mean of the draws)",
}
_WHAT = {"k": "keys", "q": "queries"}
_ONE = {"k": "key", "q": "query"}


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


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


def label_palette(labels: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """A colour per configuration label, fixed by the plan's order so every figure agrees."""
    planned = [c.label for c in plan.PLAN]
    base = sns.color_palette("colorblind", 10)
    extras = [lab for lab in plan.label_order(labels) if lab not in planned]
    colors = {lab: base[i] for i, lab in enumerate(planned)}
    colors.update({lab: base[(len(planned) + i) % len(base)] for i, lab in enumerate(extras)})
    return colors


def _legend_names(labels: Iterable[str], seeds: dict[str, int] | None = None) -> dict[str, str]:
    """Legend entries; with ``seeds``, each says how many seeds its line is the mean of (``n=2 seeds``)."""
    names = {}
    for lab in labels:
        name = plan.describe_label(lab)
        if seeds is not None and lab in seeds:
            name += f" (n={seeds[lab]} seed{'s' if seeds[lab] != 1 else ''})"
        names[lab] = name
    return names


def _subtitle(which: str, site: str, centering: str, convention: str | None = None, extra: str = "") -> str:
    parts = [_WHAT[which], f"site {site}", centering.replace("centered", "centred")]
    if convention:
        parts.append(f"PR {cube.CONVENTION_NAMES[convention]}")
    if extra:
        parts.append(extra)
    return " · ".join(parts)


def _pr_label(convention: str) -> str:
    return f"participation ratio ({cube.CONVENTION_NAMES[convention]})"


def _pr_axis_label(convention: str, scope: str, mean: bool = True) -> str:
    """A y-axis label for a PR, on three short lines, so that it fits the axes' height however tall the
    legend below them is."""
    return f"{'mean ' if mean else ''}participation ratio\n({cube.CONVENTION_NAMES[convention]})\n{scope}"


def _title(fig: Figure, title: str, *subtitles: str) -> None:
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


def _tokens_axis(ax) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_tokens(x)))
    ax.set_xlabel("training tokens")


def _labelled(ds: xr.Dataset, simple_data: Iterable[str], complex_data: Iterable[str]) -> pd.DataFrame:
    return plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")


def _seed_lineplot(ax, df: pd.DataFrame, x: str, y: str, labels: Sequence[str], **kwargs) -> str:
    """Line per configuration (mean over its seeds) with the seed range as a band; returns the legend title.

    A configuration with one seed has no band (seaborn draws none for a single value), and the legend
    says so: every entry carries its number of seeds, and the title names the band only where there is one.
    """
    seeds = df.groupby("label")["run"].nunique().to_dict() if "run" in df else None
    names = _legend_names(labels, seeds)
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


def _legend_below(ax, title: str = "configuration") -> None:
    """Move the axes' legend under the plot, where it hides no data."""
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    handles, texts = ax.get_legend_handles_labels()
    if handles:
        figure_legend(ax.figure, handles, texts, title=title, title_fontsize=8)


def _require(df: pd.DataFrame, what: str, why: str) -> None:
    if df.empty:
        raise SpectraError(f"nothing to plot for the {what} figure: {why}")


# --------------------------------------------------------------------------------------------------
# Figures of the cubes
# --------------------------------------------------------------------------------------------------


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
    table = stats.checkpoint_table(
        ds, site=site, centering=centering, which=which, simple_data=simple_data, complex_data=complex_data
    )
    y = f"pr_{convention}"
    cube.check_choice("convention", convention, cube.CONVENTIONS)
    table = table.dropna(subset=[y])
    _require(table, "trajectory", f"no defined PR at site {site!r} ({centering}) in any run")
    table = table.dropna(subset=["tokens"])  # public models without a tokens rule: no place on this axis
    _require(table, "trajectory", "no checkpoint has a known token count (public models: --tokens-per-step)")
    labels = plan.label_order(table["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = _seed_lineplot(ax, table, "tokens", y, labels)
    _tokens_axis(ax)
    ax.set_ylabel(_pr_axis_label(convention, "over layers and heads"))
    _legend_below(ax, title)
    _title(
        fig,
        f"Effective rank of the {_WHAT[which]} during training",
        _subtitle(which, site, centering, convention),
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
    runs = _labelled(ds, simple_data, complex_data)
    one = ds.sel(run=[run])
    pr = stats.head_pr(one, site=site, convention=convention, centering=centering, which=which)
    measured = checkpoints.measured_steps(one).isel(run=0).values
    tokens = checkpoints.tokens_of(one).isel(run=0).values[measured]
    steps = one["step"].values[measured]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an undefined layer stays NaN (blank cell)
        grid = (
            pr.isel(run=0, step=np.flatnonzero(measured))
            .mean(cube.head_dim_name(which))
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
    _title(
        fig,
        f"Participation ratio of the {_WHAT[which]} per layer: run {run}",
        plan.describe_label(label),
        _subtitle(
            which, site, centering, convention, f"mean over heads, colour scale 1 … head_dim = {head_dim}"
        ),
    )
    return fig


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
    cube.check_choice("site", site, cube.SITES)
    cube.check_choice("centering", centering, cube.CENTERINGS)
    runs = _labelled(ds, simple_data, complex_data)
    sv = ds[f"{which}_sv"].sel(site=site, centering=centering)
    if layer is not None:
        if layer not in ds["layer"].values:
            raise SpectraError(f"layer {layer} not in the cubes (layers 0 … {ds.sizes['layer'] - 1})")
        sv = sv.sel(layer=[layer])
    final = checkpoints.final_checkpoint(sv, ds)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ratio = (final / final.max("sv")).mean(["layer", cube.head_dim_name(which)])
    df = (
        ratio.drop_vars([c for c in ratio.coords if c not in ("run", "sv")])
        .to_dataframe(name="ratio")
        .reset_index()
    )
    df = df.dropna(subset=["ratio"])
    _require(df, "waterfall", f"no defined spectrum at site {site!r} ({centering})")
    df["index"] = df["sv"] + 1
    df["label"] = df["run"].map(runs["label"])
    labels = plan.label_order(df["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = _seed_lineplot(ax, df, "index", "ratio", labels, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i (descending)")
    ax.set_ylabel("σ_i / σ_1 (mean over heads)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(ax, title)
    where = f"layer {layer}" if layer is not None else "mean over layers"
    _title(
        fig,
        f"Singular-value spectrum of the {_WHAT[which]} at the final checkpoint",
        _subtitle(which, site, centering, None, where),
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
    runs = _labelled(ds, simple_data, complex_data)
    present = set(runs["plan_cell"])  # a study's own labels count for the plan's cells
    if not {"C1", "C2"} <= present:
        missing = sorted({"C1", "C2"} - present)
        raise SpectraError(
            "the data-complexity figure needs runs of C1 (learned QK-norm, Muon, simple data) and C2 (the same "
            f"on complex data); missing: {', '.join(missing)}. Runs' datasets: "
            f"{', '.join(sorted(set(runs['data'])))} (name them with --simple-data / --complex-data)"
        )
    keep = runs.index[runs["plan_cell"].isin(["C1", "C2"])].tolist()
    sub = ds.sel(run=keep)
    values = stats.head_values(sub, site=site, convention=convention, centering=centering, which=which)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = values.mean(cube.head_dim_name(which))
    df = (
        per_layer.drop_vars([c for c in per_layer.coords if c not in ("run", "layer")])
        .to_dataframe(name="pr")
        .reset_index()
        .dropna(subset=["pr"])
    )
    _require(df, "data-complexity", f"no defined PR at site {site!r} for C1 or C2")
    df["label"] = df["run"].map(runs["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    pair = [
        lab
        for cell in ("C1", "C2")
        for lab in plan.label_order(runs.loc[runs["plan_cell"] == cell, "label"])
    ]
    title = _seed_lineplot(ax, df, "layer", "pr", pair)
    ax.set_xlabel("layer")
    ax.set_ylabel(_pr_axis_label(convention, "mean over heads", mean=False))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(ax, title)
    _title(
        fig,
        "Does data complexity change the rank? C1 (simple) vs C2 (complex), per layer",
        _subtitle(which, site, centering, convention, "final checkpoint"),
    )
    return fig


def loss_curves(
    ds: xr.Dataset, *, simple_data: Iterable[str] = (), complex_data: Iterable[str] = ()
) -> Figure:
    """Training and validation loss against tokens: colour = configuration, line style = split."""
    ds = checkpoints.as_runs(ds)
    runs = _labelled(ds, simple_data, complex_data)
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
    _require(df, "loss", "the cubes hold no train_loss or val_loss values")
    df["label"] = df["run"].map(runs["label"])
    labels = plan.label_order(df["label"])
    fig, axes = new_figure()
    ax = axes[0, 0]
    title = _seed_lineplot(
        ax, df, "tokens", "loss", labels, style="split", style_order=["train", "validation"]
    )
    _tokens_axis(ax)
    ax.set_ylabel("loss (nats/token)")
    _legend_below(ax, title.replace("configuration", "configuration / split", 1))
    _title(
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
    cube.check_choice("convention", convention, cube.CONVENTIONS)
    table = stats.checkpoint_table(
        ds, site=site, centering=centering, which=which, simple_data=simple_data, complex_data=complex_data
    )
    y = f"pr_{convention}"
    table = table.dropna(subset=[y, "val_loss"])
    _require(
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
    ax.set_ylabel(_pr_axis_label(convention, "over layers and heads"))
    handles, texts = ax.get_legend_handles_labels()
    order = [texts.index(plan.describe_label(lab)) for lab in labels]
    figure_legend(
        fig,
        [handles[i] for i in order],
        [texts[i] for i in order],
        title="configuration (one line per run)",
        title_fontsize=8,
    )
    _title(
        fig,
        f"Effective rank of the {_WHAT[which]} against validation loss",
        _subtitle(which, site, centering, convention, "points: checkpoints in training order, ★ = final"),
    )
    return fig


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
    runs = _labelled(ds, simple_data, complex_data)
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
            ax.set_ylabel(f"share of the head's {_ONE[which]} energy\nin coordinate j (site {site})")
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
    _title(fig, f"Does the QK-norm gain track the importance of the {_ONE[which]} coordinates?", extra)
    return fig


# --------------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------------


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
    _title(fig, "Pruning surgery: which key dimensions can be removed?", sub)
    return fig


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
