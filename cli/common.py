"""Shared pieces of the two command-line programs: error handling and shared options."""

from __future__ import annotations

import functools
import sys

import click

from spectra.errors import SpectraError
from trainer.errors import TrainerError

# Bad input is reported as one line naming the problem and exit status 1; anything else is a bug
# and keeps its traceback.
EXPECTED_ERRORS = (
    TrainerError,
    SpectraError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
)


def reports_errors(func):
    """Turn the libraries' input errors into ``click.ClickException`` (message on stderr, exit 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:  # unwritable output, full disk: name the file
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from e

    return wrapper


def echo_err(msg: str) -> None:
    click.echo(msg, err=True, file=sys.stderr)
