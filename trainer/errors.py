"""Errors the trainer raises; the CLI turns them into a message and an exit status (1 unless said otherwise).

The ones here are read by other layers too: a study's worker maps :class:`RunLockedError`,
:class:`DivergedError` and :class:`TrainingInterrupted` to its exit statuses.
"""


class TrainerError(Exception):
    """Bad input to the trainer (data, config, run directory); the message names the problem."""


class RunLockedError(TrainerError):
    """Another process holds the run directory (it is training in it); the message names the holder.

    Study executors read it as "running elsewhere", not as a failure to retry.
    """


class DivergedError(TrainerError):
    """The training loss or gradient norm became NaN or infinite (run.json status ``diverged``)."""


class TrainingInterrupted(TrainerError):
    """The run was stopped by SIGINT or SIGTERM; ``--resume`` continues it. Exit status 130."""

    exit_code = 130
