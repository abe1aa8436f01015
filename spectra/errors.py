"""Errors the spectra library raises for bad input; the CLI turns them into a message and exit status 1."""


class SpectraError(Exception):
    """Bad input to spectra (checkpoint, batch, cube); the message names the file or value."""
