"""Every command of both programs answers --help and is documented in the docs site."""

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.spectra import main as spectra_main
from cli.train import main as train_main

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROGRAMS = {"collapse-train": train_main, "collapse-spectra": spectra_main}
COMMANDS = [(prog, name) for prog, group in PROGRAMS.items() for name in group.commands]


def test_both_programs_have_their_commands():
    assert set(train_main.commands) == {"prepare-data", "run", "presets"}
    assert set(spectra_main.commands) == {"extract", "metrics", "surgery", "plot", "report", "eval", "eval-tasks"}


@pytest.mark.parametrize(("prog", "name"), COMMANDS)
def test_help(prog, name):
    result = CliRunner().invoke(PROGRAMS[prog], [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(("prog", "name"), COMMANDS)
def test_documented(prog, name):
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    assert f"{prog} {name}" in text, f"`{prog} {name}` appears in no docs page"


@pytest.mark.parametrize(("prog", "name"), COMMANDS)
def test_every_option_documented_in_help(prog, name):
    command = PROGRAMS[prog].commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{prog} {name} {param.opts[0]} has no help text"
