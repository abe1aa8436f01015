"""Errors the trainer raises for bad input; the CLI turns them into a message and exit status 1."""


class TrainerError(Exception):
    """Bad input to the trainer (data, config, run directory); the message names the problem."""
