"""Shared pieces of the two command-line programs: error handling."""

from __future__ import annotations

import functools
import sys

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
