"""``collapse-train``: prepare datasets and train models. Each command lives in its own module, imported
only when it is used, and makes one library call."""

from cli.common import program

COMMANDS = {
    "prepare-data": (
        "cli.train.prepare:prepare_data",
        "Prepare a dataset directory: token memmaps split by document, a tokenizer and a fixed eval batch.",
    ),
    "run": (
        "cli.train.run:run",
        "Train PRESET_OR_TOML (a preset name or a TOML file) on --data, writing checkpoints to --out.",
    ),
    "presets": ("cli.train.run:presets", "List the shipped presets: name, parameter count, description."),
    "study": (
        "cli.train.study:study",
        "Run STUDY_FILE (a shipped study's name or a TOML file) into the study directory --out.",
    ),
}
"""Command name -> (where it is defined, its one-line summary for ``--help``)."""


main = program(COMMANDS, "Train small Llama-style LLMs and write self-describing safetensors checkpoints.")
"""The program; ``[project.scripts]`` in pyproject.toml points at it."""
