"""``collapse-spectra eval``: score checkpoints on lm-eval tasks into each run's evals.json; ``eval-tasks``: local
tasks cut from a dataset's held-out text. One library call each."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import device_option, no_progress_option, reports_errors
from spectra.evals.run import DEFAULT_BATCH_SIZE, DEFAULT_BOOTSTRAP_ITERS, evaluate
from spectra.evals.tasks import write_dataset_tasks


def _tasks(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    if not tasks:
        raise click.BadParameter("name at least one task")
    return tasks


@click.command("eval")
@click.argument("path", type=click.Path(path_type=Path), metavar="CHECKPOINT_OR_RUN_OR_RUNS")
@click.option(
    "--tasks",
    required=True,
    callback=_tasks,
    help="Comma-separated lm-eval tasks, e.g. hellaswag,lambada_openai (hub) or local ones from --include-path.",
)
@click.option(
    "--num-fewshot",
    default=None,
    metavar="N|TASK=N,...",
    help="Few-shot examples: one count for every task, or per task (hellaswag=10,lambada_openai=0). "
    "[default: each task's own]",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N documents per task.")
@click.option(
    "--all-checkpoints", is_flag=True, help="Evaluate every checkpoint of each run, not only the final one."
)
@click.option(
    "--include-path",
    "include_path",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of local lm-eval task YAML files (repeatable); how tasks are read offline.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dataset directory whose tokenizer.json the run was trained with. [default: the one recorded]",
)
@device_option(help="Where the model runs.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Sequences per forward pass.",
)
@click.option(
    "--bootstrap-iters",
    type=click.IntRange(min=0),
    default=DEFAULT_BOOTSTRAP_ITERS,
    show_default=True,
    help="lm-eval's bootstrap resamples for standard errors without a closed form (perplexity).",
)
@no_progress_option
@reports_errors
def eval_command(
    path: Path,
    tasks: list[str],
    num_fewshot: str | None,
    limit: int | None,
    all_checkpoints: bool,
    include_path: tuple[Path, ...],
    data_dir: Path | None,
    device: str,
    batch_size: int,
    bootstrap_iters: int,
    no_progress: bool,
) -> None:
    """Score checkpoints on lm-eval tasks and write the results to RUN/evals.json.

    CHECKPOINT_OR_RUN_OR_RUNS is one checkpoint file, a run directory (its final checkpoint, or every one with
    --all-checkpoints), a directory of run directories or a study directory (its main runs). Evaluations
    already in a run's evals.json are skipped; the file is rewritten atomically after each checkpoint, by one
    process at a time. Needs the optional 'eval' extra (lm-eval).
    """
    results = evaluate(
        path,
        tasks,
        all_checkpoints=all_checkpoints,
        num_fewshot=num_fewshot,
        limit=limit,
        include_path=include_path,
        data_dir=data_dir,
        device=device,
        batch_size=batch_size,
        bootstrap_iters=bootstrap_iters,
        echo=click.echo,
        progress=not no_progress,
    )
    for result in results:
        click.echo(f"{result.path}: {len(result.added)} added, {len(result.skipped)} already there")


@click.command("eval-tasks")
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DATA_DIR")
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the task files (created); give it to `eval --include-path`.",
)
@click.option(
    "--n-docs",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Test documents per task (a seeded subsample), and as many few-shot candidates.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the distractors and the subsample."
)
@reports_errors
def eval_tasks(data_dir: Path, out_dir: Path, n_docs: int, seed: int) -> None:
    """Write a LAMBADA-style cloze and a HellaSwag-style choice task cut from DATA_DIR's held-out test split.

    The tasks are lm-eval YAML files over local JSON-lines data, for offline evals; few-shot examples come from
    the validation split. Prints each task's name and file.
    """
    for task, path in write_dataset_tasks(data_dir, out_dir, n_docs=n_docs, seed=seed).items():
        click.echo(f"{task}\t{path}")
