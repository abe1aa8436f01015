"""Shared pieces of the two command-line programs: error handling and the options every command spells alike."""

from __future__ import annotations

import functools
import importlib
import re
import sys
from collections.abc import Callable

import click

from trainer.errors import TrainerError

# Bad input is reported as one line naming the problem and exit status 1; anything else is a bug
# and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    TrainerError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _expected_errors() -> tuple[type[BaseException], ...]:
    # SpectraError exists only once spectra is imported; importing it here would load xarray into every
    # collapse-train command (and every DDP worker) for nothing
    spectra_errors = sys.modules.get("spectra.errors")
    return EXPECTED_ERRORS + ((spectra_errors.SpectraError,) if spectra_errors else ())


def reports_errors(func):
    """Turn the libraries' input errors into ``click.ClickException`` (message on stderr, exit 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as e:
            if isinstance(e, _expected_errors()):
                error = click.ClickException(str(e))
                error.exit_code = getattr(e, "exit_code", 1)  # 130 for a run stopped by a signal
                raise error from e
            if not isinstance(e, OSError):
                raise
            # unwritable output, full disk: name the file
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from e

    return wrapper


class DeviceType(click.ParamType):
    """``auto`` (a GPU when one is visible), ``cpu``, ``cuda`` or ``cuda:N``: the same choice in every command."""

    name = "auto|cpu|cuda[:N]"

    def convert(self, value, param, ctx):
        if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(value)):
            return value
        self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)


def device_option(default: str | None = "auto", help: str = "Where to compute.") -> Callable:
    """The ``--device`` option every command that runs a model shares."""
    return click.option(
        "--device", type=DeviceType(), default=default, show_default=default is not None, help=help
    )


def out_option(help: str, **kwargs) -> Callable:
    """The ``-o/--out`` option every command that writes shares (the one spelling of an output)."""
    return click.option("-o", "--out", "out", help=help, **kwargs)


def no_progress_option(func: Callable) -> Callable:
    """``--no-progress``: hide the progress bars (every command that shows one has it)."""
    return click.option("--no-progress", is_flag=True, help="Hide the progress bars.")(func)


class Interrupted(click.ClickException):
    """Ctrl-C: one line and exit status 130 (128 + SIGINT), never a traceback."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__(
            "interrupted (Ctrl-C); every file written so far is complete, and re-running the command "
            "continues where it can"
        )


class LazyGroup(click.Group):
    """A command group that imports a command's module only when that command is used.

    ``collapse-spectra --help`` would otherwise import torch, scipy and matplotlib (seconds) just to
    list the commands; each command's one-line summary is therefore given here, and a test checks it
    against the command's own docstring. A Ctrl-C while a command's libraries are being imported, or
    while it runs, ends with one line and exit status 130 (:class:`Interrupted`).

    Parameters
    ----------
    commands
        ``{name: ("module:attribute", "one-line summary")}``, in the order ``--help`` lists them.
    """

    def __init__(self, *args, commands: dict[str, tuple[str, str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy) + sorted(set(self.commands) - set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in self.lazy:
            return None
        module_name, attribute = self.lazy[name][0].split(":")
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except KeyboardInterrupt:
            raise Interrupted() from None
        self.commands[name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][1]) for name in self.lazy]
        rows += [
            (name, self.commands[name].get_short_help_str()) for name in self.list_commands(ctx)[len(rows) :]
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None


def program(commands: dict[str, tuple[str, str]], help_text: str) -> click.Group:
    """One of the two programs: a :class:`LazyGroup` of ``commands`` with the options both share.

    ``-h``/``--help``, defaults shown in every command's help, and ``--version`` (the ``collapse``
    distribution's). ``help_text`` is the program's one-paragraph description.
    """

    @click.group(
        cls=LazyGroup,
        commands=commands,
        context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
        help=help_text,
    )
    @click.version_option(package_name="collapse")
    def main() -> None:
        pass

    return main
