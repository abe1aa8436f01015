"""``collapse-spectra extract``: compute a run's spectra cube from its checkpoints (one library call)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import device_option, no_progress_option, out_option, reports_errors
from spectra.extract import extract as extract_cube


@click.command("extract")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--batch",
    type=click.Path(path_type=Path),
    default=None,
    help="Eval batch file (eval_batch.safetensors) or its dataset directory [default: the one the checkpoints record].",
)
@out_option(
    "Cube to create or extend [default: spectra.nc in the run directory].",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
)
@device_option(help="Where the forward passes and the SVDs run.")
@click.option(
    "--drop-first",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Positions dropped at the start of every sequence (attention sinks) before the SVDs.",
)
@click.option(
    "--force", is_flag=True, help="Accept an eval batch whose sha256 differs from the recorded one."
)
@no_progress_option
@reports_errors
def extract(
    path: Path,
    batch: Path | None,
    out: Path | None,
    device: str,
    drop_first: int,
    force: bool,
    no_progress: bool,
) -> None:
    """Add the Q/K singular-value spectra of every checkpoint of a run to its cube.

    PATH is a run directory, its checkpoints/ directory or one checkpoint file. Checkpoints already
    in the cube are skipped; the cube is rewritten atomically, by one process at a time.
    """
    result = extract_cube(
        path,
        batch=batch,
        out=out,
        device=device,
        drop_first=drop_first,
        force=force,
        progress=not no_progress,
    )
    click.echo(str(result.path))
    click.echo(f"added steps: {', '.join(map(str, result.added)) or 'none'}")
    click.echo(f"skipped steps (already in the cube): {', '.join(map(str, result.skipped)) or 'none'}")
