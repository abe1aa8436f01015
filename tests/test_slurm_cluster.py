"""The SLURM executor on a real cluster: the cases of tests/test_slurm.py against real slurmctld/slurmd.

``scripts/slurm-up.sh`` starts a one-node cluster (Debian's slurm-wlm, this machine's CPUs, no GPUs, no
accounting) where it runs as root on Debian, and ``scripts/test.sh`` calls it; these tests skip, saying
why, when ``sinfo`` cannot reach a controller. They use this machine as the compute node, so the study
directory in the test's temporary directory is shared with the jobs. Each test polls every half second;
all of them take well under two minutes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from study_helpers import run_guarded, write_tiny_study

from cli.train import main as train_main
from trainer.rundir import read_run_state
from trainer.study.executors import LocalExecutor, SlurmExecutor, SlurmOptions
from trainer.study.runner import StudyIncompleteError


def cluster_problem() -> str | None:
    """Why there is no cluster to test on (None: there is one, with a node up)."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH (scripts/slurm-up.sh starts a one-node SLURM as root on Debian)"
    try:
        done = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%t"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        return f"sinfo cannot reach a SLURM controller ({said[-1] if said else done.returncode})"
    if not re.search(r"^(idle|mix|alloc)", done.stdout, re.MULTILINE):
        return f"no SLURM node is up (sinfo: {done.stdout.split()})"
    return None


PROBLEM = cluster_problem()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(PROBLEM is not None, reason=f"no SLURM cluster: {PROBLEM}"),
]
submitit = pytest.importorskip("submitit")


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%c"], capture_output=True, text=True)
    return max(int(re.match(r"\d+", x).group()) for x in out.stdout.split())


@pytest.fixture
def study_file(tmp_path, tiny_data_dir, tiny_vocab) -> Path:
    return write_tiny_study(tmp_path / "tiny-study.toml", tiny_data_dir, tiny_vocab)


@pytest.fixture
def jobs_seen():
    """A list the test adds its SLURM job ids to; whatever of them is still queued is cancelled afterwards."""
    seen: list[str] = []
    yield seen
    if seen:
        subprocess.run(["scancel", *seen], capture_output=True)


def recorder(lines: list[str], jobs: list[str], then=None):
    def echo(line: str) -> None:
        lines.append(line)
        jobs.extend(re.findall(r"SLURM job (\d+(?:_\d+)?)", line))
        if then:
            then(line)

    return echo


def quick(**options) -> SlurmOptions:
    """Options for a test: half-second polls, a short grace (the study directory is on a local disk)."""
    return SlurmOptions(poll_s=0.5, grace_s=3.0, **options)


def checkpoints(run: Path) -> dict[str, tuple[dict[str, str], dict[str, bytes]]]:
    """Each checkpoint's metadata and the raw bytes of each of its tensors."""
    found = {}
    for path in sorted((run / "checkpoints").glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            raw = {
                k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes() for k in f.keys()
            }
            found[path.name] = (f.metadata(), raw)
    return found


def test_a_study_on_slurm_trains_bit_identical_checkpoints_to_the_local_executor(
    study_file, tmp_path, jobs_seen
):
    study_file.write_text(study_file.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    lines: list[str] = []
    run_guarded(study_file, local, LocalExecutor(1, gpus=[], cpus=1), lines.append, only=["B"])
    executor = SlurmExecutor(slurm / "slurm", quick(cpus_per_job=1))  # one thread, as the local run had
    run_guarded(study_file, slurm, executor, recorder(lines, jobs_seen), only=["B"])
    assert any("] done      runs/B-s0" in x and "SLURM" not in x for x in lines)
    expected, got = checkpoints(local / "runs" / "B-s0"), checkpoints(slurm / "runs" / "B-s0")
    assert len(expected) == 8 and list(got) == list(expected)
    for name in expected:  # the same weights, bit for bit, and the same metadata
        assert got[name] == expected[name], name


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--partition", "nosuchpart"], "Batch job submission failed: Invalid partition name specified"),
        (["--gpus-per-job", "1"], "Invalid generic resource (gres) specification"),
    ],
)
def test_sbatch_refusals_are_one_line_and_leave_nothing(study_file, tmp_path, option, said):
    gres = subprocess.run(["sinfo", "--noheader", "--format=%G"], capture_output=True, text=True).stdout
    if "gpu" in gres and option[0] == "--gpus-per-job":
        pytest.skip("this cluster has GPUs: a GPU request is no error here")
    out = tmp_path / "study"
    result = CliRunner().invoke(
        train_main,
        ["study", str(study_file), "--out", str(out), "--executor", "slurm", "--only", "B", *option],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "sbatch: error" not in result.output  # sbatch's lines are in ours
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: sbatch refused the jobs of 2 run(s): ")
    assert said in errors[0] and errors[0].endswith("; nothing was submitted")
    assert not out.exists()


def test_scancel_of_a_pending_task_is_a_failed_attempt_then_retried(study_file, tmp_path, jobs_seen):
    out = tmp_path / "study"
    lines: list[str] = []

    def cancel_b1(line: str) -> None:
        queued = re.search(r"queued    runs/B-s1  SLURM job (\d+_1)$", line)
        if queued:  # one job at a time: B-s1 waits behind B-s0
            subprocess.run(["scancel", queued.group(1)], check=True)

    executor = SlurmExecutor(out / "slurm", quick(cpus_per_job=1, array_parallelism=1))
    run_guarded(study_file, out, executor, recorder(lines, jobs_seen, cancel_b1), only=["B"])
    assert {read_run_state(out / "runs" / r).status for r in ("B-s0", "B-s1")} == {"completed"}
    failed = [x for x in lines if "failed    runs/B-s1  attempt 1:" in x]
    assert len(failed) == 1 and "vanished: not in the queue for 3 s, no result file" in failed[0]
    assert failed[0].endswith("retrying once")
    assert any("start     runs/B-s1  (1/1, new, attempt 2" in x for x in lines)


def test_a_job_that_can_never_start_is_reported_not_waited_on(study_file, tmp_path, jobs_seen):
    out = tmp_path / "study"
    lines: list[str] = []
    cpus = node_cpus() + 1
    executor = SlurmExecutor(out / "slurm", quick(cpus_per_job=cpus))
    with pytest.raises(StudyIncompleteError, match="2 run\\(s\\) failed"):
        run_guarded(study_file, out, executor, recorder(lines, jobs_seen), only=["B"])
    failed = [x for x in lines if "] failed " in x]
    assert len(failed) == 2 and all(
        "can never start: pending for 3 s with reason Partition" in x for x in failed
    )
    assert all(f"--cpus-per-task={cpus}" in x and x.endswith("cancelled it; not retried") for x in failed)
    queue = subprocess.run(
        ["squeue", "--noheader", "--format=%i"], capture_output=True, text=True
    ).stdout.split()
    assert not set(queue) & set(jobs_seen)  # nothing of the study waits in the queue
