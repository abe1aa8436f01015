"""``collapse-train study``: run a study into its directory, resumably; or show its plan or its status.

:func:`run_study` works in two phases. Phase 1 trains every configuration's learning-rate sweep,
then writes the choice per configuration with the whole sweep table (``sweep.json``, ``sweep.csv``).
Phase 2 trains configurations x seeds at the chosen rates. Each run is decided from its run
directory: ``completed`` (or ``diverged``) runs are skipped without touching a file; a run directory
that exists otherwise is resumed; a missing one is started. A run that fails is retried once, then
reported with its log path while the others go on. A run whose directory another process holds is
"running elsewhere": not retried, not failed. SIGINT (Ctrl-C) and SIGTERM stop the study alike: the
runs in progress are told to stop (each writes a resume state), and the next invocation resumes them.
The directory layout is in :mod:`trainer.study.directory`.

:func:`plan_text` is ``--dry-run`` and :func:`status_text` is ``--status``: both only read.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.data.dataset import TokenDataset
from trainer.errors import TrainerError
from trainer.fileio import describe_holder, live_holder
from trainer.rundir import LOCK_FILE as RUN_LOCK_FILE
from trainer.rundir import read_run_state
from trainer.schedule import tokens_per_step, total_steps_for
from trainer.study.directory import (
    SLURM_DIR,
    STUDY_JSON,
    STUDY_TOML,
    SWEEP_CSV,
    SWEEP_JSON,
    check_study_dir,
    completed_config_differences,
    lock_holder,
    study_lock,
    sweep_result,
    write_study_json,
    write_study_toml,
    write_sweep_files,
)
from trainer.study.executors import (
    Executor,
    LocalExecutor,
    RunEvent,
    RunnerInterrupted,
    RunOutcome,
    RunTask,
    SlurmExecutor,
    SlurmOptions,
    SubmissionRefused,
)
from trainer.study.spec import (
    Configuration,
    PlannedRun,
    Study,
    SweepChoice,
    SweepResult,
    config_changes,
    configuration_config,
    fixed_choice,
    format_lrs,
    load_study,
    main_runs,
    select_lr,
    sweep_runs,
)
from trainer.study.watcher import StudyWatch, StudyWatcher
from trainer.tensorboard import require_tensorboard

Echo = Callable[[str], None]


class StudyIncompleteError(TrainerError):
    """The study ran, but some runs failed, are running elsewhere, or a configuration has no usable sweep run."""


@dataclass
class StudySummary:
    """What :func:`run_study` did and where the study stands."""

    counts: dict[str, int] = field(default_factory=dict)
    """Runs of the selected configurations per state: done, diverged, running, failed, to do."""
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    """(run directory, log, message) of every run that failed twice."""
    elsewhere: list[str] = field(default_factory=list)
    """Run directories another process holds."""
    problems: list[str] = field(default_factory=list)
    """Configurations without a choice, and why."""
    choices: dict[str, SweepChoice] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not (self.failed or self.elsewhere or self.problems)


# ----------------------------------------------------------------------------------------------------
# The plan, from the study file and what is on disk


def selected_configurations(study: Study, only: Sequence[str] = ()) -> list[Configuration]:
    """The configurations named by ``--only`` (labels, comma-separated or repeated), all by default."""
    labels = [label.strip() for item in only for label in item.split(",") if label.strip()]
    unknown = [label for label in labels if label not in study.labels]
    if unknown:
        raise ConfigError(
            f"--only: no configuration {', '.join(unknown)} in study {study.name} ({', '.join(study.labels)})"
        )
    return [c for c in study.configurations if not labels or c.label in labels]


def current_choices(study: Study, out: Path | None) -> dict[str, SweepChoice]:
    """Each configuration's choice as the sweep run directories in ``out`` say now (read only)."""
    choices = {}
    for c in study.configurations:
        if not c.sweep.enabled:
            choices[c.label] = fixed_choice(study, c)
            continue
        runs = sweep_runs(study, c)
        results = [
            sweep_result(out, r) if out else SweepResult(r.name, r.multiplier, r.lrs, "missing") for r in runs
        ]
        choices[c.label] = select_lr(c.label, results, c.sweep.tie_tolerance)
    return choices


def all_runs(study: Study, choices: dict[str, SweepChoice]) -> list[PlannedRun]:
    """Every run of the study in plan order: all sweep runs, then all main runs."""
    sweep = [r for c in study.configurations for r in sweep_runs(study, c)]
    main = [r for c in study.configurations for r in main_runs(study, c, choices.get(c.label))]
    return sweep + main


def check_datasets(study: Study, configurations: Sequence[Configuration], echo: Echo) -> None:
    """Open each dataset the configurations train on and check it fits their model, before any run starts."""
    tokenizers: dict[str, str] = {}
    for c in configurations:
        path = study.data_dir(c)
        try:
            ds = TokenDataset.open(path)
        except TrainerError as e:
            raise TrainerError(f"configuration {c.label}: dataset {c.data}: {e}") from None
        cfg = configuration_config(study, c)
        if ds.vocab_size != cfg.model.vocab_size:
            raise TrainerError(
                f"configuration {c.label}: model.vocab_size={cfg.model.vocab_size} but dataset {c.data} ({path}) "
                f'has {ds.vocab_size} tokens: add "model.vocab_size={ds.vocab_size}" to the study\'s set'
            )
        eval_len = int(ds.meta["eval_batch"]["seq_len"])
        if eval_len > cfg.model.context_length:
            raise TrainerError(
                f"configuration {c.label}: the eval batch of {path} has {eval_len}-token sequences, longer than "
                f"model.context_length={cfg.model.context_length}"
            )
        tokenizers[f"{c.data} ({path})"] = ds.meta.get("tokenizer", {}).get("sha256", "")
    if len(set(tokenizers.values())) > 1:
        echo(
            "warning: the study's datasets do not share a tokenizer ("
            + ", ".join(tokenizers)
            + "): their losses and spectra are not comparable (docs/data.md)"
        )


# ----------------------------------------------------------------------------------------------------
# Running


def make_executor(kind: str | Executor, out: Path, jobs: int | None, slurm: SlurmOptions | None) -> Executor:
    """The executor named by ``--executor`` (``local`` or ``slurm``); an executor object passes through."""
    if not isinstance(kind, str):
        return kind
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "slurm":
        options = replace(slurm or SlurmOptions(), array_parallelism=jobs)
        return SlurmExecutor(out / SLURM_DIR, options)
    raise ConfigError(f"--executor: {kind!r} is not local or slurm")


def run_study(
    source: str | Path,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    only: Sequence[str] = (),
    jobs: int | None = None,
    executor: str | Executor = "local",
    slurm: SlurmOptions | None = None,
    watch: StudyWatch | None = None,
    echo: Echo = print,
) -> StudySummary:
    """Run the study ``source`` (a shipped name or a TOML path) into the study directory ``out``.

    Parameters
    ----------
    source, data_root
        The study and, optionally, where its relative dataset paths are (see
        :func:`trainer.study.spec.load_study`).
    out
        The study directory; created, or continued when it holds this same study.
    only
        Labels of the configurations to run (all by default).
    jobs
        Runs at a time (local: default one per GPU, or 1; slurm: the array parallelism, default no cap).
    executor
        ``local``, ``slurm``, or an :class:`~trainer.study.executors.Executor`.
    slurm
        Job resources for ``executor="slurm"``.
    watch
        Start ``collapse-spectra watch`` on the study directory beside the runs (a process of its own,
        :mod:`trainer.study.watcher`), and return only when it has measured every main run's checkpoints.
    echo
        Where progress lines go (one per run state change).

    Returns
    -------
    StudySummary
        When every selected run is finished (completed or diverged).

    Raises
    ------
    StudyIncompleteError
        After every other run went on: some run failed twice, is running elsewhere, or a configuration's
        sweep gave no usable run (all diverged). The summary lines were printed before.
    TrainerError
        Before anything runs: a bad study file, a study directory of another study or held by another
        study process, a missing dataset or one that does not fit the model.
    """
    study = load_study(source, data_root)
    out = Path(out).expanduser().resolve()
    configurations = selected_configurations(study, only)
    out_existed = out.exists()
    had_study = check_study_dir(out, study)  # refuse before creating anything
    check_datasets(study, configurations, echo)
    if any(configuration_config(study, c).train.tensorboard for c in configurations):
        require_tensorboard("train.tensorboard = true (in the study's runs)")
    if watch is not None:
        require_tensorboard("--watch (its TensorBoard scalars)")
    ex = make_executor(executor, out, jobs, slurm)
    t0 = time.monotonic()
    watcher = StudyWatcher(out, watch, echo) if watch is not None else None
    runner = _Runner(study, out, ex, echo, watcher)
    try:
        with _stop_signals(runner), study_lock(out):
            try:
                summary = runner.run(configurations, str(source))
            except SubmissionRefused:
                if not had_study and not runner.submitted:
                    _remove_unstarted_study(out)
                raise
    except BaseException as e:
        if watcher is not None:
            watcher.stop()
            if isinstance(e, SubmissionRefused) and not had_study and not runner.submitted:
                watcher.discard()  # a study that never started leaves nothing of its watcher either
        if isinstance(e, SubmissionRefused) and not out_existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: the study made nothing else there
        if isinstance(e, KeyboardInterrupt):
            raise RunnerInterrupted(
                f"interrupted by {str(e) or 'SIGINT'}; the runs in progress were told to stop (each writes a "
                "resume state and records where it stopped): run the study again to resume them"
            ) from None
        raise
    if watcher is not None:
        watcher.finish()  # the lock is released: the watcher makes its last pass and ends
    _print_summary(summary, out, time.monotonic() - t0, echo)
    if not summary.complete:
        what = [f"{len(summary.failed)} run(s) failed"] if summary.failed else []
        what += [f"{len(summary.elsewhere)} run(s) running elsewhere"] if summary.elsewhere else []
        what += summary.problems
        raise StudyIncompleteError(f"study {study.name} is not finished: " + "; ".join(what))
    return summary


@contextlib.contextmanager
def _stop_signals(runner: _Runner) -> Iterator[None]:
    """SIGTERM stops the study as SIGINT (Ctrl-C) does: a ``KeyboardInterrupt`` in the main thread.

    The runner is marked as stopping first, so that the runs that end because they were told to stop are
    said to be stopped, not failed. A signal this process was started ignoring (``nohup``, a
    background job of a script) stays ignored; outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        runner.stopping = signal.Signals(signum).name
        raise KeyboardInterrupt(runner.stopping)

    previous = {
        sig: signal.signal(sig, stop)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _remove_unstarted_study(out: Path) -> None:
    """Remove the files of a study that never started (sbatch refused its first jobs): the study's own
    files written by this invocation into a directory that held no study. Run directories, logs and
    anything else are not touched (none was made: nothing was submitted)."""
    for name in (STUDY_TOML, STUDY_JSON, SWEEP_JSON, SWEEP_CSV):
        (out / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / SLURM_DIR).rmdir()  # only when empty: the executor removed its refused submission's files


def _describe(ex: Executor) -> str:
    describe = getattr(ex, "describe", None)
    return describe() if describe else type(ex).__name__


class _Runner:
    """Runs the phases of one study invocation and remembers how each run ended."""

    def __init__(
        self, study: Study, out: Path, executor: Executor, echo: Echo, watcher: StudyWatcher | None = None
    ):
        self.study, self.out, self.executor, self.echo = study, out, executor, echo
        self.watcher = watcher
        self.outcomes: dict[str, RunOutcome] = {}
        self.stopping: str | None = None
        """The signal that is stopping the study (SIGINT or SIGTERM), once one came."""
        self.submitted = False
        """Whether any run was queued or started by this invocation."""
        self._started = 0
        self._total = 0

    def run(self, configurations: Sequence[Configuration], source: str) -> StudySummary:
        """Both phases of the selected configurations (the study directory's lock held)."""
        study, out, echo = self.study, self.out, self.echo
        check_study_dir(out, study)  # again, now that no other study process can change it
        write_study_toml(out, study, source)
        choices = current_choices(study, out)
        write_study_json(out, study, all_runs(study, choices), choices)
        echo(
            f"study {study.name} in {out}: {', '.join(c.label for c in configurations)}; {_describe(self.executor)}"
        )
        if self.watcher is not None:
            self.watcher.start()  # study.json is there and the lock held: the watcher follows this study
        sweep = [r for c in configurations for r in sweep_runs(study, c)]
        if sweep:
            self.phase("sweep", sweep)
        choices = current_choices(study, out)
        write_sweep_files(out, study, choices)
        write_study_json(out, study, all_runs(study, choices), choices)
        for c in configurations:
            if c.sweep.enabled:
                echo(_choice_line(choices[c.label]))
        main = [r for c in configurations for r in main_runs(study, c, choices[c.label]) if r.lrs is not None]
        self.phase("main", main)
        return self.summary(configurations, choices)

    def phase(self, phase: str, runs: Sequence[PlannedRun]) -> None:
        todo, finished = [], []
        for r in runs:
            state = read_run_state(self.out / r.run_dir)
            if state.finished:
                diffs = (
                    completed_config_differences(self.out, r, self.study)
                    if state.status == "completed"
                    else []
                )
                if diffs:
                    raise TrainerError(
                        f"{self.out / r.run_dir} was trained with another config than the study now gives it "
                        f"(the base preset or file changed?): " + "; ".join(diffs)
                    )
                finished.append(r)
            else:
                todo.append((r, state.status))
        resumed = sum(status not in ("missing", "new") for _, status in todo)
        self.echo(
            f"{phase}: {len(runs)} run(s): {len(finished)} finished (skipped), {len(todo) - resumed} to start, "
            f"{resumed} to resume"
        )
        self._total, self._started = len(todo), 0
        tasks = [self._task(r, 1) for r, _ in todo]
        by_name = {r.name: r for r, _ in todo}
        outcomes = self.executor.run(tasks, self._report)
        retry = [self._task(by_name[o.name], 2) for o in outcomes if o.status == "failed" and o.retryable]
        self.outcomes.update({o.name: o for o in outcomes})
        if retry:
            self._total, self._started = len(retry), 0
            self.echo(f"{phase}: retrying {len(retry)} failed run(s) once")
            self.outcomes.update({o.name: o for o in self.executor.run(retry, self._report)})

    def _task(self, run: PlannedRun, attempt: int) -> RunTask:
        return RunTask(
            name=run.name,
            label=run.run_dir,
            config_json=run.config(self.study).to_json(),
            data_dir=run.data_dir,
            run_dir=str(self.out / run.run_dir),
            log=str(self.out / run.log),
            attempt=attempt,
            resume=read_run_state(self.out / run.run_dir).status not in ("missing", "new"),
        )

    def _report(self, event: RunEvent) -> None:
        t, stamp = event.task, datetime.now().strftime("%H:%M:%S")
        log = Path(t.log).relative_to(self.out)
        if event.kind == "note":
            self.echo(f"[{stamp}] note      {event.where}")
        elif event.kind == "queued":
            self.submitted = True
            self.echo(f"[{stamp}] queued    {t.label}  {event.where}")
        elif event.kind == "start":
            self.submitted = True
            self._started += 1
            how = "resume" if t.resume else "new"  # as planned: by now the run may have written its run.json
            self.echo(
                f"[{stamp}] start     {t.label}  ({self._started}/{self._total}, {how}, attempt {t.attempt}, "
                f"{event.where})  log {log}"
            )
        else:
            o = event.outcome
            assert o is not None
            if o.status == "completed":
                loss = read_run_state(Path(t.run_dir)).final_val_loss
                self.echo(f"[{stamp}] done      {t.label}  {_duration(o.elapsed_s)}  val loss {_loss(loss)}")
            elif o.status == "diverged":
                self.echo(f"[{stamp}] diverged  {t.label}  {_duration(o.elapsed_s)}  {o.message}")
            elif o.status == "locked":
                self.echo(f"[{stamp}] elsewhere {t.label}  another process holds it: {o.message}")
            elif self.stopping:  # it ended because the study told it to stop
                self.echo(
                    f"[{stamp}] stopped   {t.label}  {o.message.removesuffix(': continue with --resume')}; "
                    f"the next invocation resumes it; log {log}"
                )
            else:
                then = (
                    "not retried" if not o.retryable else "retrying once" if t.attempt == 1 else "giving up"
                )
                where = f"; log {log}" if Path(t.log).exists() else ""  # a job that never ran wrote none
                self.echo(f"[{stamp}] failed    {t.label}  attempt {t.attempt}: {o.message}; {then}{where}")

    def summary(
        self, configurations: Sequence[Configuration], choices: dict[str, SweepChoice]
    ) -> StudySummary:
        s = StudySummary(choices=choices)
        labels = {c.label for c in configurations}
        runs = [r for r in all_runs(self.study, choices) if r.label in labels]
        for r in runs:
            state = read_run_state(self.out / r.run_dir)
            outcome = self.outcomes.get(r.name)
            if outcome and outcome.status == "locked":
                key = "running"
                s.elsewhere.append(r.run_dir)
            elif state.status == "completed":
                key = "done"
            elif state.status == "diverged":
                key = "diverged"
            elif outcome and outcome.status == "failed":
                key = "failed"
                s.failed.append((r.run_dir, str(self.out / r.log), outcome.message))
            else:
                key = "to do"
            s.counts[key] = s.counts.get(key, 0) + 1
        for c in configurations:
            choice = choices[c.label]
            if choice.status == "all_diverged":
                s.problems.append(
                    f"configuration {c.label}: every sweep run diverged; widen or lower its sweep"
                )
            elif choice.status == "pending":
                s.problems.append(f"configuration {c.label}: no learning rate chosen ({choice.reason})")
        return s


def _print_summary(s: StudySummary, out: Path, elapsed: float, echo: Echo) -> None:
    order = ("done", "diverged", "running", "failed", "to do")
    counts = ", ".join(f"{s.counts.get(k, 0)} {'running elsewhere' if k == 'running' else k}" for k in order)
    echo(f"summary: {sum(s.counts.values())} run(s): {counts}; {_duration(elapsed)} elapsed")
    for run_dir, log, message in s.failed:
        echo(f"  failed: {run_dir}: {message}" + (f" (log: {log})" if Path(log).exists() else ""))
    for run_dir in s.elsewhere:
        echo(
            f"  running elsewhere: {run_dir} (another process holds it; run the study again when it is done)"
        )
    for problem in s.problems:
        echo(f"  {problem}")


def _choice_line(choice: SweepChoice) -> str:
    if choice.status == "chosen":
        return (
            f"sweep {choice.label}: chose {choice.run} ({format_lrs(choice.lrs)}, x{choice.multiplier:g}): "
            f"{choice.reason}"
        )
    return f"sweep {choice.label}: {choice.status}: {choice.reason}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}"


# ----------------------------------------------------------------------------------------------------
# --dry-run and --status


def _run_config_text(study: Study, run: PlannedRun, base_changes_from) -> str:
    cfg = load_config(study.base, list(run.overrides))
    changes = config_changes(base_changes_from, cfg)
    if run.lrs is None:
        changes = [c for c in changes if not c.startswith(("optim.lr=", "optim.muon_lr="))]
        changes.append("optim.lr/optim.muon_lr: chosen by the sweep")
    return " ".join(changes)


def plan_text(
    source: str | Path,
    out: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    only: Sequence[str] = (),
) -> str:
    """``--dry-run``: every run the study would start, with its config's changes from the base.

    With ``out``, each run is marked with what a real run would do with it now (``start``,
    ``resume``, ``skip``), and a study directory of another study is refused as :func:`run_study`
    would. Nothing is written.
    """
    study = load_study(source, data_root)
    configurations = selected_configurations(study, only)
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if out_path is not None:
        check_study_dir(out_path, study)
    choices = current_choices(study, out_path)
    labels = {c.label for c in configurations}
    runs = [r for r in all_runs(study, choices) if r.label in labels]
    n_sweep = sum(r.phase == "sweep" for r in runs)
    base_cfg = load_config(study.base)
    lines = [
        f"study {study.name}: {study.description}".rstrip(": "),
        f"  {len(configurations)} configuration(s) x {len(study.seeds)} seed(s) = {len(runs) - n_sweep} main run(s) "
        f"of {' or '.join(f'{t:,}' for t in sorted({c.tokens for c in configurations}))} tokens, "
        f"{n_sweep} sweep run(s); base {study.base}",
        f"  datasets (data_root {study.data_root}):",
    ]
    for data_class in [d for d in ("standard", "simple", "complex") if d in {c.data for c in configurations}]:
        path = getattr(study.datasets, data_class)
        note = (
            ""
            if (Path(path) / "meta.json").is_file()
            else "  (missing: prepare it with collapse-train prepare-data)"
        )
        lines.append(f"    {data_class:<8} {path}{note}")
    lines.append(f"runs (what differs from {study.base}):")
    for r in runs:
        action = "start"
        if out_path is not None:
            state = read_run_state(out_path / r.run_dir)
            action = {"missing": "start", "new": "start"}.get(state.status, "resume")
            if state.finished:
                action = f"skip ({state.status})"
        lines.append(
            f"  {r.run_dir:<24} {action:<18} data={r.data_class} {_run_config_text(study, r, base_cfg)}"
        )
    return "\n".join(lines)


def status_text(source: str | Path, out: str | Path, *, data_root: str | Path | None = None) -> str:
    """``--status``: each run's state, tokens and time, the sweep's choices and totals; nothing is written.

    A run is ``running`` while a live process holds its run directory's lock (its pid and host are
    shown), whatever its ``run.json`` says; a run that was stopped (``interrupted``) or killed (its
    ``run.json`` still says ``running``) is ``stopped``: the next invocation resumes it.
    """
    study = load_study(source, data_root)
    out_path = Path(out).expanduser().resolve()
    if not check_study_dir(out_path, study):
        return f"study {study.name}: {out_path} holds no study yet (nothing started)"
    holder = lock_holder(out_path)
    choices = current_choices(study, out_path)
    rows, counts = [], {}
    done_tokens = planned_tokens = 0
    wall = 0.0
    for r in all_runs(study, choices):
        state = read_run_state(out_path / r.run_dir)
        held = None if state.finished else live_holder(out_path / r.run_dir / RUN_LOCK_FILE)
        key = {
            "completed": "done",
            "diverged": "diverged",
            "failed": "failed",
            "interrupted": "stopped",
            "running": "stopped",
        }.get(state.status, "to do")
        key = "running" if held is not None else key
        counts[key] = counts.get(key, 0) + 1
        total = state.total_tokens or _planned_tokens(study, r)
        done_tokens += state.tokens
        planned_tokens += total
        wall += state.wall_time_s
        rows.append(
            f"  {r.phase:<5}  {r.name:<18} {key:<9} {_tokens(state.tokens):>8} / {_tokens(total):<8} "
            f"{_duration(state.wall_time_s) if state.status != 'missing' else '-':>8}  "
            f"{_loss(state.final_val_loss):>7}  {format_lrs(r.lrs)}"
            + (f"  ({describe_holder(held)})" if held is not None else "")
        )
    order = ("done", "diverged", "running", "stopped", "failed", "to do")
    head = [
        f"study {study.name} in {out_path}: "
        + (f"a study process is working on it ({holder})" if holder else "no study process is working on it"),
        f"  {sum(counts.values())} run(s): "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)
        + f"; tokens {_tokens(done_tokens)} of {_tokens(planned_tokens)}; {_duration(wall)} of run time",
        f"  {'phase':<5}  {'run':<18} {'state':<9} {'tokens':>8} / {'budget':<8} {'elapsed':>8}  {'val loss':>7}  lrs",
    ]
    sweeps = [_choice_line(choices[c.label]) for c in study.configurations if c.sweep.enabled]
    return "\n".join(head + rows + [f"  {line}" for line in sweeps])


def _planned_tokens(study: Study, run: PlannedRun) -> int:
    """The tokens a run will train: its budget in whole optimizer steps of one process."""
    cfg = load_config(
        study.base, [o for o in run.overrides if not o.startswith(("optim.lr=", "optim.muon_lr="))]
    )
    step = tokens_per_step(cfg)
    return total_steps_for(cfg, step) * step
