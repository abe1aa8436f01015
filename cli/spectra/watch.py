"""``collapse-spectra watch``: follow a run or a study and measure each checkpoint as it lands (one library call,
:func:`spectra.watch.loop.watch`)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import device_option, reports_errors
from spectra.watch.loop import watch as watch_runs


@click.command("watch")
@click.argument("path", type=click.Path(path_type=Path))
@device_option(help="Where the forward passes and the SVDs run: a device the training does not use.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds between two looks at the run or study.",
)
@click.option(
    "--tensorboard",
    "tensorboard",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write TensorBoard scalars into this directory, one sub-directory per run (needs the tensorboard extra).",
)
@click.option(
    "--figures", is_flag=True, help="Redraw each run's trajectory and heatmap into RUN/figures/ as it grows."
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs measured at a time, each in a worker process (the CPU threads are split).",
)
@click.option(
    "--include-sweep", is_flag=True, help="Study directory: also follow the learning-rate sweep's runs."
)
@reports_errors
def watch(
    path: Path,
    device: str,
    interval: float,
    tensorboard: Path | None,
    figures: bool,
    jobs: int,
    include_sweep: bool,
) -> None:
    """Measure each checkpoint of a run, or of every run of a study, into its cube as it lands.

    PATH is a run directory or a study directory, before, during or after its training: a path that does not
    exist yet is waited for. Each new checkpoint is extracted as `extract` would (same code, same lock) and
    gets one line: run, tokens, mean key PR, seconds. The watch ends when the run (or the study) is over and
    every checkpoint is in its cube; Ctrl-C or SIGTERM stops it (exit status 130) with every cube whole.
    """
    result = watch_runs(
        path,
        device=device,
        interval=interval,
        tensorboard=tensorboard,
        figures=figures,
        jobs=jobs,
        include_sweep=include_sweep,
        echo=click.echo,
    )
    troubles = [f"{p.name} could not be read" for p, _ in result.unreadable] + result.problems
    if troubles:
        raise click.ClickException(f"{len(troubles)} problem(s), each reported above: " + "; ".join(troubles))
