"""``collapse-spectra``: extract Q/K spectra from checkpoints and analyse them. Each command lives in
its own module, imported only when it is used, and makes one library call."""

from cli.common import program

COMMANDS = {
    "extract": (
        "cli.spectra.extract:extract",
        "Add the Q/K singular-value spectra of every checkpoint of a run to its cube.",
    ),
    "watch": (
        "cli.spectra.watch:watch",
        "Measure each checkpoint of a run, or of every run of a study, into its cube as it lands.",
    ),
    "metrics": (
        "cli.spectra.metrics:metrics",
        "Summarise METRIC over heads for each run, step and layer of the CUBES.",
    ),
    "surgery": (
        "cli.spectra.surgery:surgery",
        "Prune key dimensions of CHECKPOINT and write the test loss per strategy and fraction to surgery.nc.",
    ),
    "plot": (
        "cli.spectra.analysis:plot",
        "Draw one figure of KIND from CUBE... and write it as PNG and SVG.",
    ),
    "report": (
        "cli.spectra.analysis:report",
        "Write the HTML and Markdown report over RUN_OR_CUBE... into a directory and print its path.",
    ),
    "eval": (
        "cli.spectra.evals:eval_command",
        "Score checkpoints on lm-eval tasks and write the results to RUN/evals.json.",
    ),
    "eval-tasks": (
        "cli.spectra.evals:eval_tasks",
        "Write a LAMBADA-style cloze and a HellaSwag-style choice task cut from DATA_DIR's held-out test split.",
    ),
}
"""Command name -> (where it is defined, its one-line summary for ``--help``)."""


main = program(COMMANDS, "Measure the singular-value spectra of attention queries and keys, offline.")
"""The program; ``[project.scripts]`` in pyproject.toml points at it."""
