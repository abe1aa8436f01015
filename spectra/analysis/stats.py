"""Statistics across heads, seeds and configurations of the plan's run matrix.

Three layers, as elsewhere in ``spectra``:

- **who is who**: :func:`data_class` and :func:`configuration_label` place a run in the plan's matrix
  (A1 … C2, or an "extra" configuration such as a frozen-gamma run); :func:`run_table` and
  :func:`plan_coverage` list the runs and which planned configurations are present or missing;
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

from spectra.analysis.metrics import participation_ratio
from spectra.cube import CENTERINGS, CONVENTIONS, DEFAULT_SITE, SITES, check_choice, head_dim_name
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


@dataclass(frozen=True)
class PlanConfiguration:
    """One cell of the plan's run matrix (seed 002, section 3.2)."""

    label: str
    qk_norm: str
    optimizer: str
    data_class: str
    purpose: str

    def describe(self) -> str:
        qk = "no QK-norm" if self.qk_norm == "none" else f"{self.qk_norm} QK-norm"
        return f"{qk}, {_optimizer_name(self.optimizer)}, {self.data_class} data"


@dataclass(frozen=True)
class PlannedPair:
    """A comparison of the plan (seed 002, section 4): ``a`` minus ``b``."""

    a: str
    b: str
    question: str

    @property
    def name(self) -> str:
        return f"{self.a} vs {self.b}"


PLAN = (
    PlanConfiguration("A1", "learned", "muon", "standard", "baseline"),
    PlanConfiguration("A2", "none", "muon", "standard", "isolates the QK-norm effect"),
    PlanConfiguration("B1", "learned", "adamw", "standard", "isolates the Muon effect"),
    PlanConfiguration("B2", "none", "adamw", "standard", "double control"),
    PlanConfiguration("C1", "learned", "muon", "simple", "data complexity: simple data"),
    PlanConfiguration("C2", "learned", "muon", "complex", "data complexity: complex data"),
)
PLAN_BY_LABEL = {c.label: c for c in PLAN}
PLAN_PAIRS = (
    PlannedPair("A1", "A2", "Does QK-norm cause or only report collapse?"),
    PlannedPair("A1", "B1", "Does Muon change the spectral structure?"),
    PlannedPair("C1", "C2", "Is collapse data-adaptive?"),
    PlannedPair("B1", "B2", "Does QK-norm act the same under AdamW? (the double control)"),
)


def _optimizer_name(optimizer: str) -> str:
    return {"muon": "Muon+AdamW", "adamw": "AdamW"}.get(optimizer, optimizer)


# --------------------------------------------------------------------------------------------------
# Who is who: data class, configuration label, run table, plan coverage
# --------------------------------------------------------------------------------------------------


def data_class(name: str, *, simple_data: Iterable[str] = (), complex_data: Iterable[str] = ()) -> str:
    """Classify a dataset name as ``"simple"``, ``"complex"`` or ``"standard"`` data.

    Explicit overrides win: a name listed in ``simple_data`` is simple, one in ``complex_data`` is
    complex (a name in both is an error). Otherwise a documented heuristic on the lower-cased name:
    containing ``"bbe"`` or ``"simple"`` -> simple (the Bible in Basic English); containing ``"kjv"`` or
    ``"complex"`` -> complex (the King James Version); anything else -> standard. A name matching both
    heuristics (for example ``bible-bbe-kjv-mix``) is standard: it is neither subset.

    Parameters
    ----------
    name
        The dataset name recorded in the cube's ``data`` attribute (a path's last component is used).
    simple_data, complex_data
        Dataset names (or paths) to force into the simple or complex class.

    Examples
    --------
    >>> data_class("data/bible-bbe"), data_class("bible-kjv"), data_class("bible-mix")
    ('simple', 'complex', 'standard')
    >>> data_class("cosmo-a", complex_data=["cosmo-a"])
    'complex'
    """
    key = _dataset_key(name)
    simple = {_dataset_key(n) for n in simple_data}
    complex_ = {_dataset_key(n) for n in complex_data}
    if key in simple and key in complex_:
        raise SpectraError(f"dataset {name!r} is listed both as simple and as complex data")
    if key in simple:
        return "simple"
    if key in complex_:
        return "complex"
    low = key.lower()
    is_simple = "bbe" in low or "simple" in low
    is_complex = "kjv" in low or "complex" in low
    if is_simple and not is_complex:
        return "simple"
    if is_complex and not is_simple:
        return "complex"
    return "standard"


def _dataset_key(name: str) -> str:
    # the cube records the dataset directory; compare by its last path component
    return str(name).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def configuration_label(qk_norm: str, optimizer: str, data_cls: str) -> str:
    """The plan's label (``"A1"`` … ``"C2"``) of a configuration, or a descriptive "extra" label.

    Examples
    --------
    >>> configuration_label("learned", "muon", "standard")
    'A1'
    >>> configuration_label("frozen", "muon", "standard")
    'extra: frozen QK-norm, Muon+AdamW, standard data'
    """
    for c in PLAN:
        if (c.qk_norm, c.optimizer, c.data_class) == (qk_norm, optimizer, data_cls):
            return c.label
    return "extra: " + PlanConfiguration("", qk_norm, optimizer, data_cls, "").describe()


def describe_label(label: str) -> str:
    """A legend entry: ``"A1: learned QK-norm, Muon+AdamW, standard data"``; extras are already descriptive."""
    c = PLAN_BY_LABEL.get(label)
    return f"{label}: {c.describe()}" if c else label


def label_order(labels: Iterable[str]) -> list[str]:
    """Labels in the plan's order (A1, A2, B1, B2, C1, C2), extras after them alphabetically."""
    unique = set(labels)
    planned = [c.label for c in PLAN if c.label in unique]
    return planned + sorted(unique - set(planned))


def as_runs(ds: xr.Dataset) -> xr.Dataset:
    """Give a single cube a ``run`` dimension with its metadata as coordinates (a stack is returned as is).

    ``spectra.cube.open_cubes`` stacks cubes along ``run`` with ``qk_norm``, ``optimizer``, ``seed``
    and ``data`` as coordinates on ``run``; a cube opened on its own keeps them as global attributes.
    """
    if "run" in ds.dims:
        missing = [c for c in ("qk_norm", "optimizer", "seed", "data") if c not in ds.coords]
        if missing:
            raise SpectraError(f"run-stacked dataset lacks the run coordinates {missing}")
        return ds
    missing = [a for a in ("qk_norm", "optimizer", "seed", "data") if a not in ds.attrs]
    if missing:
        raise SpectraError(f"cube {ds.attrs.get('run_name', '?')!r} lacks the global attributes {missing}")
    name = str(ds.attrs.get("run_name", "run"))
    out = ds.expand_dims(run=[name])
    for key in ("qk_norm", "optimizer", "data"):
        out = out.assign_coords({key: ("run", [str(ds.attrs[key])])})
    return out.assign_coords(seed=("run", [int(ds.attrs["seed"])]))


def run_table(
    ds: xr.Dataset, *, simple_data: Iterable[str] = (), complex_data: Iterable[str] = ()
) -> pd.DataFrame:
    """One row per run: its metadata, data class and configuration label.

    The label and data class of a run that came from a study directory are the study's (``label`` and
    ``data_class`` coordinates on ``run``, set by the report from ``study.json``); otherwise the data
    class comes from the dataset's name (:func:`data_class`) and the label from the plan
    (:func:`configuration_label`). ``plan_cell`` is the plan's configuration (``A1`` … ``C2``, or an
    "extra" description) that the run's QK-norm, optimizer and data class make, whatever its label: it
    is how the plan's comparisons find a study's configurations.

    Columns: ``run``, ``qk_norm``, ``optimizer``, ``seed``, ``data``, ``data_class``, ``label``,
    ``plan_cell``, ``in_plan``, ``final_step``, ``final_tokens``, ``n_checkpoints``.
    """
    ds = as_runs(ds)
    simple_data, complex_data = list(simple_data), list(complex_data)
    measured = measured_steps(ds)
    rows = []
    for i, run in enumerate(ds["run"].values):
        meta = {k: ds[k].values[i].item() for k in ("qk_norm", "optimizer", "seed", "data")}
        cls = _coord_at(ds, "data_class", i) or data_class(
            str(meta["data"]), simple_data=simple_data, complex_data=complex_data
        )
        cell = configuration_label(str(meta["qk_norm"]), str(meta["optimizer"]), cls)
        label = _coord_at(ds, "label", i) or cell
        present = measured.isel(run=i)
        steps = ds["step"].values[present.values]
        final_step = int(steps[-1]) if len(steps) else None
        tokens = tokens_of(ds).isel(run=i)
        final_tokens = token_count(tokens.sel(step=final_step).item()) if final_step is not None else None
        rows.append(
            {
                "run": str(run),
                **{k: (int(v) if k == "seed" else str(v)) for k, v in meta.items()},
                "data_class": cls,
                "label": label,
                "plan_cell": cell,
                "in_plan": cell in PLAN_BY_LABEL,
                "final_step": final_step,
                "final_tokens": final_tokens,
                "n_checkpoints": len(steps),
            }
        )
    return pd.DataFrame(rows)


def _coord_at(ds: xr.Dataset, name: str, i: int) -> str:
    """A string ``run`` coordinate's value for run ``i`` ("" where absent or empty)."""
    if name not in ds.coords:
        return ""
    value = ds[name].values[i]
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def plan_cell_label(runs: pd.DataFrame, cell: str) -> str:
    """The runs' label of a plan cell (``A2``): a study's own name for it, or the cell where no label or
    several map onto it (``runs`` has ``label`` and ``plan_cell`` columns, as :func:`run_table` gives)."""
    labels = set(runs.loc[runs["plan_cell"] == cell, "label"].astype(str))
    return next(iter(labels)) if len(labels) == 1 else cell


def resolve_pairs(runs: pd.DataFrame, pairs: Sequence[PlannedPair] = PLAN_PAIRS) -> list[PlannedPair]:
    """The plan's pairs in terms of the runs' own labels.

    A study may name its configurations as it likes (``muon-qk``); the plan's comparison A1 vs A2 is
    then between the configurations whose QK-norm, optimizer and data class make the cells A1 and A2
    (``plan_cell`` of :func:`run_table`). A pair keeps the plan's labels where no run maps onto a cell,
    or where several labels do (so that it is reported as not possible rather than guessed).

    Examples
    --------
    >>> runs = pd.DataFrame({"label": ["muon-qk", "muon-noqk"], "plan_cell": ["A1", "A2"]})
    >>> [p.name for p in resolve_pairs(runs)][:1]
    ['muon-qk vs muon-noqk']
    """
    out = []
    for p in pairs:
        a, b = plan_cell_label(runs, p.a), plan_cell_label(runs, p.b)
        question = p.question if (a, b) == (p.a, p.b) else f"{p.question} (the plan's {p.a} vs {p.b})"
        out.append(PlannedPair(a, b, question))
    return out


def plan_coverage(runs: pd.DataFrame) -> pd.DataFrame:
    """Which configurations of the plan's matrix are present (with their seeds) and which are missing.

    ``runs`` is :func:`run_table`'s output. One row per planned configuration (matched by ``plan_cell``, so
    a study's own labels count), then one per extra configuration found among the runs. Columns:
    ``label`` (the runs' labels, or the plan's where none), ``plan_cell``, ``qk_norm``, ``optimizer``,
    ``data_class``, ``purpose``, ``status`` (``present``, ``missing`` or ``extra``), ``n_seeds``, ``seeds``,
    ``runs``.
    """
    rows = []
    for c in PLAN:
        sel = runs[runs["plan_cell"] == c.label]
        rows.append(
            {
                "label": ", ".join(sorted(set(sel["label"]))) or c.label,
                "plan_cell": c.label,
                "qk_norm": c.qk_norm,
                "optimizer": c.optimizer,
                "data_class": c.data_class,
                "purpose": c.purpose,
                "status": "present" if len(sel) else "missing",
                "n_seeds": sel["seed"].nunique(),
                "seeds": ", ".join(str(s) for s in sorted(sel["seed"].unique())),
                "runs": ", ".join(sel["run"]),
            }
        )
    extras = runs[~runs["in_plan"]]
    for label in label_order(extras["label"]):
        sel = extras[extras["label"] == label]
        first = sel.iloc[0]
        rows.append(
            {
                "label": label,
                "plan_cell": first["plan_cell"],
                "qk_norm": first["qk_norm"],
                "optimizer": first["optimizer"],
                "data_class": first["data_class"],
                "purpose": "not in the plan's matrix",
                "status": "extra",
                "n_seeds": sel["seed"].nunique(),
                "seeds": ", ".join(str(s) for s in sorted(sel["seed"].unique())),
                "runs": ", ".join(sel["run"]),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Numbers per run
# --------------------------------------------------------------------------------------------------


def token_count(value: float | None) -> int | None:
    """A checkpoint's token count as an integer, None where it is unknown (NaN or None: a public model
    without a tokens rule, see docs/public-models.md).

    >>> token_count(np.float64(2.5e7)), token_count(np.nan)
    (25000000, None)
    """
    if value is None or np.isnan(float(value)):
        return None
    return int(value)


def tokens_of(ds: xr.Dataset) -> xr.DataArray:
    """Training tokens at each (run, step); ``tokens`` may be a (step) or a (run, step) coordinate."""
    ds = as_runs(ds)
    if "tokens" not in ds.coords and "tokens" not in ds:
        raise SpectraError("dataset has no 'tokens' coordinate")
    return ds["tokens"].broadcast_like(ds["run"]).transpose("run", "step")


def measured_steps(ds: xr.Dataset) -> xr.DataArray:
    """Boolean (run, step): whether the run has a checkpoint at that step.

    Stacked runs share the union of their steps; a step a run never had is all-NaN in its spectra.
    The ``proj`` site is measured for every model, so it decides.
    """
    ds = as_runs(ds)
    k = ds["k_sv"].sel(site="proj", centering="uncentered")
    return k.notnull().any([d for d in k.dims if d not in ("run", "step")]).transpose("run", "step")


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
    check_choice("site", site, SITES)
    check_choice("convention", convention, CONVENTIONS)
    check_choice("centering", centering, CENTERINGS)
    head_dim_name(which)
    sv = ds[f"{which}_sv"].sel(site=site, centering=centering)
    pr = participation_ratio(sv, convention=convention, dim="sv")
    pr.attrs.update(site=site, centering=centering, which=which)
    return pr


def final_checkpoint(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Select each run's own final checkpoint from a (run, step, …) array; ``step`` and ``tokens`` become (run).

    A run without any checkpoint is an error naming it.
    """
    measured = measured_steps(ds)
    empty = [str(r) for r, m in zip(measured["run"].values, measured.values) if not m.any()]
    if empty:
        raise SpectraError(f"runs without any checkpoint in their cube: {empty}")
    # index of the last measured step of every run
    last = measured.shape[1] - 1 - np.argmax(measured.values[:, ::-1], axis=1)
    out = da.isel(step=xr.DataArray(last, dims="run"))
    return out.assign_coords(tokens=("run", tokens_of(ds).values[np.arange(len(last)), last]))


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
    measured = measured_steps(ds)
    tokens = tokens_of(ds)
    rows = []
    for i, run in enumerate(ds["run"].values):
        for j, step in enumerate(ds["step"].values):
            if not measured.values[i, j]:
                continue
            rows.append(
                {
                    "run": str(run),
                    "label": runs.loc[str(run), "label"],
                    "seed": int(runs.loc[str(run), "seed"]),
                    "step": int(step),
                    "tokens": token_count(tokens.values[i, j]),
                    "pr_sv": float(means["sv"].values[i, j]),
                    "pr_eig": float(means["eig"].values[i, j]),
                    "train_loss": _loss_at(ds, "train_loss", i, j),
                    "val_loss": _loss_at(ds, "val_loss", i, j),
                }
            )
    return pd.DataFrame(rows)


def _loss_at(ds: xr.Dataset, name: str, i: int, j: int) -> float:
    if name not in ds:
        return math.nan
    return float(ds[name].broadcast_like(ds["run"]).transpose("run", "step").values[i, j])


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
        if np.all(va == va[0]) and np.all(vb == vb[0]):
            notes.append("no variation across seeds in either group: Welch's t-test is undefined")
        else:
            res = scipy.stats.ttest_ind(va, vb, equal_var=False)
            welch_t, welch_p = float(res.statistic), float(res.pvalue)
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
    pairs: Sequence[PlannedPair] = PLAN_PAIRS,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """Run :func:`compare_groups` on the per-seed headline values of each planned pair.

    ``summaries`` is :func:`run_summaries`' output. A pair with a configuration absent from the runs
    gets a row whose ``reading`` says which one is missing. Columns: ``pair``, ``question``, then the
    fields of :class:`Comparison`.
    """
    rows = []
    present = set(summaries["label"])
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
                    "reading": f"not possible: {' and '.join(missing)} not among the runs",
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


def sensitivity_table(
    ds: xr.Dataset,
    pairs: Sequence[PlannedPair] = PLAN_PAIRS,
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
