"""Statistics across heads, seeds and configurations of the plan's run matrix.

Who is who (the plan's matrix, each run's configuration label) is [`plan`][spectra.analysis.plan]; here:

- **numbers per run**: :func:`head_values` gives the participation ratio of every head at the final
  checkpoint, :func:`run_summaries` its mean with a bootstrap confidence interval over heads, and
  :func:`checkpoint_table` the mean at every checkpoint in both PR conventions;
- **comparisons**: :func:`compare_groups` tests two groups of per-seed means (Welch's t-test, and
  Mann-Whitney U from three seeds per side), :func:`compare_configurations` runs it for the plan's pairs
  (A1 vs A2, A1 vs B1, C1 vs C2, and the double control B1 vs B2), and :func:`sensitivity_table`
  recomputes the headline differences for every read-out site, PR convention and centring.

The **headline metric** of a run is the mean key participation ratio over layers and key/value heads
at the run's final checkpoint, singular-value convention, uncentred, at :data:`spectra.cube.DEFAULT_SITE`.
The unit of replication across runs is the **seed**: heads of one model are not independent replicates
of a training run, so a head-level interval never stands in for a test across seeds.

No I/O and no torch here; everything takes the run-stacked :class:`xarray.Dataset` that
``spectra.cube.open_cubes`` returns (a single cube without a ``run`` dimension is accepted too).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
import xarray as xr

from spectra.analysis.checkpoints import as_runs, final_checkpoint, measured_steps, token_count, tokens_of
from spectra.analysis.metrics import participation_ratio
from spectra.analysis.plan import PlannedPair, cell_labels, label_order, plan_pairs, resolve_pairs, run_table
from spectra.cube import CENTERINGS, CONVENTIONS, DEFAULT_SITE, SITES, Measurement, head_dim_name
from spectra.errors import SpectraError

CONFIDENCE = 0.95
N_RESAMPLES = 10_000
"""Bootstrap resamples of every confidence interval (percentile method)."""
BOOTSTRAP_SEED = 0
"""Seed of the bootstrap's random generator: the same inputs always give the same interval."""
ALPHA = 0.05
"""Significance level used only for the wording of a comparison's reading; p-values are always shown."""

ONE_SEED_SENTENCE = (
    "n=1 seed per configuration: no test across seeds is possible; the head-level CI describes "
    "within-model spread, not run-to-run variability"
)


def head_pr(
    ds: xr.Dataset,
    *,
    site: str = DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
) -> xr.DataArray:
    """Participation ratio of every head at every checkpoint: (run, step, layer, kv_head|head).

    Parameters
    ----------
    ds
        Run-stacked cubes (or one cube).
    site, convention, centering
        Read-out site (``proj``, ``unit``, ``normed``, ``rope``), PR convention (``sv``: (Σσ)²/Σσ²,
        the source documents' formula; ``eig``: (Σσ²)²/Σσ⁴) and centring of the spectra.
    which
        ``"k"`` for keys, ``"q"`` for queries.
    """
    ds = as_runs(ds)
    measurement = Measurement(which=which, site=site, centering=centering, convention=convention)
    pr = participation_ratio(measurement.spectra(ds), convention=convention, dim="sv")
    pr.attrs.update(site=site, centering=centering, which=which)
    return pr


def head_values(
    ds: xr.Dataset,
    *,
    site: str = DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
) -> xr.DataArray:
    """PR of every head at each run's final checkpoint: (run, layer, kv_head|head)."""
    ds = as_runs(ds)
    return final_checkpoint(
        head_pr(ds, site=site, convention=convention, centering=centering, which=which), ds
    )


def bootstrap_mean_ci(
    values: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap confidence interval.

    NaNs are dropped first (a head whose spectrum is undefined). Fewer than two values give a NaN
    interval; identical values give a zero-width interval.

    Examples
    --------
    >>> m, lo, hi = bootstrap_mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    >>> m, lo <= m <= hi
    (2.5, True)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    if np.all(v == v[0]):
        return mean, mean, mean
    res = scipy.stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def run_summaries(
    ds: xr.Dataset,
    *,
    site: str = DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Per run: the headline metric (mean PR over layers and heads at the final checkpoint) and its CI.

    The interval is a percentile bootstrap over the run's heads (every (layer, head) pair is one unit,
    resampled with replacement): it describes how much the mean depends on which heads the model has,
    not how much it would change with another training seed.

    Columns: ``run``, ``label``, ``seed``, ``qk_norm``, ``optimizer``, ``data``, ``step``, ``tokens``,
    ``n_heads``, ``mean``, ``ci_low``, ``ci_high``, ``site``, ``convention``, ``centering``.
    """
    ds = as_runs(ds)
    runs = run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    values = head_values(ds, site=site, convention=convention, centering=centering, which=which)
    rows = []
    for i, run in enumerate(values["run"].values):
        v = values.isel(run=i).values
        mean, lo, hi = bootstrap_mean_ci(v, n_resamples=n_resamples, seed=seed)
        meta = runs.loc[str(run)]
        rows.append(
            {
                "run": str(run),
                "label": meta["label"],
                "plan_cell": meta["plan_cell"],
                "seed": int(meta["seed"]),
                "qk_norm": meta["qk_norm"],
                "optimizer": meta["optimizer"],
                "muon_qkvo": meta["muon_qkvo"],
                "weights_dtype": meta["weights_dtype"],
                "data": meta["data"],
                "step": int(values["step"].values[i]),
                "tokens": token_count(values["tokens"].values[i]),
                "n_heads": int(np.sum(~np.isnan(v))),
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
                "site": site,
                "convention": convention,
                "centering": centering,
            }
        )
    return pd.DataFrame(rows)


def seed_means(summaries: pd.DataFrame, label: str) -> pd.Series:
    """Per-seed headline values of one configuration (runs sharing a seed are averaged into one)."""
    sel = summaries[summaries["label"] == label]
    return sel.groupby("seed")["mean"].mean()


def configuration_summaries(
    summaries: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> pd.DataFrame:
    """Per configuration: mean of the per-seed means and a bootstrap CI over seeds.

    ``summaries`` is :func:`run_summaries`' output. With one seed the interval is NaN and ``note``
    says so; with two seeds a percentile bootstrap can only return the range of the two values, which
    ``note`` also says. Columns: ``label``, ``n_seeds``, ``seeds``, ``mean``, ``sd``, ``ci_low``,
    ``ci_high``, ``note``.
    """
    rows = []
    for label in label_order(summaries["label"]):
        per_seed = seed_means(summaries, label)
        mean, lo, hi = bootstrap_mean_ci(per_seed.values, n_resamples=n_resamples, seed=seed)
        n = len(per_seed)
        if n < 2:
            note = "one seed: no interval across seeds"
        elif n == 2:
            note = "two seeds: the interval is the range of the two seed means"
        else:
            note = ""
        rows.append(
            {
                "label": label,
                "n_seeds": n,
                "seeds": ", ".join(str(s) for s in per_seed.index),
                "mean": mean,
                "sd": float(per_seed.std(ddof=1)) if n >= 2 else math.nan,
                "ci_low": lo,
                "ci_high": hi,
                "note": note,
            }
        )
    return pd.DataFrame(rows)


def checkpoint_table(
    ds: xr.Dataset,
    *,
    site: str = DEFAULT_SITE,
    centering: str = "uncentered",
    which: str = "k",
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> pd.DataFrame:
    """Mean PR over layers and heads for every run at every checkpoint, in both conventions.

    Columns: ``run``, ``label``, ``seed``, ``step``, ``tokens``, ``pr_sv``, ``pr_eig``, ``train_loss``,
    ``val_loss``; rows only for steps the run has.
    """
    ds = as_runs(ds)
    runs = run_table(ds, simple_data=simple_data, complex_data=complex_data).set_index("run")
    heads = ["layer", head_dim_name(which)]
    means = {
        conv: head_pr(ds, site=site, convention=conv, centering=centering, which=which).mean(heads)
        for conv in CONVENTIONS
    }
    # each (run, step) array computed once: under dask a .values in the loop recomputed its whole graph
    pr = {conv: m.values for conv, m in means.items()}
    measured, tokens = measured_steps(ds).values, tokens_of(ds).values
    losses = {name: _loss_values(ds, name) for name in ("train_loss", "val_loss")}
    rows = []
    for i, run in enumerate(ds["run"].values):
        for j, step in enumerate(ds["step"].values):
            if not measured[i, j]:
                continue
            rows.append(
                {
                    "run": str(run),
                    "label": runs.loc[str(run), "label"],
                    "seed": int(runs.loc[str(run), "seed"]),
                    "step": int(step),
                    "tokens": token_count(tokens[i, j]),
                    "pr_sv": float(pr["sv"][i, j]),
                    "pr_eig": float(pr["eig"][i, j]),
                    "train_loss": float(losses["train_loss"][i, j]),
                    "val_loss": float(losses["val_loss"][i, j]),
                }
            )
    return pd.DataFrame(rows)


def _loss_values(ds: xr.Dataset, name: str) -> np.ndarray:
    """``ds[name]`` as a (run, step) array; NaN where the cube has no such loss."""
    if name not in ds:
        return np.full((ds.sizes["run"], ds.sizes["step"]), math.nan)
    return ds[name].broadcast_like(ds["run"]).transpose("run", "step").values


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Two groups of per-seed values: the difference of their means and the tests that apply.

    ``diff`` is ``mean_a - mean_b``. ``welch_*`` is NaN with fewer than two seeds on either side;
    ``mwu_*`` is NaN with fewer than three. ``reading`` states the result in words, ``note`` what could
    not be done and why.
    """

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    diff_ci_low: float
    diff_ci_high: float
    welch_t: float
    welch_p: float
    mwu_u: float
    mwu_p: float
    tests: str
    reading: str
    note: str


def welch_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's t statistic and two-sided p (``scipy.stats.ttest_ind(equal_var=False)``) of two groups of at least
    two values each; NaN for both where neither group varies (the test is undefined). A constant group's
    variance is exactly 0, but scipy warns of "precision loss" for it (its check compares the values with their
    mean): that warning alone is silenced, here only."""
    if np.all(a == a[0]) and np.all(b == b[0]):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation", RuntimeWarning)
        res = scipy.stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def compare_groups(
    a: Sequence[float],
    b: Sequence[float],
    *,
    name_a: str = "a",
    name_b: str = "b",
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    alpha: float = ALPHA,
) -> Comparison:
    """Compare two groups of per-seed values (one value per training seed).

    - both groups with >= 2 seeds: Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) and the
      difference of means with a percentile-bootstrap CI (seeds resampled within each group);
    - both groups with >= 3 seeds: also the two-sided Mann-Whitney U test;
    - fewer than two seeds on either side: only the difference of means, and :data:`ONE_SEED_SENTENCE`
      (or its n=1-on-one-side variant) in ``note``.

    Examples
    --------
    >>> c = compare_groups([10.0, 11.0, 10.5], [20.0, 21.0, 20.5], name_a="A1", name_b="A2")
    >>> round(c.diff, 2), c.welch_p < 0.01
    (-10.0, True)
    >>> compare_groups([10.0], [20.0]).note == ONE_SEED_SENTENCE
    True
    """
    va = np.asarray(a, dtype=np.float64)
    vb = np.asarray(b, dtype=np.float64)
    va, vb = va[~np.isnan(va)], vb[~np.isnan(vb)]
    if va.size == 0 or vb.size == 0:
        empty = name_a if va.size == 0 else name_b
        raise SpectraError(f"no values for {empty}: cannot compare {name_a} with {name_b}")
    mean_a, mean_b = float(va.mean()), float(vb.mean())
    diff = mean_a - mean_b
    nan = math.nan
    welch_t = welch_p = mwu_u = mwu_p = lo = hi = nan
    tests: list[str] = []
    notes: list[str] = []
    if va.size < 2 or vb.size < 2:
        if va.size == 1 and vb.size == 1:
            notes.append(ONE_SEED_SENTENCE)
        else:
            single = name_a if va.size == 1 else name_b
            notes.append(
                f"n=1 seed for {single}: no test across seeds is possible; the head-level CI describes "
                "within-model spread, not run-to-run variability"
            )
        reading = f"{name_a} − {name_b} = {diff:+.3g} (single seed; not a test)"
    else:
        lo, hi = _bootstrap_diff_ci(va, vb, n_resamples=n_resamples, seed=seed)
        welch_t, welch_p = welch_test(va, vb)
        if np.isnan(welch_p):
            notes.append("no variation across seeds in either group: Welch's t-test is undefined")
        else:
            tests.append("Welch's t-test on per-seed means")
        if va.size >= 3 and vb.size >= 3:
            res = scipy.stats.mannwhitneyu(va, vb, alternative="two-sided")
            mwu_u, mwu_p = float(res.statistic), float(res.pvalue)
            tests.append("Mann-Whitney U (two-sided)")
        else:
            notes.append("Mann-Whitney U needs >= 3 seeds per configuration")
        if np.isnan(welch_p):
            reading = f"{name_a} − {name_b} = {diff:+.3g}; no test possible"
        elif welch_p < alpha:
            relation = "lower than" if diff < 0 else "higher than"
            reading = f"{name_a} {relation} {name_b} (Welch p = {welch_p:.2g})"
        else:
            reading = f"no difference detected at α = {alpha:g} (Welch p = {welch_p:.2g})"
    return Comparison(
        n_a=int(va.size),
        n_b=int(vb.size),
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        diff_ci_low=lo,
        diff_ci_high=hi,
        welch_t=welch_t,
        welch_p=welch_p,
        mwu_u=mwu_u,
        mwu_p=mwu_p,
        tests="; ".join(tests) if tests else "none",
        reading=reading,
        note="; ".join(notes),
    )


def _bootstrap_diff_ci(a: np.ndarray, b: np.ndarray, *, n_resamples: int, seed: int) -> tuple[float, float]:
    if np.all(a == a[0]) and np.all(b == b[0]):
        d = float(a[0] - b[0])
        return d, d
    res = scipy.stats.bootstrap(
        (a, b),
        lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis),
        vectorized=True,
        paired=False,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare_configurations(
    summaries: pd.DataFrame,
    pairs: Sequence[PlannedPair] | None = None,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Run :func:`compare_groups` on the per-seed headline values of each planned pair.

    ``summaries`` is :func:`run_summaries`' output; ``pairs`` defaults to
    :func:`~spectra.analysis.plan.plan_pairs` of them (the plan's, and the replication pairs present). A pair
    with a configuration absent from the runs gets a row whose ``reading`` says which one is missing. Columns: ``pair``, ``question``, then the
    fields of :class:`Comparison`.
    """
    rows = []
    present = set(summaries["label"])
    if pairs is None:
        pairs = plan_pairs(summaries)
    if "plan_cell" in summaries:
        pairs = resolve_pairs(summaries, pairs)
    for pair in pairs:
        base = {"pair": pair.name, "question": pair.question}
        missing = [lab for lab in (pair.a, pair.b) if lab not in present]
        if missing:
            rows.append(
                {
                    **base,
                    "n_a": int(seed_means(summaries, pair.a).size),
                    "n_b": int(seed_means(summaries, pair.b).size),
                    "reading": _not_possible(summaries, missing),
                    "tests": "none",
                    "note": "",
                }
            )
            continue
        c = compare_groups(
            seed_means(summaries, pair.a).values,
            seed_means(summaries, pair.b).values,
            name_a=pair.a,
            name_b=pair.b,
            n_resamples=n_resamples,
            seed=seed,
        )
        rows.append({**base, **c.__dict__})
    columns = ["pair", "question", *Comparison.__dataclass_fields__]
    return pd.DataFrame(rows).reindex(columns=columns)


def _not_possible(summaries: pd.DataFrame, missing: Sequence[str]) -> str:
    """Why a pair cannot be compared: its configurations are absent, or a plan cell is made by several of a
    study's configurations (e.g. one at the swept rate and a control at another), which is not guessed."""
    several = {}
    if "plan_cell" in summaries:
        several = {cell: ls for cell in missing if len(ls := cell_labels(summaries, cell)) > 1}
    absent = [lab for lab in missing if lab not in several]
    reasons = [f"{' and '.join(absent)} not among the runs"] if absent else []
    reasons += [f"{cell} is made by several configurations ({', '.join(ls)})" for cell, ls in several.items()]
    return "not possible: " + "; ".join(reasons)


def sensitivity_table(
    ds: xr.Dataset,
    pairs: Sequence[PlannedPair] | None = None,
    *,
    which: str = "k",
    sites: Sequence[str] = SITES,
    conventions: Sequence[str] = CONVENTIONS,
    centerings: Sequence[str] = CENTERINGS,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
) -> pd.DataFrame:
    """The headline comparison recomputed for every read-out site × PR convention × centring.

    One row per variant (``site``, ``convention``, ``centering``); one column per planned pair present
    among the runs holding ``mean(a) - mean(b)`` (means over seeds of the headline metric). If no
    planned pair is present, the columns are the configurations' means instead, so a reader still sees
    how much the numbers move. A NaN means the variant is undefined for a run, e.g. the ``unit`` site of a
    run without QK-norm. The difference's sign is what to look at: a sign that flips between rows means
    the conclusion depends on the measurement choice.
    """
    ds = as_runs(ds)
    runs = run_table(ds, simple_data=simple_data, complex_data=complex_data)
    present = set(runs["label"])
    pairs = plan_pairs(runs) if pairs is None else pairs
    active = [p for p in resolve_pairs(runs, pairs) if p.a in present and p.b in present]
    labels = label_order(present)
    heads = ["layer", head_dim_name(which)]
    rows = []
    for site in sites:
        for convention in conventions:
            for centering in centerings:
                with warnings.catch_warnings():
                    # the mean of an all-NaN slice (unit site without QK-norm) is NaN, as intended
                    warnings.simplefilter("ignore", RuntimeWarning)
                    per_run = final_checkpoint(
                        head_pr(ds, site=site, convention=convention, centering=centering, which=which), ds
                    ).mean(heads)
                frame = runs.assign(mean=per_run.values)
                by_label = {
                    lab: frame[frame["label"] == lab].groupby("seed")["mean"].mean().mean() for lab in labels
                }
                row = {"site": site, "convention": convention, "centering": centering}
                if active:
                    row.update({p.name: by_label[p.a] - by_label[p.b] for p in active})
                else:
                    row.update({lab: by_label[lab] for lab in labels})
                rows.append(row)
    return pd.DataFrame(rows)
