"""``collapse-spectra``: extract Q/K spectra from checkpoints and analyse them. Each command lives in
its own module and makes one library call."""

import click

from cli.analysis import plot, report, surgery
from cli.evals import eval_command, eval_tasks
from cli.extract import extract
from cli.metrics import metrics


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="collapse")
def main() -> None:
    """Measure the singular-value spectra of attention queries and keys, offline."""


main.add_command(extract)
main.add_command(metrics)
main.add_command(surgery)
main.add_command(plot)
main.add_command(report)
main.add_command(eval_command)
main.add_command(eval_tasks)


if __name__ == "__main__":
    main()
