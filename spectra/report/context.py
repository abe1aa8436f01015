"""What every section of the report reads: the runs, their cubes and surgery results, the headline
measurement, and the statistics computed once for all sections."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xarray as xr

from spectra import cube
from spectra.analysis import plan, stats
from spectra.analysis.null import headline_with_null
from spectra.cube import Measurement, open_cube, open_cubes
from spectra.evals.results import read_eval_results
from spectra.report.inputs import RunInput
from spectra.study import Study
from spectra.surgery.file import read_surgery


@dataclass
class ReportContext:
    """The inputs of every section function ``section(ctx, writer) -> list[Block]``."""

    runs_in: list[RunInput]
    """The runs, as found on the command line."""
    skipped: list[tuple[Path, str]]
    """Runs that were skipped (no cube yet), with the reason."""
    cubes: list[xr.Dataset]
    """Each run's cube as written (its own attributes)."""
    ds: xr.Dataset
    """All cubes along ``run`` (:func:`spectra.cube.open_cubes`)."""
    run_names: list[str]
    """The ``run`` labels of ``ds``, in input order."""
    surgeries: dict[str, xr.Dataset]
    """Surgery results by run label, for the runs that have one."""
    studies: list[Study]
    """The study directories among the inputs (their runs carry the study's labels)."""
    evals: list[dict]
    """Each run's eval results (``evals.json``), for the runs that have them."""
    measurement: Measurement
    """The headline measurement (keys; site, centring and PR convention as chosen)."""
    gamma_site: str
    labels_kw: dict
    """``simple_data`` / ``complex_data`` for the configuration labels (:func:`spectra.analysis.plan.data_class`)."""
    n_resamples: int
    seed: int
    runs: pd.DataFrame = field(init=False)
    coverage: pd.DataFrame = field(init=False)
    summaries: pd.DataFrame = field(init=False)
    configs: pd.DataFrame = field(init=False)
    comparisons: pd.DataFrame = field(init=False)
    headline: pd.DataFrame = field(init=False)
    """``summaries`` with each run's PR against its Gaussian null (:func:`spectra.analysis.null.headline_with_null`)."""

    def __post_init__(self) -> None:
        kw = self.labels_kw
        self.runs = plan.run_table(self.ds, **kw)
        self.coverage = plan.plan_coverage(self.runs)
        self.summaries = stats.run_summaries(
            self.ds, **self.measurement.keywords(), **kw, n_resamples=self.n_resamples, seed=self.seed
        )
        self.configs = stats.configuration_summaries(
            self.summaries, n_resamples=self.n_resamples, seed=self.seed
        )
        self.comparisons = stats.compare_configurations(
            self.summaries, n_resamples=self.n_resamples, seed=self.seed
        )
        self.headline = headline_with_null(self.summaries, self.ds)

    def plan_label(self, cell: str) -> str:
        """The runs' label of a plan cell (``A2``): a study's own name for it, or the cell where none or several."""
        return plan.plan_cell_label(self.runs, cell)

    @property
    def measured(self) -> str:
        """The headline measurement in words."""
        m = self.measurement
        return (
            f"keys at site `{m.site}`, {m.centering.replace('centered', 'centred')}, participation ratio "
            f"in the {cube.CONVENTION_NAMES[m.convention]}"
        )


def with_study_labels(ds: xr.Dataset, studies: Sequence[Study]) -> xr.Dataset:
    """Give the runs that belong to a study its configuration label and data class (``run`` coordinates).

    Runs are matched by their directory (the cube's parent); runs of no study get empty strings, for
    which :func:`spectra.analysis.plan.run_table` falls back to the plan's labels and the dataset-name rule.
    """
    if not studies:
        return ds
    known: dict[str, dict] = {}
    for study in studies:
        known.update(study.run_labels())
    entries = [known.get(str(Path(str(p)).parent.resolve()), {}) for p in ds["path"].values]
    return ds.assign_coords(
        label=(
            "run",
            [str(e.get("label") or "") for e in entries],
            {"long_name": "configuration label (study)"},
        ),
        data_class=(
            "run",
            [str(e.get("data_class") or "") for e in entries],
            {"long_name": "data class (study)"},
        ),
    )


EAGER_BYTES = 1 << 30
"""A report reads its cubes into memory when together they hold at most this many bytes (xarray's ``nbytes``),
and keeps them lazy (dask, bounded memory) above it. The report makes hundreds of small computations, and dask
costs each tens of milliseconds: over the 20 runs of seed-bf16 (28 MiB) it took 6 min 49 s lazy."""


def load_context(
    runs_in: Sequence[RunInput],
    skipped: Sequence[tuple[Path, str]],
    *,
    studies: Sequence[Study] = (),
    measurement: Measurement,
    gamma_site: str,
    simple_data: Iterable[str],
    complex_data: Iterable[str],
    n_resamples: int,
    seed: int,
) -> ReportContext:
    """Open every cube and surgery file and compute the shared statistics."""
    cubes = [open_cube(r.cube, lazy=cube.dask_installed()) for r in runs_in]  # their attributes only
    ds = with_study_labels(open_cubes([r.cube for r in runs_in], on_skip=None), studies)
    if ds.nbytes <= EAGER_BYTES:
        ds = ds.load()
    run_names = [str(r) for r in ds["run"].values]
    surgeries = {
        name: read_surgery(r.surgery) for name, r in zip(run_names, runs_in) if r.surgery is not None
    }
    return ReportContext(
        runs_in=list(runs_in),
        skipped=list(skipped),
        cubes=cubes,
        ds=ds,
        run_names=run_names,
        surgeries=surgeries,
        studies=list(studies),
        evals=[read_eval_results(r.evals) for r in runs_in if r.evals is not None],
        measurement=measurement,
        gamma_site=gamma_site,
        labels_kw={"simple_data": list(simple_data), "complex_data": list(complex_data)},
        n_resamples=n_resamples,
        seed=seed,
    )
