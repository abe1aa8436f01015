"""``collapse-train``: prepare datasets and train models. Each command lives in its own module and
makes one library call."""

import click

from cli.prepare import prepare_data
from cli.run import presets, run
from cli.study import study


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="collapse")
def main() -> None:
    """Train small Llama-style LLMs and write self-describing safetensors checkpoints."""


main.add_command(prepare_data)
main.add_command(run)
main.add_command(presets)
main.add_command(study)


if __name__ == "__main__":
    main()
