"""Errors the trainer raises for bad input; the CLI turns them into a message and exit status 1."""


class TrainerError(Exception):
    """Bad input to the trainer (data, config, run directory); the message names the problem."""


class RunLockedError(TrainerError):
    """Another process holds the run directory (it is training in it); the message names the holder.

    Study executors read it as "running elsewhere", not as a failure to retry.
    """
