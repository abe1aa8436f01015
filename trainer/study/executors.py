"""Where the runs of a study execute: local processes, or SLURM through submitit.

Every run executes the same way, wherever it is placed: a child process ``python -m trainer.study.worker``
(:func:`launch_worker`) trains it with :func:`trainer.train.train` into its own run directory, its
output appended to its own log. A crash, an out-of-memory kill or a segfault of one run therefore
ends that process only; the runner reads the outcome from the exit status and ``run.json``.

- :class:`LocalExecutor`: at most ``jobs`` runs at a time on this machine. With GPUs, each run gets one
  (``CUDA_VISIBLE_DEVICES``) and at most one run uses a GPU; the CPU cores are split evenly between
  the runs (``OMP_NUM_THREADS`` and ``torch.set_num_threads`` in each child).
- :class:`SlurmExecutor`: one SLURM job array per batch of runs through ``submitit`` (an optional
  extra: ``pip install 'collapse[slurm]'``), with partition, time limit, GPUs and CPUs per job and the
  array parallelism as options. The job on the compute node launches the same worker (under
  ``torchrun`` when a job has several GPUs).

Executors only place runs and report what happened: which runs to start, skip or retry is decided
by :mod:`trainer.study.runner`.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from trainer.errors import TrainerError
from trainer.provenance import utc_now
from trainer.rundir import read_run_state
from trainer.study.slurm_queue import (
    RUNNING_STATES,
    WAITING_STATES,
    accounting_states,
    can_never_start,
    cancel,
    explain,
    partition_nodes,
    queue_states,
    sbatch_error,
)

EXIT_DIVERGED = 3
"""Worker exit status of a run that stopped on a non-finite loss (``run.json`` status ``diverged``)."""
EXIT_LOCKED = 4
"""Worker exit status when another process holds the run directory (running elsewhere)."""

Status = Literal["completed", "diverged", "locked", "failed"]


@dataclass(frozen=True)
class RunTask:
    """One attempt at one run, everything as plain data so that it pickles to a SLURM node."""

    name: str
    """The run's name, e.g. ``A1-s0``."""
    label: str
    """Where it appears in progress lines, e.g. ``runs/A1-s0``."""
    config_json: str
    """The full validated run config as JSON (:meth:`trainer.config.RunConfig.to_json`)."""
    data_dir: str
    """Absolute path of the dataset directory."""
    run_dir: str
    """Absolute path of the run directory."""
    log: str
    """Absolute path of the log the attempt's output is appended to."""
    attempt: int = 1
    resume: bool = False
    """Whether the run directory held a started run when this attempt was planned (it resumes it)."""


@dataclass(frozen=True)
class RunOutcome:
    """How one attempt ended."""

    name: str
    status: Status
    returncode: int | None
    message: str = ""
    """The run's error line (empty when it completed)."""
    elapsed_s: float = 0.0
    where: str = ""
    """Host, GPU or SLURM job id it ran on."""
    retryable: bool = True
    """False for a failure that another attempt would only repeat (a SLURM job that can never start)."""


@dataclass(frozen=True)
class RunEvent:
    """A state change of one task, as reported to the runner's callback."""

    kind: Literal["queued", "start", "end", "note"]
    """A state change of ``task``; ``note``: something the user should know, said once (in ``where``)."""
    task: RunTask
    time: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` in the process that reported it."""
    outcome: RunOutcome | None = None
    where: str = ""


Report = Callable[[RunEvent], None]


class Executor(Protocol):
    """Runs a batch of tasks; returns one outcome per task, in order; reports every state change."""

    def run(self, tasks: Sequence[RunTask], report: Report) -> list[RunOutcome]: ...


# ----------------------------------------------------------------------------------------------------
# One run in a child process


def worker_command(
    task: RunTask, threads: int | None = None, nproc: int = 1, parent_pid: int | None = None
) -> list[str]:
    """The command line that trains ``task``: ``python -m trainer.study.worker ...``, under torchrun if ``nproc > 1``.

    With ``parent_pid`` (one process only: under torchrun the worker's parent is torchrun) the worker
    stops when that process dies, however it dies (:func:`trainer.study.worker.stop_with_parent`).
    """
    if nproc > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        prefix += ["-m", "trainer.study.worker"]
    else:
        prefix = [sys.executable, "-m", "trainer.study.worker"]
    args = ["--config-json", task.config_json, "--data", task.data_dir, "--out", task.run_dir]
    args += ["--threads", str(threads)] if threads else []
    return prefix + args + (["--parent-pid", str(parent_pid)] if parent_pid and nproc == 1 else [])


def launch_worker(
    task: RunTask,
    env: dict[str, str] | None = None,
    *,
    threads: int | None = None,
    nproc: int = 1,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> RunOutcome:
    """Train ``task`` in a child process, its output appended to ``task.log``; wait and classify the end.

    The status comes from the exit code (0 completed, :data:`EXIT_DIVERGED`, :data:`EXIT_LOCKED`,
    anything else or a signal: failed) cross-checked with ``run.json``: a child killed after writing
    ``completed`` is still a completed run.
    """
    log = Path(task.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(
            f"=== {utc_now()} attempt {task.attempt} of {task.name} "
            f"on {os.uname().nodename} (CUDA_VISIBLE_DEVICES={(env or os.environ).get('CUDA_VISIBLE_DEVICES', '')}, "
            f"threads={threads or 'default'}, processes={nproc}) ===\n"
        )
        f.flush()
        # its own session: a Ctrl-C in the terminal reaches the runner only, which forwards one SIGINT;
        # and it stops if this process dies without forwarding anything (SIGKILL). The kernel's death
        # signal follows the thread that starts the child: this one, which waits for it to the end.
        proc = subprocess.Popen(
            worker_command(task, threads, nproc, parent_pid=os.getpid()),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        if on_start:
            on_start(proc)
        returncode = proc.wait()
    return classify(task, returncode, time.monotonic() - start)


def classify(task: RunTask, returncode: int, elapsed_s: float = 0.0, where: str = "") -> RunOutcome:
    """The :class:`RunOutcome` of a finished worker from its exit code, ``run.json`` and its log."""
    state = read_run_state(Path(task.run_dir)).status
    status: Status
    if state == "completed":  # whatever happened after run.json said so (a kill during exit)
        status = "completed"
    elif returncode == EXIT_DIVERGED or state == "diverged":
        status = "diverged"
    elif returncode == EXIT_LOCKED:
        status = "locked"
    else:
        status = "failed"
    message = "" if status == "completed" else last_error(Path(task.log))
    if status == "failed" and returncode is not None and returncode < 0:
        message = f"killed by signal {signal.Signals(-returncode).name}" + (
            f" ({message})" if message else ""
        )
    return RunOutcome(task.name, status, returncode, message, elapsed_s, where)


def last_error(log: Path, tail_bytes: int = 20_000) -> str:
    """The last ``error: ...`` line of the log's last attempt, else its last non-empty line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.split("\n=== ")[-1].splitlines()[1:] if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors[-1].removeprefix("error: ") if errors else lines[-1] if lines else "")[:500]


# ----------------------------------------------------------------------------------------------------
# Local processes


def visible_gpus() -> list[str]:
    """GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


Launch = Callable[..., RunOutcome]


class LocalExecutor:
    """At most ``jobs`` runs at a time on this machine, one GPU each or a share of the cores each.

    Parameters
    ----------
    jobs
        Runs at a time; None: one per GPU, or 1 on a machine without GPUs. With GPUs it is capped at
        their number (one run per GPU).
    gpus
        GPU ids to hand out (``CUDA_VISIBLE_DEVICES`` values); None: :func:`visible_gpus`; ``[]``: the CPU.
    cpus
        Cores to split between the runs on the CPU; None: :func:`available_cpus`.
    launch
        What runs one task: :func:`launch_worker` (tests pass a stand-in with the same signature).

    Examples
    --------
    >>> ex = LocalExecutor(jobs=2, gpus=[], cpus=8)
    >>> ex.jobs, ex.threads_per_job
    (2, 4)
    """

    def __init__(
        self,
        jobs: int | None = None,
        *,
        gpus: Sequence[str] | None = None,
        cpus: int | None = None,
        launch: Launch = launch_worker,
    ):
        self.gpus = list(visible_gpus() if gpus is None else gpus)
        if jobs is not None and jobs < 1:
            raise TrainerError(f"--jobs must be at least 1, got {jobs}")
        wanted = jobs if jobs is not None else (len(self.gpus) or 1)
        self.jobs = min(wanted, len(self.gpus)) if self.gpus else wanted
        # on GPUs too: eight runs of torch's default thread count each would oversubscribe the cores
        self.threads_per_job = max(1, (cpus or available_cpus()) // self.jobs)
        self.launch = launch
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = f"one GPU each ({', '.join(self.gpus[: self.jobs])})" if self.gpus else "on the CPU"
        return f"local: {self.jobs} run(s) at a time {where}, {self.threads_per_job} CPU thread(s) each"

    def run(self, tasks: Sequence[RunTask], report: Report) -> list[RunOutcome]:
        slots: queue.SimpleQueue[dict[str, str]] = queue.SimpleQueue()
        for i in range(self.jobs):
            n = str(self.threads_per_job)
            slot = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
            slots.put({**slot, "CUDA_VISIBLE_DEVICES": self.gpus[i]} if self.gpus else slot)
        reported = threading.Lock()

        def safe_report(event: RunEvent) -> None:
            with reported:
                report(event)

        def one(task: RunTask) -> RunOutcome:
            slot = slots.get()  # never blocks: the pool has exactly `jobs` threads
            where = (
                f"GPU {slot['CUDA_VISIBLE_DEVICES']}" if self.gpus else f"{self.threads_per_job} thread(s)"
            )
            try:
                safe_report(RunEvent("start", task, where=where))
                outcome = self.launch(
                    task,
                    {**os.environ, "PYTHONUNBUFFERED": "1", **slot},
                    threads=self.threads_per_job,
                    on_start=self._track,
                )
                outcome = replace(outcome, where=where)
                safe_report(RunEvent("end", task, outcome=outcome, where=where))
                return outcome
            finally:
                slots.put(slot)

        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="study-run")
        futures = [pool.submit(one, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            self._interrupt_children()
            raise
        finally:
            pool.shutdown(wait=True)

    def _track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children = {p for p in self._children if p.poll() is None} | {proc}

    def _interrupt_children(self) -> None:
        """Ctrl-C of the runner: SIGINT to the children still running, so each records ``interrupted``."""
        with self._lock:
            for p in self._children:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)


# ----------------------------------------------------------------------------------------------------
# SLURM through submitit


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each SLURM job (one run per job)."""

    partition: str | None = None
    """SLURM partition (``--partition``); None: the cluster's default."""
    time_min: int = 24 * 60
    """Time limit of each job in minutes; a run cut by it is resumed by the retry or the next study run."""
    gpus_per_job: int | None = None
    """GPUs of each job; more than one trains the run with DDP (torchrun) on one node. None: one where the
    partition's nodes have GPUs, none where they have not (``sinfo``)."""
    cpus_per_job: int | None = None
    """CPU cores of each job; None: 8 per GPU (8 without GPUs), at most the largest node's cores (``sinfo``)."""
    mem_gb: float | None = None
    """Memory of each job; None: the partition's default."""
    array_parallelism: int | None = None
    """Jobs of an array running at a time (``--array=...%N``; ``collapse-train study --jobs``); None: no cap."""
    setup: tuple[str, ...] = ()
    """Shell lines run before each job, e.g. ``source /path/to/.venv/bin/activate``."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Other ``submitit`` parameters as (name, value), e.g. ``("slurm_account", "proj")``."""
    poll_s: float = 30.0
    """Seconds between two looks at the jobs' states."""
    grace_s: float = 120.0
    """How long a job may be gone from the queue without a result file (a slow shared filesystem shows
    it late), or pending for a reason that can never clear, before that is the attempt's end."""


class SubmissionRefused(TrainerError):
    """sbatch refused a batch of jobs; nothing of that batch was submitted."""


class RunnerInterrupted(TrainerError):
    """The study runner was stopped by SIGINT or SIGTERM while runs were in progress. Exit status 130."""

    exit_code = 130


def resolve_resources(options: SlurmOptions) -> tuple[SlurmOptions, str]:
    """``options`` with its GPUs and CPUs per job filled in from the partition's nodes, and how they were.

    A cluster without GPUs then gets jobs that ask for none, and no job asks more cores than a node has.
    An unknown partition resolves to no GPUs and 8 cores; sbatch then refuses it by name.
    """
    if options.gpus_per_job is not None and options.cpus_per_job is not None:
        return options, ""
    name, nodes = partition_nodes(options.partition)
    most_cpus, most_gpus = max((n.cpus for n in nodes), default=0), max((n.gpus for n in nodes), default=0)
    gpus = options.gpus_per_job if options.gpus_per_job is not None else min(most_gpus, 1)
    cpus = options.cpus_per_job or min(8 * max(gpus, 1), most_cpus or 8 * max(gpus, 1))
    seen = (
        f"partition {name}: {len(nodes)} node(s), at most {most_cpus} CPUs and {most_gpus} GPUs each"
        if nodes
        else f"partition {name}: not listed by sinfo"
    )
    return replace(options, gpus_per_job=gpus, cpus_per_job=cpus), seen


def run_on_node(task: RunTask, gpus: int, cpus: int | None) -> RunOutcome:
    """The job a SLURM node runs (pickled by submitit): the task's worker, like the local executor's."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", cpus or 0)) or None
    threads = max(1, cpus // max(gpus, 1)) if cpus else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    where = f"SLURM job {os.environ.get('SLURM_JOB_ID', '?')} on {os.uname().nodename}"
    outcome = launch_worker(task, env, threads=threads, nproc=max(gpus, 1))
    return replace(outcome, where=where)


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as e:
        raise TrainerError(
            "--executor slurm needs submitit: pip install 'collapse[slurm]' (or pip install 'submitit>=1.5')"
        ) from e
    return submitit


@dataclass
class _Job:
    """One submitted attempt as the executor follows it."""

    task: RunTask
    job: Any
    """submitit's Job."""
    outcome: RunOutcome | None = None
    started: bool = False
    last_state: str = "PENDING"
    """Its state at the last look at the queue (``GONE`` once the queue no longer lists it)."""
    gone_since: float | None = None
    """When it was first seen neither waiting nor running, without a result file (``time.monotonic``)."""
    stuck_since: float | None = None
    """When it was first seen pending for a reason that never clears."""

    @property
    def id(self) -> str:
        return str(self.job.job_id)


class SlurmExecutor:
    """Each batch of runs is one SLURM job array, submitted with ``submitit`` and watched with ``squeue``.

    A job whose result file appears has ended, as submitit says. A job that is neither pending nor
    running and has left no result file after ``grace_s`` (cancelled while pending, which leaves no
    record even in ``sacct``; killed with its node; a time limit) is a failed attempt, retried by the study's
    policy. A job pending for a reason that can never clear (:func:`trainer.study.slurm_queue.can_never_start`)
    for ``grace_s`` is cancelled and is a failed attempt that is not retried. A batch that sbatch refuses
    raises :class:`SubmissionRefused` with sbatch's message, after removing the files submitit wrote for it.

    Parameters
    ----------
    folder
        Where submitit keeps its job files (``STUDY_DIR/slurm``).
    options
        Resources and array parallelism of the jobs; on a real cluster (``cluster="slurm"``) the GPUs and
        CPUs left None are resolved from the partition's nodes here (:func:`resolve_resources`).
    cluster
        submitit's cluster: ``slurm``; ``local`` or ``debug`` run the same jobs on this machine
        (``local`` starts every job at once, whatever the array parallelism).
    """

    def __init__(self, folder: Path, options: SlurmOptions = SlurmOptions(), cluster: str = "slurm"):
        self.folder = Path(folder)
        self.cluster = cluster
        if (options.gpus_per_job is not None and options.gpus_per_job < 0) or (
            options.array_parallelism is not None and options.array_parallelism < 1
        ):
            raise TrainerError("--gpus-per-job must be non-negative and --jobs at least 1")
        self.sized_by = ""
        if cluster == "slurm":
            options, self.sized_by = resolve_resources(options)
        self.options = options
        self._notes: set[str] = set()

    @property
    def gpus(self) -> int:
        return self.options.gpus_per_job or 0

    def describe(self) -> str:
        o = self.options
        cap = f"{o.array_parallelism} at a time" if o.array_parallelism else "no cap"
        return f"slurm: one job per run ({self.request()}), {cap}" + (
            f"; defaults from {self.sized_by}" if self.sized_by else ""
        )

    def request(self) -> str:
        """What each job asks of SLURM, in sbatch's words."""
        o = self.options
        asked = [f"--partition={o.partition}" if o.partition else "default partition"]
        asked += [f"--gpus-per-node={self.gpus}" if self.gpus else "no GPU"]
        asked += [f"--cpus-per-task={o.cpus_per_job}"] if o.cpus_per_job else []
        asked += [f"--mem={o.mem_gb:g}G"] if o.mem_gb else []
        return ", ".join(asked + [f"--time={o.time_min}"])

    def _executor(self) -> Any:
        submitit = _import_submitit()
        o = self.options
        try:
            ex = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        except RuntimeError as e:  # e.g. no srun on this machine
            raise TrainerError(f"--executor slurm: {e}") from None
        params: dict[str, Any] = {
            "name": "collapse-study",
            "timeout_min": o.time_min,
            "nodes": 1,
            "tasks_per_node": 1,  # one process per job; torchrun starts the per-GPU processes itself
            "gpus_per_node": self.gpus or None,  # none asked at all: no --gres on a cluster without GPUs
            "cpus_per_task": o.cpus_per_job,
            "mem_gb": o.mem_gb,
            "slurm_partition": o.partition,
            "slurm_array_parallelism": o.array_parallelism,
            "slurm_setup": list(o.setup) or None,
            **dict(o.extra),
        }
        if self.cluster != "slurm":  # local/debug: only the generic parameters mean anything
            params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "mem_gb"}
            params.pop("cpus_per_task", None)
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def run(self, tasks: Sequence[RunTask], report: Report) -> list[RunOutcome]:
        if not tasks:
            return []
        jobs = [_Job(t, j) for t, j in zip(tasks, self._submit(tasks))]
        try:
            for j in jobs:
                report(RunEvent("queued", j.task, where=f"SLURM job {j.id}"))
            while True:
                self._look([j for j in jobs if j.outcome is None], report)
                if all(j.outcome is not None for j in jobs):
                    return [j.outcome for j in jobs]  # type: ignore[misc]
                time.sleep(self.options.poll_s)
        except KeyboardInterrupt as e:
            raise RunnerInterrupted(self._left_running([j for j in jobs if j.outcome is None], e)) from None

    def _submit(self, tasks: Sequence[RunTask]) -> list[Any]:
        """Submit the tasks as one array; on a refusal, remove what submitit wrote for it and say why."""
        submitit = _import_submitit()
        ex = self._executor()
        before = set(os.listdir(self.folder)) if self.folder.is_dir() else None
        said = io.StringIO()  # submitit prints sbatch's refusal on stderr too; it is in our one line instead
        try:
            with contextlib.redirect_stderr(said), ex.batch():
                jobs = [ex.submit(run_on_node, t, self.gpus, self.options.cpus_per_job) for t in tasks]
            sys.stderr.write(said.getvalue())
            return jobs
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
            self._remove_new_files(before)
            raise SubmissionRefused(
                f"sbatch refused the job{'s' if len(tasks) > 1 else ''} of {len(tasks)} run(s): "
                f"{sbatch_error(str(e))} (asked: {self.request()}); nothing was submitted"
            ) from None

    def _remove_new_files(self, before: set[str] | None) -> None:
        """The pickles and submission script of a refused batch: this process wrote them, nothing else."""
        if not self.folder.is_dir():
            return
        for name in set(os.listdir(self.folder)) - (before or set()):
            path = self.folder / name
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
        if before is None and not any(self.folder.iterdir()):
            self.folder.rmdir()

    # ------------------------------------------------------------------------------------------------
    # watching the jobs

    def _look(self, jobs: list[_Job], report: Report) -> None:
        """One look at the unfinished jobs: report the ones that started or ended."""
        if self.cluster == "slurm":
            self._look_at_queue(jobs, report)
            return
        for j in jobs:  # submitit's local clusters know their jobs' ends themselves
            done = j.job.done()
            if done or j.job.state in ("RUNNING", "COMPLETING"):
                self._started(j, report)
            if done:
                self._finish(j, self._outcome(j), report)

    def _look_at_queue(self, jobs: list[_Job], report: Report) -> None:
        """A real cluster: a result file ends a job; else squeue says where it is, and the grace decides."""
        queue = queue_states(sorted({j.id.split("_")[0] for j in jobs}))
        now = time.monotonic()
        for j in jobs:
            if _has_result(j.job):
                self._started(j, report)
                self._finish(j, self._outcome(j), report)
                continue
            if isinstance(queue, str):  # squeue failed this time: no verdict without it
                self._note_once(
                    f"squeue failed ({queue}): the jobs are waited for until it answers", j, report
                )
                continue
            entry = queue.get(j.id)
            j.last_state = entry.state if entry else "GONE"
            if entry is not None and entry.state in RUNNING_STATES:
                self._started(j, report)
                j.gone_since = j.stuck_since = None
            elif entry is not None and entry.state in WAITING_STATES:
                j.gone_since = None
                impossible = entry.state == "PENDING" and can_never_start(entry.reason)
                j.stuck_since = (j.stuck_since or now) if impossible else None
                if impossible and now - j.stuck_since >= self.options.grace_s:
                    self._finish(j, self._never_starts(j, entry.reason), report)
            else:  # ended (squeue still shows its final state for a while) or gone, and no result file
                j.gone_since = j.gone_since or now
                if now - j.gone_since >= self.options.grace_s:
                    self._finish(
                        j, self._ended_without_result(j, entry.state if entry else None, report), report
                    )

    def _started(self, j: _Job, report: Report) -> None:
        if not j.started:
            j.started = True
            report(RunEvent("start", j.task, where=f"SLURM job {j.id}"))

    @staticmethod
    def _finish(j: _Job, outcome: RunOutcome, report: Report) -> None:
        j.outcome = outcome
        report(RunEvent("end", j.task, outcome=outcome, where=outcome.where))

    @staticmethod
    def _outcome(j: _Job) -> RunOutcome:
        where = f"SLURM job {j.id}"
        try:
            result = j.job.result()
        except Exception as e:  # the job itself failed: time limit, node failure, cancelled
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            why = lines[-1] if lines else type(e).__name__
            return _failed_unless_completed(j.task, where, f"{where} failed: {why}")
        return result

    def _never_starts(self, j: _Job, reason: str) -> RunOutcome:
        where = f"SLURM job {j.id}"
        cancelled = cancel([j.id])
        message = (
            f"{where} can never start: pending for {_seconds(self.options.grace_s)} with reason {reason} "
            f"({explain(reason)}; asked: {self.request()}); "
            + ("cancelled it" if cancelled is None else f"scancel failed: {cancelled}")
        )
        return RunOutcome(j.task.name, "failed", None, message[:500], 0.0, where, retryable=False)

    def _ended_without_result(self, j: _Job, state: str | None, report: Report) -> RunOutcome:
        """The verdict on a job that left no result: what squeue, else sacct, says of its end."""
        where = f"SLURM job {j.id}"
        if state is None:
            recorded = accounting_states([j.id.split("_")[0]])
            if isinstance(recorded, str):
                note = f"no SLURM accounting ({recorded}): a job that leaves the queue without a result is "
                self._note_once(note + "judged from squeue alone", j, report)
            else:
                state = recorded.get(j.id)
        if state is None:
            why = (
                f"{where} vanished: not in the queue for {_seconds(self.options.grace_s)}, no result file, no "
                "accounting record (cancelled while pending?)"
            )
        else:
            why = f"{where} ended {state} without a result file"
        return _failed_unless_completed(j.task, where, why)

    def _note_once(self, note: str, j: _Job, report: Report) -> None:
        """Say ``note`` the first time only (a line per look would drown the study's own lines)."""
        if note not in self._notes:
            self._notes.add(note)
            report(RunEvent("note", j.task, where=note))

    def _left_running(self, jobs: list[_Job], stop: KeyboardInterrupt) -> str:
        """The message of an interrupted study: which of its jobs go on without it, and how to stop them."""
        signame = str(stop) or "SIGINT"
        queued = [j for j in jobs if j.last_state != "GONE"]
        if not queued:
            return f"interrupted by {signame}; no job of this batch is queued or running any more"
        ids = [j.id for j in queued]
        listed = ", ".join(f"{j.id} ({j.last_state.lower()})" for j in queued)
        return (
            f"interrupted by {signame}; SLURM job(s) {listed} go on without this process: run the study "
            f"again to pick up their results, or cancel them with scancel {' '.join(shlex.quote(i) for i in ids)}"
        )


def _has_result(job: Any) -> bool:
    """Whether submitit's result file for ``job`` exists (its folder touched first, for NFS's cache)."""
    folder = job.paths.folder
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)
    return job.paths.result_pickle.exists()


def _failed_unless_completed(task: RunTask, where: str, message: str) -> RunOutcome:
    outcome = classify(task, 1, where=where)  # run.json may say completed before a late kill
    if outcome.status == "completed":
        return outcome
    return RunOutcome(task.name, "failed", None, message[:500], 0.0, where)


def _seconds(s: float) -> str:
    return f"{s:g} s"
