"""``collapse-train study``: a thin skin over :mod:`trainer.study.runner` (run, --dry-run, --status)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import DeviceType, reports_errors
from trainer.study.executors import SlurmOptions
from trainer.study.runner import plan_text, run_study, status_text
from trainer.study.watcher import StudyWatch


@click.command("study")
@click.argument("study_file")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Study directory (required unless --dry-run).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs at a time [local: one per GPU, or 1 on the CPU; slurm: no cap].",
)
@click.option(
    "--executor", type=click.Choice(["local", "slurm"]), default="local", help="Where the runs execute."
)
@click.option(
    "--dry-run", is_flag=True, help="Print every run with its config changes from the base; run nothing."
)
@click.option(
    "--status", is_flag=True, help="Print the study's progress (done, running, failed, to do); run nothing."
)
@click.option(
    "--only",
    multiple=True,
    metavar="LABEL",
    help="Run only these configurations (repeatable or comma-separated).",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory the study's relative dataset paths are under (replaces its data_root).",
)
@click.option("--partition", default=None, help="slurm: the partition of the jobs [the cluster's default].")
@click.option(
    "--time",
    "time_min",
    type=click.IntRange(min=1),
    default=24 * 60,
    help="slurm: time limit of each job, in minutes.",
)
@click.option(
    "--gpus-per-job",
    type=click.IntRange(min=0),
    default=None,
    help="slurm: GPUs per job, more than one: DDP on one node [1 where the partition's nodes have GPUs, else 0].",
)
@click.option(
    "--cpus-per-job",
    type=click.IntRange(min=1),
    default=None,
    help="slurm: CPU cores per job [8 per GPU, or 8; at most a node's cores].",
)
@click.option(
    "--mem-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="slurm: memory per job in GB [the partition's default].",
)
@click.option(
    "--slurm-setup",
    multiple=True,
    metavar="LINE",
    help="slurm: a shell line run before each job (repeatable).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Run `collapse-spectra watch` beside the runs: each main run's cube and TensorBoard scalars "
    "(STUDY_DIR/tensorboard) grow as its checkpoints land, complete when the study ends.",
)
@click.option(
    "--watch-device",
    type=DeviceType(),
    default=None,
    help="Where --watch measures: the CPU, or a GPU the runs do not use. [default: cpu]",
)
@reports_errors
def study(
    study_file: str,
    out_dir: Path | None,
    jobs: int | None,
    executor: str,
    dry_run: bool,
    status: bool,
    only: tuple[str, ...],
    data_root: Path | None,
    partition: str | None,
    time_min: int,
    gpus_per_job: int | None,
    cpus_per_job: int | None,
    mem_gb: float | None,
    slurm_setup: tuple[str, ...],
    watch: bool,
    watch_device: str | None,
) -> None:
    """Run STUDY_FILE (a shipped study's name or a TOML file) into the study directory --out.

    Phase 1 trains each configuration's learning-rate sweep and records the choice; phase 2 trains
    configurations x seeds at the chosen rates. Re-running continues where it stopped.
    """
    if dry_run and status:
        raise click.UsageError("--dry-run and --status are exclusive")
    if watch_device is not None and not watch:
        raise click.UsageError("--watch-device applies with --watch")
    if dry_run:
        click.echo(plan_text(study_file, out_dir, data_root=data_root, only=only))
        return
    if out_dir is None:
        raise click.UsageError("--out is required (unless --dry-run)")
    if status:
        click.echo(status_text(study_file, out_dir, data_root=data_root))
        return
    slurm = SlurmOptions(
        partition=partition,
        time_min=time_min,
        gpus_per_job=gpus_per_job,
        cpus_per_job=cpus_per_job,
        mem_gb=mem_gb,
        setup=slurm_setup,
    )
    run_study(
        study_file,
        out_dir,
        data_root=data_root,
        only=only,
        jobs=jobs,
        executor=executor,
        slurm=slurm,
        watch=StudyWatch(device=watch_device or "cpu") if watch else None,
        echo=click.echo,
    )
