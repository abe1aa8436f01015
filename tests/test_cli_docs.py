"""Every command of both programs answers --help and is documented in the docs site."""

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.spectra import main as spectra_main
from cli.train import main as train_main

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROGRAMS = {"collapse-train": train_main, "collapse-spectra": spectra_main}
COMMANDS = [
    (prog, name) for prog, group in PROGRAMS.items() for name in group.list_commands(click.Context(group))
]


def command(prog: str, name: str) -> click.Command:
    group = PROGRAMS[prog]
    return group.get_command(click.Context(group), name)


def test_both_programs_have_their_commands():
    assert [n for p, n in COMMANDS if p == "collapse-train"] == ["prepare-data", "run", "presets", "study"]
    assert [n for p, n in COMMANDS if p == "collapse-spectra"] == [
        "extract",
        "watch",
        "metrics",
        "surgery",
        "plot",
        "report",
        "eval",
        "eval-tasks",
    ]


@pytest.mark.parametrize(("prog", "name"), COMMANDS)
def test_the_lazy_summary_is_the_commands_own(prog, name):
    """--help lists the commands without importing them: the summary it shows must be the command's."""
    summary = PROGRAMS[prog].lazy[name][1]
    assert summary == command(prog, name).help.strip().splitlines()[0]


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_program_help_imports_no_heavy_library(prog):
    import subprocess
    import sys

    code = (
        f"import sys; from cli.{'train' if prog == 'collapse-train' else 'spectra'} import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'xarray', 'scipy', 'matplotlib', 'spectra') if m in sys.modules)\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


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
    for param in command(prog, name).params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{prog} {name} {param.opts[0]} has no help text"


def test_jobs_below_one_is_a_usage_error_wherever_a_spectra_command_has_jobs():
    """``--jobs 0`` is click's usage error (exit 2, the option named) in every collapse-spectra command that has it."""
    with_jobs = [
        name
        for prog, name in COMMANDS
        if prog == "collapse-spectra" and any(p.name == "jobs" for p in command(prog, name).params)
    ]
    assert with_jobs  # extract at least
    for name in with_jobs:
        for bad in ("0", "-1"):
            result = CliRunner().invoke(spectra_main, [name, "somewhere", "--jobs", bad])
            assert result.exit_code == 2, (name, result.output)
            assert "Invalid value for '--jobs'" in result.output and "x>=1" in result.output, result.output
