"""``collapse-spectra metrics``: print a per-run, per-layer summary of one metric at every step."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import reports_errors
from spectra.analysis.metrics import METRIC_NAMES
from spectra.analysis.summary import summary_table
from spectra.cube import open_cubes

# columns repeated on every row of the CSV; the table prints them once, in its title
_SELECTION = ["metric", "var", "site", "centering"]


@click.command()
@click.argument("cubes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--metric",
    default="pr_sv",
    show_default=True,
    help=f"Metric: {', '.join(METRIC_NAMES)}; energy_rank_<pct> for any percentage.",
)
@click.option(
    "--var",
    type=click.Choice(["k_sv", "q_sv", "wk_sv", "wq_sv"]),
    default="k_sv",
    show_default=True,
    help="Spectra: keys, queries (activations), or the W_k, W_q head slices (weights).",
)
@click.option(
    "--site",
    default=None,
    help="Read-out site of k_sv/q_sv (proj, unit, normed, rope). "
    "[default: normed, where the source documents read the keys]",
)
@click.option(
    "--centering", default=None, help="uncentered or centered, for k_sv/q_sv. [default: uncentered]"
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv"]),
    default="table",
    show_default=True,
    help="Aligned table for reading, or CSV.",
)
@reports_errors
def metrics(
    cubes: tuple[Path, ...], metric: str, var: str, site: str | None, centering: str | None, fmt: str
):
    """Summarise METRIC over heads for each run, step and layer of the CUBES.

    CUBES are spectra.nc files, run directories, or directories of run directories; a run without a cube
    is skipped with a line on stderr saying so. Each row gives the mean
    over the heads of one layer, the lowest and highest head, and the number of heads with a defined value;
    the row with layer "all" covers every head of every layer.
    """
    table = summary_table(
        open_cubes(cubes, on_skip=lambda line: click.echo(line, err=True)),
        metric=metric,
        var=var,
        site=site,
        centering=centering,
    )
    if fmt == "csv":
        click.echo(table.to_csv(index=False), nl=False)
        return
    where = (
        "" if table.attrs["site"] is None else f" at site {table.attrs['site']}, {table.attrs['centering']}"
    )
    drop, shape = list(_SELECTION), []
    # N and head_dim in the title when every run shares them, as columns otherwise
    for column, text in (("n_tokens", "N = {} tokens per head"), ("head_dim", "head_dim {}")):
        values = table[column].dropna().unique()
        if len(values) <= 1:
            drop.append(column)
            if len(values) == 1:
                shape.append(text.format(values[0]))
    shape_text = f" ({', '.join(shape)})" if shape else ""
    click.echo(f"{metric} of {var}{where}{shape_text}: mean, min and max over heads")
    click.echo(table.drop(columns=drop).to_string(index=False, float_format=lambda x: f"{x:.6g}"))
