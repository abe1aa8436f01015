"""What SLURM says about a partition and about submitted jobs, read with its own commands.

The study runner's SLURM executor (:class:`trainer.study.executors.SlurmExecutor`) submits through submitit
but watches the jobs through this module, because submitit alone cannot tell what a real cluster did:

- its ``done()`` relies on ``sacct``. Without accounting (no ``slurmdbd``) ``sacct`` fails at every look
  and a job that ends without a result file is never done; and even with accounting, an array task
  cancelled while pending leaves no record at all. :func:`queue_states` reads ``squeue`` instead, which
  every cluster has; :func:`accounting_states` asks ``sacct`` only about a job that left the queue
  without a result.
- a job pending for a reason that can never clear (it asks more CPUs than any node of the partition
  has: ``PartitionConfig``) waits forever; :func:`can_never_start` names those reasons.
- ``sbatch`` refusing a job is a multi-line ``FailedJobError``; :func:`sbatch_error` makes it one line.

Every command runs with a timeout; a command that fails returns None (or raises :class:`SlurmError`
where the caller cannot go on), never a guess.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.errors import TrainerError

COMMAND_TIMEOUT_S = 60.0
"""How long one squeue/sacct/sinfo/scancel call may take (a busy controller answers in seconds)."""

RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"})
"""squeue states of a job whose process has started."""
WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"})
"""squeue states of a job that may still start (or start again)."""

NEVER_CLEARS = {
    "PartitionConfig": "it asks more CPUs, memory or GPUs per node than the partition's nodes have",
    "PartitionNodeLimit": "it asks more nodes than the partition has or allows",
    "PartitionTimeLimit": "its --time is above the partition's limit",
    "BadConstraints": "no node satisfies its constraints",
    "DependencyNeverSatisfied": "it depends on a job that failed",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
}
"""Pending reasons (squeue ``%r``) that no amount of waiting clears, and what each means: only a change of
the job or of the cluster's configuration would."""
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)(Max|Min)\w*Per(Job|Node)\w*$")
"""QOS and association limits on one job (``QOSMaxCpuPerJobLimit``, ``AssocMaxWallDurationPerJobLimit``):
the job itself exceeds them, unlike the group limits (``AssocGrpCpuLimit``) that clear as other jobs end."""


class SlurmError(TrainerError):
    """A SLURM command failed where the study cannot go on without its answer."""


def run_slurm_command(args: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a SLURM command; None when it cannot be run at all (not installed, timed out)."""
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def first_line(text: str) -> str:
    """The first non-empty line of a command's output (its error, usually)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# ----------------------------------------------------------------------------------------------------
# The partition's nodes


@dataclass(frozen=True)
class Node:
    """One node of a partition, as ``sinfo`` describes it."""

    cpus: int
    memory_mb: int
    gpus: int


def parse_gpus(gres: str) -> int:
    """GPUs in a node's generic resources, as ``sinfo -o %G`` prints them.

    >>> parse_gpus("(null)"), parse_gpus("gpu:4"), parse_gpus("gpu:a100:8(S:0-1),shard:16")
    (0, 4, 8)
    """
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_nodes(partition: str | None) -> tuple[str, list[Node]]:
    """The name and nodes of ``partition`` (None: the cluster's default partition), from ``sinfo``.

    An unknown partition has no nodes; sbatch then refuses the job and says so.

    Raises
    ------
    SlurmError
        ``sinfo`` is missing or cannot reach the controller.
    """
    done = run_slurm_command(["sinfo", "--all", "--noheader", "--Node", "--format=%P|%c|%m|%G"])
    if done is None or done.returncode != 0:
        why = first_line(done.stderr) if done is not None else "sinfo not found or timed out"
        raise SlurmError(f"--executor slurm: sinfo failed ({why}); is this machine a SLURM login node?")
    nodes: dict[str, list[Node]] = {}
    default = None
    for line in done.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, cpus, memory, gres = fields
        if name.endswith("*"):
            name = default = name[:-1]
        nodes.setdefault(name, []).append(Node(_leading_int(cpus), _leading_int(memory), parse_gpus(gres)))
    name = partition or default or ""
    return name, nodes.get(name, [])


def _leading_int(text: str) -> int:
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 0


# ----------------------------------------------------------------------------------------------------
# Jobs in the queue


@dataclass(frozen=True)
class QueueEntry:
    """One job (or array task) as ``squeue`` lists it."""

    job_id: str
    """``123`` for a single job, ``123_4`` for task 4 of array 123."""
    state: str
    """``PENDING``, ``RUNNING``, ... or a final state (``CANCELLED``, ``TIMEOUT``) for a while after the end."""
    reason: str
    """Why it is pending, or why it ended (``None`` when there is nothing to say)."""


def queue_states(array_ids: Sequence[str]) -> dict[str, QueueEntry] | str:
    """Every job and array task of ``array_ids`` that ``squeue`` still lists, by job id; or why squeue failed.

    Array tasks are listed one per line (``--array``) and finished jobs too, for as long as the
    controller keeps them (``--states=all``, ``MinJobAge``). A job the controller no longer knows is
    absent: an array task cancelled while pending disappears at once, without any record.
    """
    if not array_ids:
        return {}
    done = run_slurm_command(
        [
            "squeue",
            "--noheader",
            "--array",
            "--states=all",
            f"--jobs={','.join(array_ids)}",
            "--format=%i|%T|%r",
        ]
    )
    if done is None:
        return "squeue not found or timed out"
    if done.returncode != 0:
        # every id is unknown to the controller (all finished and purged): an empty queue, not a failure
        return {} if "Invalid job id" in done.stderr else first_line(done.stderr) or f"exit {done.returncode}"
    entries = {}
    for line in done.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            entries[fields[0]] = QueueEntry(*fields)
    return entries


def accounting_states(array_ids: Sequence[str]) -> dict[str, str] | str:
    """The final state ``sacct`` recorded for each job and array task of ``array_ids``, by job id.

    Returns the reason instead (one line) when there is no accounting to ask, e.g. ``Slurm accounting
    storage is disabled`` on a cluster without slurmdbd.
    """
    done = run_slurm_command(
        [
            "sacct",
            "--noheader",
            "--parsable2",
            "--allocations",
            f"--jobs={','.join(array_ids)}",
            "--format=JobID,State",
        ]
    )
    if done is None or done.returncode != 0:
        return first_line(done.stderr if done is not None else "") or "sacct not found or timed out"
    states = {}
    for line in done.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 2 and fields[0]:
            states[fields[0]] = fields[1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def can_never_start(reason: str) -> bool:
    """Whether a pending job's reason (squeue ``%r``) is one that waiting never clears.

    ``ReqNodeNotAvail`` counts only when it names no unavailable node: a drained or down node may come
    back, but a request that no node could ever satisfy will not.

    >>> can_never_start("PartitionConfig"), can_never_start("Resources"), can_never_start("Priority")
    (True, False, False)
    >>> can_never_start("QOSMaxCpuPerJobLimit"), can_never_start("AssocGrpCpuLimit")
    (True, False)
    >>> can_never_start("ReqNodeNotAvail, UnavailableNodes:"), can_never_start("ReqNodeNotAvail, UnavailableNodes:n[1-2]")
    (True, False)
    """
    reason = reason.strip()
    if reason.startswith("ReqNodeNotAvail"):
        return reason.endswith("UnavailableNodes:")
    return reason in NEVER_CLEARS or bool(_PER_JOB_LIMIT.match(reason))


def explain(reason: str) -> str:
    """What a reason :func:`can_never_start` accepts means, in words.

    >>> explain("PartitionTimeLimit"), explain("QOSMaxCpuPerJobLimit")
    ("its --time is above the partition's limit", 'a QOS or association limit on one job')
    """
    if reason.startswith("ReqNodeNotAvail"):
        return "no node can ever run it"
    return NEVER_CLEARS.get(reason, "a QOS or association limit on one job")


def cancel(job_ids: Sequence[str]) -> str | None:
    """``scancel`` the jobs; None when it worked, else its error line."""
    done = run_slurm_command(["scancel", *job_ids])
    if done is None:
        return "scancel not found or timed out"
    return None if done.returncode == 0 else first_line(done.stderr) or f"exit status {done.returncode}"


# ----------------------------------------------------------------------------------------------------
# sbatch's refusal


def sbatch_error(text: str) -> str:
    """sbatch's error lines as one line, without their ``sbatch: error:`` prefixes.

    >>> sbatch_error("sbatch: error: invalid partition specified: x\\n"
    ...              "sbatch: error: Batch job submission failed: Invalid partition name specified\\n")
    'invalid partition specified: x; Batch job submission failed: Invalid partition name specified'
    """
    lines = [re.sub(r"^(sbatch: )?(error: )?", "", line.strip()) for line in text.splitlines()]
    return "; ".join(line for line in lines if line) or "sbatch failed without a message"
