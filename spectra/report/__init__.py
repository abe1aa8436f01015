"""The study's report: every figure, table and comparison over a set of runs, as HTML and Markdown.

:func:`build_report` is the library call behind ``collapse-spectra report RUN_OR_CUBE... -o DIR``;
:func:`render_plot` is the one behind ``collapse-spectra plot KIND CUBE... -o FILE``. Both resolve their
inputs (a run directory means its ``spectra.nc`` and, if present, its ``surgery.nc``; a cube file means
itself), open the cubes with :func:`spectra.cube.open_cubes`, and call the pure functions of
:mod:`spectra.analysis` and :mod:`spectra.figures`.

The package, by concept:

- :mod:`~spectra.report.inputs`: finding the runs, cubes and surgery files;
- :mod:`~spectra.report.context`: what every section reads (the cubes, the shared statistics);
- :mod:`~spectra.report.sections`: one function per section, composed in order by :func:`build_report`;
- :mod:`~spectra.report.document`: the blocks and their Markdown and HTML renderings;
- :mod:`~spectra.report.output`: the report directory, built aside and swapped in whole.

What the report directory holds:

- ``report.html``: self-contained (figures embedded as base64 PNG, CSS inline, no external reference);
- ``report.md``: the same content, referencing the figures in ``figures/``;
- ``figures/*.png`` and ``figures/*.svg``;
- ``tables/*.csv``: every table in full (the report shows some of them abbreviated);
- ``report-files.json``: the list of files the report wrote, so that a later report into the same
  directory knows which files are its own.

No torch here: the report reads cubes and surgery results, never checkpoints.
"""

from spectra.report.build import build_report
from spectra.report.inputs import RunInput, resolve_inputs
from spectra.report.output import MANIFEST, REPORT_HTML, REPORT_MD
from spectra.report.render import KIND_OPTIONS, render_plot

__all__ = [
    "KIND_OPTIONS",
    "MANIFEST",
    "REPORT_HTML",
    "REPORT_MD",
    "RunInput",
    "build_report",
    "render_plot",
    "resolve_inputs",
]
