"""Who is who: the plan's run matrix, the configuration label and data class of every run, and coverage.

:func:`data_class` and :func:`configuration_label` place a run in the plan's matrix (A1 … C2, or an "extra"
configuration such as a frozen-gamma run); :func:`run_table` lists the runs with their labels (a study's own
labels where the runs come from one), :func:`plan_coverage` which planned configurations are present or missing,
and :func:`resolve_pairs` the plan's comparisons in the runs' own labels; :func:`best_lr_table` is the 300M
plan's table of each configuration's chosen learning rates (from a study's sweep). Every table, figure and report section
that names a configuration goes through here, so that a run has one label everywhere. No I/O and no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from spectra.analysis.checkpoints import as_runs, measured_steps, token_count, tokens_of
from spectra.cube import DEFAULT_VARIANT
from spectra.errors import SpectraError

__all__ = [
    "PLAN",
    "PLAN_BY_LABEL",
    "PLAN_PAIRS",
    "PlanConfiguration",
    "PlannedPair",
    "VARIANT_CELLS",
    "VARIANT_PAIRS",
    "configuration_label",
    "optimizer_identity",
    "optimizer_name",
    "plan_pairs",
    "data_class",
    "describe_label",
    "label_order",
    "cell_labels",
    "plan_cell_label",
    "plan_coverage",
    "resolve_pairs",
    "best_lr_table",
    "run_table",
]


def optimizer_identity(
    optimizer: str, muon_qkvo: str = "separate", weights_dtype: str = "float32"
) -> tuple[str, ...]:
    """The optimizer with what changes its updates: Muon's QKVO treatment (none under AdamW) and the weights' dtype.

    >>> optimizer_identity("adamw", "fused"), optimizer_identity("muon", "fused", "bfloat16")
    (('adamw', 'separate', 'float32'), ('muon', 'fused', 'bfloat16'))
    """
    return (optimizer, muon_qkvo if optimizer == "muon" else "separate", weights_dtype)


def optimizer_name(optimizer: str, muon_qkvo: str = "separate", weights_dtype: str = "float32") -> str:
    """The optimizer as tables and legends name it, its Muon variant and weights' dtype where not the default.

    >>> optimizer_name("muon"), optimizer_name("muon", "fused", "bfloat16"), optimizer_name("adamw", "fused")
    ('Muon+AdamW', 'Muon (fused QKVO)+AdamW, bfloat16 weights', 'AdamW')
    """
    optimizer, muon_qkvo, weights_dtype = optimizer_identity(optimizer, muon_qkvo, weights_dtype)
    variant = {"fused": " (fused QKVO)", "separate_stacked_lr": " (separate, stacked-shape LR)"}.get(
        muon_qkvo, ""
    )
    name = {"muon": f"Muon{variant}+AdamW", "adamw": "AdamW"}.get(optimizer, optimizer)
    return name if weights_dtype == "float32" else f"{name}, {weights_dtype} weights"


@dataclass(frozen=True)
class PlanConfiguration:
    """One cell of the plan's run matrix (seed 002, section 3.2)."""

    label: str
    qk_norm: str
    optimizer: str
    data_class: str
    purpose: str
    muon_qkvo: str = "separate"
    weights_dtype: str = "float32"

    @property
    def identity(self) -> tuple[str, ...]:
        """What makes a run this configuration: QK-norm, data class and the optimizer with its variant."""
        return (
            self.qk_norm,
            self.data_class,
            *optimizer_identity(self.optimizer, self.muon_qkvo, self.weights_dtype),
        )

    def describe(self) -> str:
        qk = "no QK-norm" if self.qk_norm == "none" else f"{self.qk_norm} QK-norm"
        return f"{qk}, {optimizer_name(self.optimizer, self.muon_qkvo, self.weights_dtype)}, {self.data_class} data"


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


VARIANT_CELLS = (
    PlanConfiguration("A1f", "learned", "muon", "standard", "the source code's fused QKVO Muon", "fused"),
    PlanConfiguration(
        "A1c", "learned", "muon", "standard", "step-size control of A1f", "separate_stacked_lr"
    ),
    PlanConfiguration("A2f", "none", "muon", "standard", "the source code's fused QKVO Muon", "fused"),
    PlanConfiguration("A2c", "none", "muon", "standard", "step-size control of A2f", "separate_stacked_lr"),
    PlanConfiguration("A1f-bf16", "learned", "muon", "standard", "the source recipe", "fused", "bfloat16"),
    PlanConfiguration(
        "B1-bf16", "learned", "adamw", "standard", "AdamW, the source's weights", "separate", "bfloat16"
    ),
)
"""Cells outside the plan's matrix that replicate the source code's training (docs/replication.md): they are
extras in the coverage table, and their pairs are compared where both cells are among the runs."""
VARIANT_PAIRS = (
    PlannedPair("A1f", "A1", "Fused vs separate Muon, with QK-norm: is the Muon effect the fusion's?"),
    PlannedPair("A2f", "A2", "Fused vs separate Muon, without QK-norm"),
    PlannedPair(
        "A1f", "A1c", "Joint orthogonalisation at the same step size, with QK-norm (fused vs control)"
    ),
    PlannedPair(
        "A2f", "A2c", "Joint orthogonalisation at the same step size, without QK-norm (fused vs control)"
    ),
    PlannedPair("A1c", "A1", "The stacked shape's larger step alone, with QK-norm (control vs separate)"),
    PlannedPair("A1f", "B1", "Fused Muon vs AdamW, float32 weights"),
    PlannedPair("A1f-bf16", "B1-bf16", "Fused Muon vs AdamW, pure bfloat16 weights (the source recipe)"),
)
VARIANT_BY_LABEL = {c.label: c for c in VARIANT_CELLS}
CELLS_BY_IDENTITY = {c.identity: c for c in (*PLAN, *VARIANT_CELLS)}


def plan_pairs(runs: pd.DataFrame) -> tuple[PlannedPair, ...]:
    """The plan's pairs, and the replication pairs whose both cells are among ``runs`` (a ``plan_cell`` column)."""
    cells = set(runs["plan_cell"]) if "plan_cell" in runs else set()
    return PLAN_PAIRS + tuple(p for p in VARIANT_PAIRS if p.a in cells and p.b in cells)


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


def configuration_label(
    qk_norm: str, optimizer: str, data_cls: str, muon_qkvo: str = "separate", weights_dtype: str = "float32"
) -> str:
    """The plan's label (``"A1"`` … ``"C2"``) of a configuration, a replication cell's (``"A1f"``, see
    :data:`VARIANT_CELLS`), or a descriptive "extra" label.

    Examples
    --------
    >>> configuration_label("learned", "muon", "standard"), configuration_label("learned", "muon", "standard", "fused")
    ('A1', 'A1f')
    >>> configuration_label("frozen", "muon", "standard")
    'extra: frozen QK-norm, Muon+AdamW, standard data'
    """
    c = PlanConfiguration("", qk_norm, optimizer, data_cls, "", muon_qkvo, weights_dtype)
    known = CELLS_BY_IDENTITY.get(c.identity)
    return known.label if known else "extra: " + c.describe()


def describe_label(label: str) -> str:
    """A legend entry: ``"A1: learned QK-norm, Muon+AdamW, standard data"``; extras are already descriptive."""
    c = PLAN_BY_LABEL.get(label) or VARIANT_BY_LABEL.get(label)
    return f"{label}: {c.describe()}" if c else label


def label_order(labels: Iterable[str]) -> list[str]:
    """Labels in the plan's order (A1, A2, B1, B2, C1, C2), extras after them alphabetically."""
    unique = set(labels)
    planned = [c.label for c in PLAN if c.label in unique]
    return planned + sorted(unique - set(planned))


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
        variant = {k: _coord_at(ds, k, i) or default for k, default in DEFAULT_VARIANT.items()}
        cls = _coord_at(ds, "data_class", i) or data_class(
            str(meta["data"]), simple_data=simple_data, complex_data=complex_data
        )
        cell = configuration_label(str(meta["qk_norm"]), str(meta["optimizer"]), cls, **variant)
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
                **variant,
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


def cell_labels(runs: pd.DataFrame, cell: str) -> list[str]:
    """The labels of the runs that make a plan cell (``A2``), sorted (``runs`` has ``label`` and ``plan_cell``
    columns, as :func:`run_table` gives)."""
    return sorted(set(runs.loc[runs["plan_cell"] == cell, "label"].astype(str)))


def plan_cell_label(runs: pd.DataFrame, cell: str) -> str:
    """The runs' label of a plan cell (``A2``): a study's own name for it, or the cell where no label or
    several map onto it."""
    labels = cell_labels(runs, cell)
    return labels[0] if len(labels) == 1 else cell


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
    ``runs``, ``muon_qkvo``, ``weights_dtype`` (the Muon variant and weights' dtype of the cell).
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
                "muon_qkvo": c.muon_qkvo,
                "weights_dtype": c.weights_dtype,
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
                "muon_qkvo": first.get("muon_qkvo", DEFAULT_VARIANT["muon_qkvo"]),
                "weights_dtype": first.get("weights_dtype", DEFAULT_VARIANT["weights_dtype"]),
            }
        )
    return pd.DataFrame(rows)


def best_lr_table(configurations: pd.DataFrame) -> pd.DataFrame:
    """The 300M plan's "Best LR / Sweep val loss" table: per configuration its chosen rates and loss."""
    rows = []
    for _, c in configurations.iterrows():
        lrs = c["lrs"] or {}
        rows.append(
            {
                "configuration": c["label"],
                "description": c["description"] or describe_label(c["label"]),
                "optimizer": c["optimizer"],
                "best muon_lr": lrs.get("muon_lr", np.nan),
                "best lr (AdamW)": lrs.get("lr", np.nan),
                "multiplier": np.nan if c["multiplier"] is None else float(c["multiplier"]),
                "sweep val loss": np.nan if c["val_loss"] is None else float(c["val_loss"]),
                "status": c["status"],
                "reason": c["reason"],
            }
        )
    return pd.DataFrame(rows)
