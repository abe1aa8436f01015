"""Does rank predict reasoning: eval scores per configuration and seed, the plan's table D, PR against score.

What the report's "Does rank predict reasoning?" section shows, as tables (the figure is
[`pr_vs_score`][spectra.figures.evals.pr_vs_score]):

- :func:`score_table`: every run's score on every task at its final evaluated checkpoint, with a 95% interval
  ([`score_interval`][spectra.evals.results.score_interval]: Wilson for accuracies), the chance level and whether the
  interval contains it;
- :func:`table_d`: the 300M plan's table D (seed 003, section 4.D): configuration, seed, one column per task,
  and the difference between two configurations;
- :func:`rank_vs_score` and :func:`rank_score_correlation`: each run's headline PR beside its score, and the
  Spearman correlation across runs, with how many runs it rests on.

The seed is the unit of replication, as in [`stats`][spectra.analysis.stats]: a correlation over four runs says little,
and the functions say how many there are. No I/O and no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from spectra.analysis import checkpoints, plan, stats
from spectra.errors import SpectraError
from spectra.evals.results import eval_table

__all__ = ["rank_score_correlation", "rank_vs_score", "score_table", "table_d"]


def _run_labels(results: Sequence[dict[str, Any]], ds: xr.Dataset) -> list[str]:
    """The cube's run label of each evals file: matched by run directory, else by run name."""
    ds = checkpoints.as_runs(ds)
    runs = [str(r) for r in ds["run"].values]
    by_dir = {}
    if "path" in ds.coords:
        by_dir = {str(Path(str(p)).parent.resolve()): r for r, p in zip(runs, ds["path"].values)}
    labels = []
    for data in results:
        run_dir = data.get("run_dir") or str(Path(data.get("path", "")).parent)
        label = by_dir.get(str(Path(run_dir).resolve()))
        if label is None and data.get("run_name") in runs:
            label = str(data["run_name"])
        if label is None:
            raise SpectraError(
                f"{data.get('path', run_dir)}: eval results of run {data.get('run_name')!r}, which is not among the "
                "cubes given"
            )
        labels.append(label)
    return labels


def score_table(
    results: Sequence[dict[str, Any]],
    ds: xr.Dataset,
    *,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> pd.DataFrame:
    """Every run's scores at its final evaluated checkpoint, with configuration, seed, interval and chance.

    Parameters
    ----------
    results
        [`read_eval_results`][spectra.evals.results.read_eval_results] of each run.
    ds
        The runs' cubes ([`open_cubes`][spectra.cube.open_cubes]), for the configuration labels.

    Returns
    -------
    pandas.DataFrame
        [`eval_table`][spectra.evals.results.eval_table]'s columns for each run's last evaluated checkpoint, with
        ``run`` the cube's run label, plus ``label`` (A1 … C2), ``seed``, ``final_tokens`` (of the cube: when the
        evals are of an earlier checkpoint, ``tokens`` says so) and ``chance_in_interval``.

    Notes
    -----
    The section should say, per task: the scores with their intervals per configuration and seed; the chance
    level, and which scores are within it ("at chance" for a tiny model is the expected outcome, and then no
    comparison of rank and score is informative); the few-shot count and the number of documents.
    """
    ds = checkpoints.as_runs(ds)
    runs = plan.run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    labels = _run_labels(results, ds)
    parts = []
    for data, label in zip(results, labels):
        table = eval_table([data])
        if table.empty:
            continue
        last = table["tokens"].max()
        table = table[table["tokens"] == last].copy()
        table["run"] = label
        parts.append(table)
    if not parts:
        raise SpectraError("no eval results to tabulate")
    df = pd.concat(parts, ignore_index=True)
    df.insert(1, "label", df["run"].map(runs["label"]))
    df.insert(2, "seed", df["run"].map(runs["seed"]).astype(int))
    df["final_tokens"] = df["run"].map(runs["final_tokens"])
    chance = pd.to_numeric(df["chance"], errors="coerce")
    df["chance_in_interval"] = pd.array(
        [
            pd.NA if np.isnan(c) else bool(lo <= c <= hi)
            for c, lo, hi in zip(chance, df["ci_low"], df["ci_high"])
        ],
        dtype="boolean",
    )
    order = {lab: i for i, lab in enumerate(plan.label_order(df["label"]))}
    return (
        df.sort_values(["task", "metric"], kind="stable")
        .sort_values("label", key=lambda s: s.map(order), kind="stable")
        .reset_index(drop=True)
    )


def table_d(
    scores: pd.DataFrame,
    tasks: Sequence[str] = ("hellaswag", "lambada_openai"),
    *,
    metric: str = "acc",
    pair: tuple[str, str] = ("A2", "B1"),
) -> pd.DataFrame:
    """The 300M plan's table D: configuration, seed and one score column per task, then the difference.

    Parameters
    ----------
    scores
        :func:`score_table`'s output.
    tasks
        The columns: the plan's HellaSwag (10-shot) and LAMBADA (0-shot) by default; offline, the local tasks.
    metric
        The score of each task (``acc``: accuracy; LAMBADA's is the exact last-word accuracy).
    pair
        The difference row is the mean over seeds of ``pair[0]`` minus that of ``pair[1]``; the plan compares its
        "hero", Muon without QK-norm (A2), with AdamW and QK-norm (B1).

    Returns
    -------
    pandas.DataFrame
        Columns ``config, seed`` and per task ``<task>``, ``<task>_ci_low``, ``<task>_ci_high``; one row per run,
        then ``config = "difference A2 - B1"`` (seed empty) with the difference of the seed means and, with at
        least two seeds on each side, Welch's two-sided p-value in ``<task>_p`` (NaN otherwise). Cells of a task a
        run was not evaluated on are NaN.
    """
    sel = scores[(scores["metric"] == metric) & scores["task"].isin(tasks)]
    if sel.empty:
        raise SpectraError(f"no {metric} scores for the tasks {', '.join(tasks)}")
    rows = []
    for (label, seed, run), g in sel.groupby(["label", "seed", "run"], sort=False):
        row: dict[str, Any] = {
            "config": plan.describe_label(label),
            "label": label,
            "seed": seed,
            "run": run,
        }
        for task in tasks:
            t = g[g["task"] == task]
            row[task] = float(t["value"].iloc[0]) if len(t) else math.nan
            row[f"{task}_ci_low"] = float(t["ci_low"].iloc[0]) if len(t) else math.nan
            row[f"{task}_ci_high"] = float(t["ci_high"].iloc[0]) if len(t) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    a, b = pair
    diff: dict[str, Any] = {"config": f"difference {a} - {b}", "label": "", "seed": pd.NA, "run": ""}
    for task in tasks:
        va = table.loc[table["label"] == a, task].dropna().to_numpy()
        vb = table.loc[table["label"] == b, task].dropna().to_numpy()
        diff[task] = float(va.mean() - vb.mean()) if len(va) and len(vb) else math.nan
        diff[f"{task}_ci_low"] = diff[f"{task}_ci_high"] = math.nan
        p = math.nan
        if len(va) >= 2 and len(vb) >= 2:
            p = stats.welch_test(va, vb)[1]  # NaN where neither group varies
        diff[f"{task}_p"] = p
    out = pd.concat([table, pd.DataFrame([diff])], ignore_index=True)
    out.attrs = {"metric": metric, "pair": pair}
    return out


def rank_vs_score(
    summaries: pd.DataFrame, scores: pd.DataFrame, task: str, metric: str = "acc"
) -> pd.DataFrame:
    """Each run's headline PR beside its score on one task: the points of the PR-against-score figure.

    Parameters
    ----------
    summaries
        [`run_summaries`][spectra.analysis.stats.run_summaries] (or [`headline_with_null`][spectra.analysis.null.headline_with_null],
        whose ``fraction_of_null`` is then kept).
    scores
        :func:`score_table`'s output.
    task, metric
        The score.

    Returns
    -------
    pandas.DataFrame
        ``run, label, seed, pr, pr_ci_low, pr_ci_high`` (the PR and its interval over heads), ``fraction_of_null``
        when given, ``score, score_ci_low, score_ci_high, chance, tokens`` (of the PR) and ``eval_tokens``. Runs
        without a score on the task are left out.
    """
    s = scores[(scores["task"] == task) & (scores["metric"] == metric)].set_index("run")
    if s.empty:
        raise SpectraError(f"no {metric} scores for task {task!r}")
    rows = []
    for _, r in summaries.iterrows():
        if r["run"] not in s.index:
            continue
        e = s.loc[r["run"]]
        rows.append(
            {
                "run": r["run"],
                "label": r["label"],
                "seed": int(r["seed"]),
                "pr": float(r["mean"]),
                "pr_ci_low": float(r["ci_low"]),
                "pr_ci_high": float(r["ci_high"]),
                **({"fraction_of_null": float(r["fraction_of_null"])} if "fraction_of_null" in r else {}),
                "score": float(e["value"]),
                "score_ci_low": float(e["ci_low"]),
                "score_ci_high": float(e["ci_high"]),
                "chance": e["chance"],
                "tokens": int(r["tokens"]),
                "eval_tokens": int(e["tokens"]),
            }
        )
    out = pd.DataFrame(rows)
    out.attrs = {"task": task, "metric": metric, "convention": summaries["convention"].iloc[0]}
    return out


def rank_score_correlation(points: pd.DataFrame) -> dict[str, Any]:
    """Spearman's rank correlation of PR and score across runs, and what it rests on.

    Returns
    -------
    dict
        ``n_runs``, ``n_configurations``, ``rho``, ``p`` (two-sided, scipy.stats.spearmanr; NaN with fewer than
        three runs or a constant column) and ``note``: why the number cannot carry a conclusion when it cannot.

    Notes
    -----
    The section should say "Spearman rho = r over n runs (k configurations), p = ..." and, whatever rho, that runs
    of one configuration share everything but the seed, so n runs are not n independent tests of "higher rank,
    better model"; with scores at chance the correlation is of noise.
    """
    n = len(points)
    k = int(points["label"].nunique()) if n else 0
    rho = p = math.nan
    note = ""
    if n < 3:
        note = f"{n} run(s): a rank correlation needs at least three"
    elif points["pr"].nunique() < 2 or points["score"].nunique() < 2:
        note = "PR or score is the same in every run: no correlation to compute"
    else:
        result = scipy.stats.spearmanr(points["pr"], points["score"])
        rho, p = float(result.statistic), float(result.pvalue)
        if k < 3:
            note = f"{k} configuration(s): the correlation mixes seeds of very few configurations"
    if n and "chance" in points and pd.notna(points["chance"]).any():
        chance = pd.to_numeric(points["chance"], errors="coerce")
        at_chance = (points["score_ci_low"] <= chance) & (chance <= points["score_ci_high"])
        if at_chance.all():
            note = (note + "; " if note else "") + "every score's interval contains chance"
    return {"n_runs": n, "n_configurations": k, "rho": rho, "p": p, "note": note}
