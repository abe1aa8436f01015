"""``collapse-spectra plot`` and ``collapse-spectra report``: figures and the report over cubes.

Each command parses its options and makes one library call (:func:`spectra.report.render_plot`,
:func:`spectra.report.build_report`). ``surgery`` lives in :mod:`cli.spectra.surgery` and is re-exported here
so that :mod:`cli.spectra` imports the analysis commands from one place.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import out_option, reports_errors
from cli.spectra.surgery import surgery
from spectra import cube
from spectra import report as lib
from spectra.analysis import gamma, stats
from spectra.figures.kinds import FIGURE_KINDS

__all__ = ["plot", "report", "surgery"]

_SITES = click.Choice(list(cube.SITES))
_CONVENTIONS = click.Choice(list(cube.CONVENTIONS))
_CENTERINGS = click.Choice(list(cube.CENTERINGS))


def _data_class_options(func):
    func = click.option(
        "--complex-data",
        multiple=True,
        metavar="NAME",
        help="Dataset name to count as complex data (C2); repeatable. [default: names containing kjv or complex]",
    )(func)
    return click.option(
        "--simple-data",
        multiple=True,
        metavar="NAME",
        help="Dataset name to count as simple data (C1); repeatable. [default: names containing bbe or simple]",
    )(func)


@click.command("plot")
@click.argument("kind", type=click.Choice(list(FIGURE_KINDS)))
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="CUBE..."
)
@out_option(
    "FILE.png: writes FILE.png and FILE.svg.", required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option(
    "--site",
    default=None,
    help=f"Read-out site ({', '.join(cube.SITES)}) [default: {cube.DEFAULT_SITE}]; for `gamma`, where the "
    f"coordinate energy is read ({', '.join(gamma.GAMMA_SITES)}) [default: {gamma.DEFAULT_GAMMA_SITE}].",
)
@click.option(
    "--convention", type=_CONVENTIONS, default=None, help="Participation-ratio convention. [default: sv]"
)
@click.option(
    "--centering",
    type=_CENTERINGS,
    default=None,
    help="Spectra of X or of X minus its mean. [default: uncentered]",
)
@click.option("--which", type=click.Choice(["k", "q"]), default=None, help="Keys or queries. [default: k]")
@click.option("--layer", type=int, default=None, help="waterfall: one layer instead of the mean over layers.")
@click.option(
    "--run", "run_name", default=None, help="heatmap, gamma: the run to show (its name in the cube)."
)
@_data_class_options
@reports_errors
def plot(
    kind: str,
    inputs: tuple[Path, ...],
    out: Path,
    site: str | None,
    convention: str | None,
    centering: str | None,
    which: str | None,
    layer: int | None,
    run_name: str | None,
    simple_data: tuple[str, ...],
    complex_data: tuple[str, ...],
) -> None:
    """Draw one figure of KIND from CUBE... and write it as PNG and SVG.

    KIND is one of trajectory, heatmap, waterfall, data-complexity, surgery, gamma, loss, pr-vs-loss
    (see docs/figures.md). CUBE... are spectra.nc files or run directories; for `surgery`, surgery.nc
    files or run directories.
    """
    written = lib.render_plot(
        kind,
        list(inputs),
        out,
        site=site,
        convention=convention,
        centering=centering,
        which=which,
        layer=layer,
        run=run_name,
        simple_data=simple_data,
        complex_data=complex_data,
    )
    for path in written:
        click.echo(str(path))


@click.command("report")
@click.argument(
    "inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="RUN_OR_CUBE..."
)
@out_option(
    "Report directory (created, or a report directory to update).",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option(
    "--site",
    type=_SITES,
    default=cube.DEFAULT_SITE,
    show_default=True,
    help="Read-out site of the headline PR.",
)
@click.option(
    "--convention",
    type=_CONVENTIONS,
    default="sv",
    show_default=True,
    help="Participation-ratio convention of the headline.",
)
@click.option(
    "--centering",
    type=_CENTERINGS,
    default="uncentered",
    show_default=True,
    help="Centring of the headline spectra.",
)
@click.option(
    "--gamma-site",
    type=click.Choice(list(gamma.GAMMA_SITES)),
    default=gamma.DEFAULT_GAMMA_SITE,
    show_default=True,
    help="Where the gamma analysis reads the coordinate energy (unit: before gamma; normed: after, biased).",
)
@click.option(
    "--n-resamples",
    type=click.IntRange(min=100),
    default=stats.N_RESAMPLES,
    show_default=True,
    help="Bootstrap resamples.",
)
@click.option(
    "--bootstrap-seed",
    type=int,
    default=stats.BOOTSTRAP_SEED,
    show_default=True,
    help="Seed of the bootstrap.",
)
@_data_class_options
@reports_errors
def report(
    inputs: tuple[Path, ...],
    out: Path,
    site: str,
    convention: str,
    centering: str,
    gamma_site: str,
    n_resamples: int,
    bootstrap_seed: int,
    simple_data: tuple[str, ...],
    complex_data: tuple[str, ...],
) -> None:
    """Write the HTML and Markdown report over RUN_OR_CUBE... into a directory and print its path.

    RUN_OR_CUBE... are run directories (their spectra.nc, and surgery.nc when present), directories of
    run directories, or spectra.nc files; a run without a cube is skipped with a line saying so. The
    directory must be new, empty, or an earlier report's: the report is built beside it and swapped in
    whole, keeping files it did not write and never replacing one.
    """
    path = lib.build_report(
        list(inputs),
        out,
        site=site,
        convention=convention,
        centering=centering,
        gamma_site=gamma_site,
        simple_data=simple_data,
        complex_data=complex_data,
        n_resamples=n_resamples,
        seed=bootstrap_seed,
        echo=lambda line: click.echo(line, err=True),
    )
    click.echo(str(path))
