"""``collapse-spectra extract``: compute a run's spectra cube from its checkpoints, or a public model's from
its revisions (one library call either way: :func:`spectra.extract.extract` or
:func:`spectra.hf.extract.extract_public`)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import reports_errors
from spectra.extract import extract as extract_cube
from spectra.hf.revisions import is_public_source

_PUBLIC_ONLY = ("--revisions", "--tokens-per-step", "--dtype")


@click.command("extract")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--batch",
    type=click.Path(path_type=Path),
    default=None,
    help="Eval batch file (eval_batch.safetensors) or its dataset directory [default: the one the checkpoints record].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Cube to create or extend [default: spectra.nc in the run directory].",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--drop-first",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Positions dropped at the start of every sequence (attention sinks) before the SVDs.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Accept an eval batch whose sha256 differs from the recorded one (public models: whose tokenizer "
    "differs from the model's).",
)
@click.option(
    "--revisions",
    default=None,
    metavar="REV[:STEP],...",
    help="Public models: the revisions to read, comma-separated [default: main on the hub, every revision "
    "sub-directory, or . for a model directory].",
)
@click.option(
    "--tokens-per-step",
    type=click.IntRange(min=1),
    default=None,
    help="Public models: training tokens per optimizer step, where no family rule gives the token counts.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Public models: precision of the weights and the forward pass (spectra are float64). [default: float32]",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@reports_errors
def extract(
    path: Path,
    batch: Path | None,
    out: Path | None,
    device: str,
    drop_first: int,
    force: bool,
    revisions: str | None,
    tokens_per_step: int | None,
    dtype: str | None,
    no_progress: bool,
) -> None:
    """Add the Q/K singular-value spectra of every checkpoint of a run to its cube.

    PATH is a run directory, its checkpoints/ directory or one checkpoint file. Checkpoints already
    in the cube are skipped; the cube is rewritten atomically.

    PATH may also be a public model (docs: Public models): hf:ORG/NAME, a transformers model directory,
    or a directory of revision sub-directories; --batch (a dataset directory in the model's vocabulary)
    and --out are then required.
    """
    if is_public_source(path):
        if batch is None or out is None:
            raise click.UsageError("a public model needs --batch DATA_DIR and --out CUBE.nc")
        from spectra.hf.extract import extract_public

        result = extract_public(
            str(path),
            batch=batch,
            out=out,
            revisions=[r for r in revisions.split(",") if r.strip()] if revisions else None,
            device=device,
            dtype=dtype or "float32",
            drop_first=drop_first,
            tokens_per_step=tokens_per_step,
            force=force,
            progress=not no_progress,
        )
    else:
        given = [o for o, v in zip(_PUBLIC_ONLY, (revisions, tokens_per_step, dtype)) if v is not None]
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: only for public models, and {path} is a collapse run"
            )
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
