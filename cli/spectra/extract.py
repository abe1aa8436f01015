"""``collapse-spectra extract``: compute a run's spectra cube from its checkpoints, or a public model's from
its revisions (one library call either way: :func:`spectra.extract.run.extract` or
:func:`spectra.hf.extract.extract_public`)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import device_option, no_progress_option, out_option, reports_errors
from spectra.extract.run import extract as extract_cube
from spectra.extract.runs import extract_runs, is_collection
from spectra.hf.revisions import is_public_source

_PUBLIC_ONLY = ("--revisions", "--tokens-per-step", "--dtype", "--list-revisions", "--evict/--no-evict")


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
    "--force",
    is_flag=True,
    help="Accept an eval batch whose sha256 differs from the recorded one (public models: whose tokenizer "
    "differs from the model's).",
)
@click.option(
    "--revisions",
    default=None,
    metavar="SELECTION",
    help="Public models: the revisions to read, comma-separated: names REV[:STEP], all, globs ('stage1-*'), "
    "every:N, log:K, range:A-B (docs: Public models) [default: main on the hub, every revision sub-directory, "
    "or . for a model directory].",
)
@click.option(
    "--list-revisions",
    is_flag=True,
    help="Public models: print what --revisions selects (revision, step, tokens, the rule that chose it) and "
    "what it leaves out, without downloading weights; --batch is then not needed.",
)
@click.option(
    "--evict/--no-evict",
    default=None,
    help="Hub models: delete each revision this sweep downloaded from the Hugging Face cache once its spectra "
    "are in the cube, so that disk holds about two revisions [default: --evict on the hub].",
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
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Study directory or directory of runs: runs extracted at a time (the CPU threads are split).",
)
@click.option(
    "--include-sweep", is_flag=True, help="Study directory: also extract the learning-rate sweep's runs."
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
    jobs: int,
    include_sweep: bool,
    revisions: str | None,
    tokens_per_step: int | None,
    dtype: str | None,
    list_revisions: bool,
    evict: bool | None,
    no_progress: bool,
) -> None:
    """Add the Q/K singular-value spectra of every checkpoint of a run to its cube.

    PATH is a run directory, its checkpoints/ directory or one checkpoint file; or a study directory or
    a directory of run directories, whose runs are extracted each into its own cube (--jobs at a time).
    Checkpoints already in a cube are skipped; a cube is rewritten atomically, by one process at a time.

    PATH may also be a public model (docs: Public models): hf:ORG/NAME, a transformers model directory,
    or a directory of revision sub-directories; --batch (a dataset directory in the model's vocabulary)
    and --out are then required, except with --list-revisions.
    """
    given = (revisions, tokens_per_step, dtype, list_revisions or None, evict)
    public_options = [o for o, v in zip(_PUBLIC_ONLY, given) if v is not None]
    if is_public_source(path) and list_revisions:
        from spectra.hf.plan import plan_public

        planned = plan_public(str(path), revisions=revisions, tokens_per_step=tokens_per_step, out=out)
        click.echo("\n".join(planned.lines()))
        if planned.plan.problems:
            raise click.ClickException(
                "the selection cannot be extracted as it stands (see the problems above)"
            )
        return
    if is_public_source(path):
        if batch is None or out is None:
            raise click.UsageError("a public model needs --batch DATA_DIR and --out CUBE.nc")
        from spectra.hf.extract import extract_public

        result = extract_public(
            str(path),
            batch=batch,
            out=out,
            revisions=revisions,
            device=device,
            dtype=dtype or "float32",
            drop_first=drop_first,
            tokens_per_step=tokens_per_step,
            force=force,
            progress=not no_progress,
            evict=evict,
            on_note=lambda line: click.echo(line, err=True),
        )
    elif public_options:
        raise click.UsageError(
            f"{', '.join(public_options)}: only for public models, and {path} is a collapse run"
        )
    elif is_collection(path):
        if out is not None or batch is not None or force:
            raise click.UsageError(
                "--out, --batch and --force apply to one run, not to a study or directory of runs"
            )
        done = extract_runs(
            path, jobs=jobs, include_sweep=include_sweep, device=device, drop_first=drop_first,
            progress=not no_progress, echo=click.echo,
        )  # fmt: skip
        if done.failed:
            raise click.ClickException(
                f"{len(done.failed)} run(s) failed: " + "; ".join(f"{r}: {e}" for r, e in done.failed)
            )
        return
    else:
        if jobs != 1 or include_sweep:
            raise click.UsageError(
                "--jobs and --include-sweep apply to a study directory or a directory of runs"
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
