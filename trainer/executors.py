"""Where the runs of a study execute: local processes, or SLURM through submitit.

Every run executes the same way, wherever it is placed: a child process ``python -m trainer.worker``
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
by :mod:`trainer.study_runner`.
"""

from __future__ import annotations

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from trainer.errors import TrainerError

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


@dataclass(frozen=True)
class RunEvent:
    """A state change of one task, as reported to the runner's callback."""

    kind: Literal["queued", "start", "end"]
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


def worker_command(task: RunTask, threads: int | None = None, nproc: int = 1) -> list[str]:
    """The command line that trains ``task``: ``python -m trainer.worker ...``, under torchrun if ``nproc > 1``."""
    if nproc > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        prefix += ["-m", "trainer.worker"]
    else:
        prefix = [sys.executable, "-m", "trainer.worker"]
    args = ["--config-json", task.config_json, "--data", task.data_dir, "--out", task.run_dir]
    return prefix + args + (["--threads", str(threads)] if threads else [])


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
            f"=== {datetime.now(UTC).isoformat(timespec='seconds')} attempt {task.attempt} of {task.name} "
            f"on {os.uname().nodename} (CUDA_VISIBLE_DEVICES={(env or os.environ).get('CUDA_VISIBLE_DEVICES', '')}, "
            f"threads={threads or 'default'}, processes={nproc}) ===\n"
        )
        f.flush()
        # its own session: a Ctrl-C in the terminal reaches the runner only, which forwards one SIGINT
        proc = subprocess.Popen(
            worker_command(task, threads, nproc),
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
    from trainer.study_dir import read_run_state  # study_dir imports the training stack; only needed here

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
    gpus_per_job: int = 1
    """GPUs of each job; more than one trains the run with DDP (torchrun) on one node."""
    cpus_per_job: int | None = None
    """CPU cores of each job; None: 8 per GPU (or 8)."""
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


class SlurmExecutor:
    """Each batch of runs is one SLURM job array, submitted and watched with ``submitit``.

    Parameters
    ----------
    folder
        Where submitit keeps its job files (``STUDY_DIR/slurm``).
    options
        Resources and array parallelism of the jobs.
    cluster
        submitit's cluster: ``slurm``; ``local`` or ``debug`` run the same jobs on this machine
        (the tests use them; ``local`` starts every job at once, whatever the array parallelism).
    """

    def __init__(self, folder: Path, options: SlurmOptions = SlurmOptions(), cluster: str = "slurm"):
        self.folder = Path(folder)
        self.options = options
        self.cluster = cluster
        if options.gpus_per_job < 0 or (
            options.array_parallelism is not None and options.array_parallelism < 1
        ):
            raise TrainerError("--gpus-per-job must be non-negative and --jobs at least 1")

    def describe(self) -> str:
        o = self.options
        cap = f"{o.array_parallelism} at a time" if o.array_parallelism else "no cap"
        return (
            f"slurm: one job per run ({o.gpus_per_job} GPU(s), {o.time_min} min, "
            f"partition {o.partition or 'default'}), {cap}"
        )

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
            "gpus_per_node": o.gpus_per_job,
            "cpus_per_task": o.cpus_per_job or 8 * max(o.gpus_per_job, 1),
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
        ex = self._executor()
        o = self.options
        with ex.batch():
            jobs = [ex.submit(run_on_node, t, o.gpus_per_job, o.cpus_per_job) for t in tasks]
        for t, j in zip(tasks, jobs):
            report(RunEvent("queued", t, where=f"SLURM job {j.job_id}"))
        outcomes: list[RunOutcome | None] = [None] * len(tasks)
        started = [False] * len(tasks)
        try:
            while any(x is None for x in outcomes):
                for i, (t, j) in enumerate(zip(tasks, jobs)):
                    if outcomes[i] is not None:
                        continue
                    done = j.done()
                    if not started[i] and (done or j.state in ("RUNNING", "COMPLETING")):
                        started[i] = True
                        report(RunEvent("start", t, where=f"SLURM job {j.job_id}"))
                    if done:
                        outcomes[i] = self._outcome(t, j)
                        report(RunEvent("end", t, outcome=outcomes[i], where=outcomes[i].where))
                if any(x is None for x in outcomes):
                    time.sleep(o.poll_s)
        except KeyboardInterrupt:
            pending = [j.job_id for j, x in zip(jobs, outcomes) if x is None]
            raise TrainerError(
                f"interrupted; SLURM job(s) {', '.join(pending)} keep running: run the study again to pick up "
                f"their results, or cancel them with scancel {' '.join(shlex.quote(p) for p in pending)}"
            ) from None
        return outcomes  # type: ignore[return-value]

    @staticmethod
    def _outcome(task: RunTask, job: Any) -> RunOutcome:
        where = f"SLURM job {job.job_id}"
        try:
            result = job.result()
        except Exception as e:  # the job itself failed: time limit, node failure, cancelled
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            why = lines[-1] if lines else type(e).__name__
            outcome = classify(task, 1, where=where)  # run.json may say completed before a late kill
            if outcome.status == "completed":
                return outcome
            return RunOutcome(task.name, "failed", None, f"{where} failed: {why}"[:500], 0.0, where)
        return result
