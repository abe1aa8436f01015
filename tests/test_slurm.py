"""The SLURM executor against a replayed cluster: fake ``sbatch``/``squeue``/``sacct``/``scancel``/``sinfo``/
``srun`` on PATH (``fake_slurm.py``) that do what a real one-node slurm-wlm 22.05 cluster without GPUs or
accounting did, driven through submitit's real ``slurm`` code path (its sbatch script and pickles, its
``_submit`` running the job). tests/test_slurm_cluster.py runs the same cases on a real cluster where
one can be started.

The cases are the ones that hung or crashed on a real cluster: sbatch refusing the jobs, an array task
cancelled while pending (it vanishes without a record), a job pending for a reason that never clears.
A study that hangs instead of failing is caught by :func:`run_guarded`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import fake_slurm
import pytest
from click.testing import CliRunner
from study_helpers import inprocess, run_guarded, tree_bytes, write_tiny_study

from cli.train import main as train_main
from trainer.rundir import read_run_state
from trainer.study.executors import RunnerInterrupted, RunTask, SlurmExecutor, SlurmOptions, worker_command
from trainer.study.runner import StudyIncompleteError, run_study

pytestmark = pytest.mark.usefixtures("one_thread")
submitit = pytest.importorskip("submitit")


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch) -> Path:
    """A fake one-node cluster (2 CPUs, no GPUs, no accounting) first on PATH; its state directory."""
    state = tmp_path / "fake-slurm"
    bin_dir = fake_slurm.install(tmp_path / "fake-bin", state, cpus=2)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield state
    for job in fake_slurm.read_state(state)["jobs"].values():  # a failed test leaves no task running
        if job["state"] == "RUNNING":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job["pid"], signal.SIGKILL)


@pytest.fixture
def study_file(tmp_path, tiny_data_dir, tiny_vocab) -> Path:
    return write_tiny_study(tmp_path / "tiny-study.toml", tiny_data_dir, tiny_vocab)


def cli(*args: str):
    return CliRunner().invoke(train_main, ["study", *map(str, args)])


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output and "sbatch: error" not in output  # sbatch's lines are in ours
    return [line for line in output.splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------------------------------
# sbatch refuses the jobs


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (
            ["--partition", "nosuchpart"],
            "invalid partition specified: nosuchpart; Batch job submission failed: Invalid partition name "
            "specified (asked: --partition=nosuchpart, no GPU, --cpus-per-task=8, --time=1440)",  # sinfo knew none
        ),
        (
            ["--gpus-per-job", "1"],
            "Invalid generic resource (gres) specification (asked: default partition, --gpus-per-node=1, "
            "--cpus-per-task=2, --time=1440)",
        ),
    ],
)
def test_a_refused_submission_is_one_line_and_leaves_no_study_behind(
    fake_cluster, study_file, tmp_path, option, said
):
    out = tmp_path / "study"
    result = cli(study_file, "--out", out, "--executor", "slurm", "--only", "B", *option)
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        f"Error: sbatch refused the jobs of 2 run(s): {said}; nothing was submitted"
    ]
    assert not out.exists()  # no study.toml, study.json, pickles or lock of a study that never started
    (tmp_path / "empty").mkdir()  # a directory the user made is left, empty as it was
    assert cli(study_file, "--out", tmp_path / "empty", "--executor", "slurm", *option).exit_code == 1
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_refused_submission_with_watch_leaves_nothing_of_the_watcher_either(
    fake_cluster, study_file, tmp_path
):
    out = tmp_path / "study"
    result = cli(
        study_file, "--out", out, "--executor", "slurm", "--only", "B", "--partition", "nosuchpart", "--watch"
    )
    assert result.exit_code == 1 and "sbatch refused the jobs of 2 run(s)" in result.output
    assert "watch: spectra of every main run on cpu" in result.output  # it was started, then stopped
    assert not out.exists()  # no logs/watch.log of a study that never started


def test_a_refused_rerun_of_a_started_study_changes_nothing(fake_cluster, study_file, tmp_path):
    out = tmp_path / "study"
    study_file.write_text(study_file.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)  # A still to do
    (out / "slurm").mkdir()
    (out / "slurm" / "notes.txt").write_text("mine")  # whatever an earlier run or the user left there
    before = tree_bytes(out)
    result = cli(study_file, "--out", out, "--executor", "slurm", "--partition", "nosuchpart")
    assert result.exit_code == 1 and len(error_lines(result.output)) == 1
    assert "sbatch refused the jobs of 2 run(s): invalid partition specified" in result.output
    assert tree_bytes(out) == before  # the refused batch's pickles and script are gone, nothing else


# ----------------------------------------------------------------------------------------------------
# defaults on a cluster without GPUs, a vanished job, a job that can never start


def test_defaults_come_from_the_partition(fake_cluster, tmp_path):
    ex = SlurmExecutor(tmp_path / "slurm", SlurmOptions())
    assert (ex.options.gpus_per_job, ex.options.cpus_per_job) == (0, 2)  # no GPUs; 8 capped at 2 cores
    assert "defaults from partition debug: 1 node(s), at most 2 CPUs and 0 GPUs each" in ex.describe()
    params = ex._executor()._executor.parameters
    assert "gpus_per_node" not in params and params["cpus_per_task"] == 2  # no --gres at all
    fake_slurm.install(tmp_path / "big-bin", fake_cluster, cpus=64)  # the same cluster with a 64-core node
    big = SlurmExecutor(tmp_path / "slurm", SlurmOptions(gpus_per_job=2))
    assert (big.options.gpus_per_job, big.options.cpus_per_job) == (2, 16)  # 8 per GPU
    assert big._executor()._executor.parameters["gpus_per_node"] == 2
    explicit = SlurmExecutor(tmp_path / "slurm", SlurmOptions(gpus_per_job=0, cpus_per_job=3))
    assert (explicit.options.cpus_per_job, explicit.sized_by) == (3, "")  # given: sinfo is not asked


@pytest.mark.slow
def test_a_task_cancelled_while_pending_is_a_failed_attempt_and_retried(
    fake_cluster, study_file, tmp_path, caplog
):
    """One run at a time (``--jobs 1``): B-s1 pends behind B-s0 and is cancelled there, which leaves no trace
    in squeue or sacct. The study says so, retries it, and finishes; submitit's sacct warnings never show."""
    out = tmp_path / "study"
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        queued = re.search(r"queued    runs/B-s1  SLURM job (\d+_1)$", line)
        if queued:
            subprocess.run(["scancel", queued.group(1)], check=True)

    ex = SlurmExecutor(out / "slurm", SlurmOptions(array_parallelism=1, poll_s=0.3, grace_s=1.0))
    with caplog.at_level(logging.WARNING, logger="submitit"):
        run_guarded(study_file, out, ex, echo, only=["B"])
    assert {read_run_state(out / "runs" / r).status for r in ("B-s0", "B-s1")} == {"completed"}
    failed = [x for x in lines if "failed    runs/B-s1  attempt 1:" in x]
    assert (
        len(failed) == 1
        and "vanished: not in the queue for 1 s, no result file, no accounting record" in failed[0]
    )
    assert failed[0].endswith("(cancelled while pending?); retrying once")  # no log: it never ran
    assert any("start     runs/B-s1  (1/1, new, attempt 2" in x for x in lines)
    assert any("start     runs/B-s0  (1/2, new, attempt 1" in x for x in lines)  # not "resume"
    notes = [x for x in lines if "] note " in x]
    assert len(notes) == 1 and "no SLURM accounting (Slurm accounting storage is disabled)" in notes[0]
    assert not [r for r in caplog.records if r.name.startswith("submitit")]
    submitted = fake_slurm.read_state(fake_cluster)["submitted"]
    assert [s["options"].get("gpus-per-node") for s in submitted] == [None, None]  # CPU-only: no GPU asked
    assert [s["options"]["cpus-per-task"] for s in submitted] == ["2", "2"]


def test_a_job_that_can_never_start_is_cancelled_and_not_retried(fake_cluster, study_file, tmp_path):
    out = tmp_path / "study"
    lines: list[str] = []
    ex = SlurmExecutor(out / "slurm", SlurmOptions(cpus_per_job=8, poll_s=0.2, grace_s=0.5))
    with pytest.raises(StudyIncompleteError, match="2 run\\(s\\) failed"):
        run_guarded(study_file, out, ex, lines.append, only=["B"])
    failed = [x for x in lines if "] failed " in x]
    assert len(failed) == 2 and all(x.endswith("; cancelled it; not retried") for x in failed)
    assert "can never start: pending for 0.5 s with reason PartitionConfig (it asks more CPUs" in failed[0]
    assert "asked: default partition, no GPU, --cpus-per-task=8, --time=1440" in failed[0]
    assert not any("retrying" in x for x in lines)
    assert fake_slurm.read_state(fake_cluster)["jobs"] == {}  # cancelled: nothing waits in the queue


@pytest.mark.slow
def test_an_unreachable_controller_is_no_verdict(fake_cluster, study_file, tmp_path):
    """squeue failing (the controller restarting) says nothing about the jobs: no job is judged gone while
    it cannot be seen, however long that lasts past the grace; one line says why the study waits."""
    study_file.write_text(study_file.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    fake_slurm.install(tmp_path / "fake-bin", fake_cluster, squeue_down_for=15)  # 15 looks: 3 s, 6 graces
    out = tmp_path / "study"
    lines: list[str] = []
    run_guarded(
        study_file,
        out,
        SlurmExecutor(out / "slurm", SlurmOptions(poll_s=0.2, grace_s=0.5)),
        lines.append,
        only=["B"],
    )
    assert read_run_state(out / "runs" / "B-s0").status == "completed"
    assert not any("] failed " in x for x in lines)
    notes = [x for x in lines if "] note " in x]
    assert (
        len(notes) == 1
        and "squeue failed (slurm_load_jobs error: Unable to contact slurm controller" in notes[0]
    )
    assert fake_slurm.read_state(fake_cluster)["squeue_calls"] > 15  # it was asked again until it answered


def test_an_interrupted_study_names_the_jobs_that_go_on(fake_cluster, study_file, tmp_path):
    out = tmp_path / "study"

    def interrupt_once_queued(line: str) -> None:
        if "queued    runs/B-s1" in line:
            raise KeyboardInterrupt("SIGTERM")  # what the runner's handler raises on SIGTERM

    ex = SlurmExecutor(out / "slurm", SlurmOptions(cpus_per_job=8, poll_s=0.2))
    with pytest.raises(RunnerInterrupted) as stop:
        run_guarded(study_file, out, ex, interrupt_once_queued, only=["B"])
    assert stop.value.exit_code == 130
    assert str(stop.value) == (
        "interrupted by SIGTERM; SLURM job(s) 1_0 (pending), 1_1 (pending) go on without this process: run the "
        "study again to pick up their results, or cancel them with scancel 1_0 1_1"
    )


def test_slurm_parameters_map_onto_submitit(fake_cluster, tmp_path):
    options = SlurmOptions(
        partition="gpu", time_min=90, gpus_per_job=2, array_parallelism=3, setup=("source venv/bin/activate",)
    )
    ex = SlurmExecutor(tmp_path / "slurm", options)._executor()
    assert isinstance(ex, submitit.AutoExecutor) and ex.cluster == "slurm"
    params = ex._executor.parameters
    assert (params["partition"], params["time"], params["gpus_per_node"], params["array_parallelism"]) == (
        "gpu",
        90,
        2,
        3,
    )
    # a partition sinfo does not list: 8 cores per GPU, and sbatch says what is wrong with the partition
    assert params["cpus_per_task"] == 16 and params["ntasks_per_node"] == 1
    assert params["setup"] == ["source venv/bin/activate"]
    task = RunTask("r", "runs/r", "{}", "d", "/nowhere/r", "/nowhere/log")
    assert worker_command(task, nproc=2, parent_pid=7)[1:5] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
    ]
    assert "--parent-pid" not in worker_command(task, nproc=2, parent_pid=7)  # torchrun is its parent
    assert worker_command(task, parent_pid=7)[-2:] == ["--parent-pid", "7"]
