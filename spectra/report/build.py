"""``collapse-spectra report``: every section over a set of runs, as HTML and Markdown, in one directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from spectra import cube
from spectra.analysis import gamma as gamma_analysis
from spectra.analysis import stats
from spectra.fileio import ExclusiveLock, naming_a_full_disk, remove_stale_temporaries
from spectra.report.context import load_context
from spectra.report.document import Block, to_html, to_markdown
from spectra.report.inputs import resolve_inputs
from spectra.report.output import (
    REPORT_HTML,
    REPORT_MD,
    ReportWriter,
    check_target,
    commit,
    full_disk_in_staging,
    new_staging,
)
from spectra.report.sections import SECTIONS
from spectra.report.sections.overview import generated_at
from spectra.study import is_study_dir, read_study

PathLike = str | os.PathLike[str]
TITLE = "Key-collapse report"


def build_report(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    site: str = cube.DEFAULT_SITE,
    convention: str = "sv",
    centering: str = "uncentered",
    gamma_site: str = gamma_analysis.DEFAULT_GAMMA_SITE,
    simple_data: Iterable[str] = (),
    complex_data: Iterable[str] = (),
    n_resamples: int = stats.N_RESAMPLES,
    seed: int = stats.BOOTSTRAP_SEED,
    echo: Callable[[str], object] | None = None,
) -> Path:
    """Write the report over ``inputs`` into ``out_dir``; returns the path of ``report.html``.

    Parameters
    ----------
    inputs
        Run directories, directories of run directories, cube files, or study directories (see
        :func:`spectra.report.inputs.resolve_inputs`); runs without a cube are skipped and listed in the
        report's caveats. The runs of a study are labelled by the study's configuration labels (its seeds
        are the unit of replication), and the report gains a learning-rate section from its sweep.
    out_dir
        A new or empty directory, or one a previous report wrote (it holds ``report-files.json``). The
        report is built complete beside it and swapped into place, so a kill at any moment leaves the
        previous report or the new one; files a report did not write are kept, and one the new report
        would need to replace is refused (see :mod:`spectra.report.output`).
    site, convention, centering
        The headline measurement: read-out site of the keys, participation-ratio convention and centring.
        The sensitivity table varies all three regardless.
    gamma_site
        Where the gamma analysis reads the coordinate energy: ``unit`` (before gamma) or ``normed``.
    simple_data, complex_data
        Dataset names forced into the simple / complex class (see :func:`spectra.analysis.plan.data_class`).
    n_resamples, seed
        Bootstrap resamples and the seed of their generator.
    echo
        Called with one line per run skipped (no cube yet).

    Examples
    --------
    >>> build_report(["runs/A1-s0", "runs/A2-s0"], "report")  # doctest: +SKIP
    PosixPath('report/report.html')
    """
    # an unknown choice is refused before anything is read
    measurement = cube.Measurement(site=site, convention=convention, centering=centering)
    cube.check_choice("gamma site", gamma_site, gamma_analysis.GAMMA_SITES)
    generated_at()  # a malformed SOURCE_DATE_EPOCH too
    runs_in, skipped = resolve_inputs(inputs)
    out = Path(out_dir)
    out = out.resolve() if out.is_symlink() else out  # replace the directory the link points to, not the link
    check_target(out)  # before anything is computed or created
    for run, why in skipped:
        if echo is not None:
            echo(f"skipped {run}: {why}")
    studies = [read_study(p) for p in inputs if is_study_dir(p)]
    ctx = load_context(
        runs_in, skipped, studies=studies, measurement=measurement, gamma_site=gamma_site,
        simple_data=simple_data, complex_data=complex_data, n_resamples=n_resamples, seed=seed,
    )  # fmt: skip
    with ExclusiveLock(out, f"report directory {out}"):
        remove_stale_temporaries(out)  # staging directories of killed reports into this directory
        previous = check_target(out)  # again, under the lock
        staging = new_staging(out)
        try:
            w = ReportWriter(staging)
            blocks: list[Block] = []
            for section in SECTIONS:
                blocks += section(ctx, w)
            w.text(REPORT_MD, to_markdown(TITLE, blocks))
            w.text(REPORT_HTML, to_html(TITLE, blocks, w.images))
            w.manifest()
        except BaseException as e:
            full = full_disk_in_staging(e, staging, out)  # before the removal frees the space
            shutil.rmtree(staging, ignore_errors=True)
            if full is not None:
                raise full from e
            raise
        with naming_a_full_disk(out, out.parent):
            commit(staging, out, previous)
    return out / REPORT_HTML
