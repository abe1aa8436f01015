"""When does collapse happen: every run's PR trajectory and loss curve fitted, breakpoints across seeds, plateaus.

Applies the continuous piecewise-linear fit of [`piecewise`][spectra.analysis.piecewise] (the model, the search,
the BIC choice, what counts as "sudden" and as a loss plateau, and their limits are stated there) to every run of
a set of cubes: :func:`breakpoint_table` for the participation ratio (the mean over layers and heads, and each
layer), :func:`loss_breakpoint_table` for the validation loss, :func:`plateau_coincidence` for whether a PR
breakpoint falls in a loss plateau, :func:`breakpoint_spread` for how much the main breakpoint moves between the
seeds of a configuration. Pure functions over cubes, no I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
import xarray as xr

from spectra import cube
from spectra.analysis import checkpoints, plan, stats
from spectra.analysis.piecewise import (
    MAX_BREAKPOINTS,
    PiecewiseFit,
    fit_piecewise,
    plateau_segments,
    sudden_segment,
)
from spectra.errors import SpectraError

__all__ = [
    "breakpoint_spread",
    "breakpoint_table",
    "loss_breakpoint_table",
    "loss_fits",
    "plateau_coincidence",
    "trajectory_fits",
]


def _series_rows(fit: PiecewiseFit | None, n_points: int, note: str = "") -> dict:
    """The columns every breakpoint table shares, from one fit (NaN where there is none)."""
    row: dict = {"n_points": n_points, "n_breakpoints": pd.NA, "note": note}
    for j in range(MAX_BREAKPOINTS):
        row[f"breakpoint_{j + 1}"] = math.nan
    for j in range(MAX_BREAKPOINTS + 1):
        row[f"slope_{j}"] = math.nan
    row.update(
        {
            "main_breakpoint": math.nan,
            "slope_before": math.nan,
            "slope_after": math.nan,
            "net_change": math.nan,
            "sudden": pd.NA,
            "sudden_start": math.nan,
            "sudden_end": math.nan,
            "residual_sd": math.nan,
            **{f"bic_{k}": math.nan for k in range(MAX_BREAKPOINTS + 1)},
        }
    )
    if fit is None:
        return row
    tokens = fit.breakpoint_tokens
    slopes = fit.slopes
    for j, t in enumerate(tokens):
        row[f"breakpoint_{j + 1}"] = t
    for j, s in enumerate(slopes):
        row[f"slope_{j}"] = s
    main = fit.main_breakpoint
    if main is not None:
        row.update(main_breakpoint=tokens[main], slope_before=slopes[main], slope_after=slopes[main + 1])
    f = fit.predict(fit.knots)
    sudden = sudden_segment(fit)
    knots_tokens = 10.0**fit.knots
    row.update(
        n_breakpoints=fit.n_breakpoints,
        net_change=float(f[-1] - f[0]),
        sudden=sudden is not None,
        sudden_start=knots_tokens[sudden] if sudden is not None else math.nan,
        sudden_end=knots_tokens[sudden + 1] if sudden is not None else math.nan,
        residual_sd=fit.residual_sd,
        **{f"bic_{k}": b for k, b in enumerate(fit.bic)},
    )
    return row


def _fit_or_note(
    tokens: np.ndarray, values: np.ndarray, **fit_kwargs
) -> tuple[PiecewiseFit | None, int, str]:
    usable = int(np.sum((tokens > 0) & np.isfinite(values) & np.isfinite(tokens)))
    try:
        return fit_piecewise(tokens, values, **fit_kwargs), usable, ""
    except SpectraError as e:
        return None, usable, str(e)


def trajectory_fits(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    **fit_kwargs,
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, PiecewiseFit | None, str]]:
    """The PR trajectory of every run, mean and per layer, with its fit: ``{(run, series): (tokens, pr, fit, note)}``.

    ``series`` is ``"all"`` (mean over layers and heads) or the layer index as a string; ``fit`` is None, and
    ``note`` says why, where the run has too few checkpoints.
    """
    ds = checkpoints.as_runs(ds)
    pr = stats.head_pr(ds, site=site, convention=convention, centering=centering, which=which)
    heads = cube.head_dim_name(which)
    per_layer = pr.mean(heads).transpose("run", "step", "layer")  # (R, S, L)
    mean = pr.mean([heads, "layer"]).transpose("run", "step")  # (R, S)
    measured = checkpoints.measured_steps(ds).values
    tokens = checkpoints.tokens_of(ds).values
    out = {}
    for i, run in enumerate(ds["run"].values):
        t = tokens[i][measured[i]]
        series = [("all", mean.values[i][measured[i]])]
        series += [
            (str(layer), per_layer.values[i, :, j][measured[i]]) for j, layer in enumerate(ds["layer"].values)
        ]
        for name, values in series:
            fit, _, note = _fit_or_note(t, values, **fit_kwargs)
            out[(str(run), name)] = (t, values, fit, note)
    return out


def breakpoint_table(
    ds: xr.Dataset,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
    **fit_kwargs,
) -> pd.DataFrame:
    """Breakpoints of every run's PR trajectory: the mean over layers and heads, and each layer.

    What the "When does collapse happen?" section shows per run: the number of breakpoints BIC chose, where they
    are, the slopes before and after, and whether the trajectory has a sudden drop by the rule of
    :func:`sudden_segment`. Read ``slope_*`` as PR change per decade of tokens (``slope_0`` before the first
    breakpoint); ``main_breakpoint`` is the breakpoint with the largest change of slope, and ``slope_before``,
    ``slope_after`` are the slopes on either side of it.

    Returns
    -------
    pandas.DataFrame
        One row per (run, series), series ``all`` first, then each layer. Columns: ``run, label, seed, series,
        n_points, n_breakpoints, breakpoint_1, breakpoint_2`` (tokens), ``slope_0, slope_1, slope_2``,
        ``main_breakpoint, slope_before, slope_after, net_change`` (fitted last minus first), ``sudden,
        sudden_start, sudden_end`` (tokens), ``residual_sd, bic_0, bic_1, bic_2, note`` (why a series could not
        be fitted), and ``metric, site, centering``.
    """
    ds = checkpoints.as_runs(ds)
    runs = plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    fits = trajectory_fits(
        ds, site=site, convention=convention, centering=centering, which=which, **fit_kwargs
    )
    rows = []
    for (run, series), (tokens, values, fit, note) in fits.items():
        usable = int(np.sum((tokens > 0) & np.isfinite(values)))
        rows.append(
            {
                "run": run,
                "label": runs.loc[run, "label"],
                "seed": int(runs.loc[run, "seed"]),
                "series": series,
                **_series_rows(fit, usable, note),
                "metric": f"pr_{convention}",
                "site": site,
                "centering": centering,
            }
        )
    return pd.DataFrame(rows)


def loss_fits(
    ds: xr.Dataset, loss: str = "val_loss", **fit_kwargs
) -> dict[str, tuple[np.ndarray, np.ndarray, PiecewiseFit | None, str]]:
    """Every run's loss curve with its fit: ``{run: (tokens, loss, fit, note)}``."""
    ds = checkpoints.as_runs(ds)
    if loss not in ds:
        raise SpectraError(f"the cubes have no {loss!r} variable")
    measured = checkpoints.measured_steps(ds).values
    tokens = checkpoints.tokens_of(ds).values
    values = ds[loss].transpose("run", "step").values
    out = {}
    for i, run in enumerate(ds["run"].values):
        t, v = tokens[i][measured[i]], values[i][measured[i]]
        fit, _, note = _fit_or_note(t, v, **fit_kwargs)
        out[str(run)] = (t, v, fit, note)
    return out


def loss_breakpoint_table(
    ds: xr.Dataset,
    loss: str = "val_loss",
    *,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
    **fit_kwargs,
) -> pd.DataFrame:
    """The same fit for every run's loss curve (validation loss by default), with its plateaus.

    Returns
    -------
    pandas.DataFrame
        One row per run, the columns of :func:`breakpoint_table` (``series`` is the loss name; ``sudden`` there
        means a sudden drop of the loss) and ``plateaus``: the plateau segments of :func:`plateau_segments` as
        a list of ``(start, end)`` token pairs.
    """
    ds = checkpoints.as_runs(ds)
    runs = plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    rows = []
    for run, (tokens, values, fit, note) in loss_fits(ds, loss, **fit_kwargs).items():
        usable = int(np.sum((tokens > 0) & np.isfinite(values)))
        plateaus = []
        if fit is not None:
            knots = 10.0**fit.knots
            plateaus = [(float(knots[j]), float(knots[j + 1])) for j in plateau_segments(fit)]
        rows.append(
            {
                "run": run,
                "label": runs.loc[run, "label"],
                "seed": int(runs.loc[run, "seed"]),
                "series": loss,
                **_series_rows(fit, usable, note),
                "plateaus": plateaus,
            }
        )
    return pd.DataFrame(rows)


def plateau_coincidence(ranks: pd.DataFrame, losses: pd.DataFrame) -> pd.DataFrame:
    """Does each rank breakpoint fall in a loss plateau? One row per breakpoint of :func:`breakpoint_table`.

    Parameters
    ----------
    ranks
        :func:`breakpoint_table`'s output (any series).
    losses
        :func:`loss_breakpoint_table`'s output for the same runs.

    Returns
    -------
    pandas.DataFrame
        Columns ``run, label, seed, series, breakpoint`` (1 or 2), ``tokens``, ``main`` (the breakpoint with the
        largest change of slope), ``in_loss_plateau`` (the tokens lie in a plateau segment of the run's loss
        fit; ``<NA>`` where the loss could not be fitted), ``plateau_start, plateau_end`` (tokens, NaN if not in
        one), ``nearest_loss_breakpoint`` (tokens) and ``decades_to_loss_breakpoint`` (signed: rank minus loss,
        in decades of tokens).

    Notes
    -----
    The section should say, per configuration, how many of its runs have a rank breakpoint inside a loss
    plateau, e.g. "2 of 3 seeds: the main PR breakpoint at 4M tokens falls in the loss plateau 2M-8M", and that
    a loss fit with no breakpoint has no plateau by this rule.
    """
    losses = losses.set_index("run")
    rows = []
    for _, r in ranks.iterrows():
        for j in range(1, MAX_BREAKPOINTS + 1):
            t = r[f"breakpoint_{j}"]
            if not np.isfinite(t):
                continue
            loss = losses.loc[r["run"]] if r["run"] in losses.index else None
            row = {
                "run": r["run"],
                "label": r["label"],
                "seed": r["seed"],
                "series": r["series"],
                "breakpoint": j,
                "tokens": t,
                "main": bool(np.isclose(t, r["main_breakpoint"])),
                "in_loss_plateau": pd.NA,
                "plateau_start": math.nan,
                "plateau_end": math.nan,
                "nearest_loss_breakpoint": math.nan,
                "decades_to_loss_breakpoint": math.nan,
            }
            if loss is not None and not pd.isna(loss["n_breakpoints"]):
                inside = [(a, b) for a, b in loss["plateaus"] if a <= t <= b]
                row["in_loss_plateau"] = bool(inside)
                if inside:
                    row["plateau_start"], row["plateau_end"] = inside[0]
                loss_points = [loss[f"breakpoint_{i}"] for i in range(1, MAX_BREAKPOINTS + 1)]
                loss_points = [p for p in loss_points if np.isfinite(p)]
                if loss_points:
                    nearest = min(loss_points, key=lambda p: abs(math.log10(t / p)))
                    row["nearest_loss_breakpoint"] = nearest
                    row["decades_to_loss_breakpoint"] = math.log10(t / nearest)
            rows.append(row)
    columns = [
        "run", "label", "seed", "series", "breakpoint", "tokens", "main", "in_loss_plateau", "plateau_start",
        "plateau_end", "nearest_loss_breakpoint", "decades_to_loss_breakpoint",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def breakpoint_spread(ranks: pd.DataFrame, series: str = "all") -> pd.DataFrame:
    """Spread of the main breakpoint across the seeds of each configuration, for one series.

    Returns
    -------
    pandas.DataFrame
        One row per configuration label (plan order): ``label, n_seeds, n_with_breakpoint, n_sudden,
        geometric_mean`` (tokens, over the seeds that have one), ``sd_decades`` (standard deviation of
        log10 tokens, ddof 1; NaN below two), ``min, max`` (tokens), ``n_breakpoints`` (the count per seed, e.g.
        ``"1, 1, 2"``).

    Notes
    -----
    The section should state the geometric mean and the spread in decades, and the count of seeds that have
    a breakpoint at all: "A1: 3 of 3 seeds, main breakpoint at 3.1M tokens (sd 0.12 decades), sudden in 2".
    """
    sel = ranks[ranks["series"] == series]
    rows = []
    for label in plan.label_order(sel["label"]):
        g = sel[sel["label"] == label].sort_values("seed")
        t = g["main_breakpoint"].to_numpy(dtype=np.float64)
        t = t[np.isfinite(t)]
        logs = np.log10(t)
        rows.append(
            {
                "label": label,
                "n_seeds": int(g["seed"].nunique()),
                "n_with_breakpoint": int(t.size),
                "n_sudden": int(g["sudden"].fillna(False).astype(bool).sum()),
                "geometric_mean": float(10.0 ** logs.mean()) if t.size else math.nan,
                "sd_decades": float(logs.std(ddof=1)) if t.size >= 2 else math.nan,
                "min": float(t.min()) if t.size else math.nan,
                "max": float(t.max()) if t.size else math.nan,
                "n_breakpoints": ", ".join(str(n) for n in g["n_breakpoints"].tolist()),
            }
        )
    return pd.DataFrame(rows)
