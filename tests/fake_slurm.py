"""A one-node SLURM cluster in one file: fake ``sbatch``, ``squeue``, ``sacct``, ``scancel``, ``sinfo``, ``srun``.

They replay what a real one-node cluster (Debian's slurm-wlm 22.05, a 2-CPU node without GPUs, no
slurmdbd) did with the study runner's jobs, so that the SLURM executor is tested through submitit's real
``slurm`` code path (its sbatch script, its pickles, its ``_submit`` on the "node") without a cluster:

- ``sbatch`` refuses an unknown partition and any GPU request with the real messages; a job asking more
  CPUs than the node has is accepted and pends forever with reason ``PartitionConfig``.
- array tasks start at most ``%N`` at a time and while the node has free CPUs (else ``JobArrayTaskLimit``
  or ``Resources``); a task runs the submission script with SLURM's environment, on this machine.
- ``scancel`` of a pending task removes it without a trace (``squeue --states=all`` and ``sacct`` know
  nothing of it), as the real controller does; of a running one, kills it (state ``CANCELLED``).
- ``sacct`` fails with ``Slurm accounting storage is disabled`` unless the cluster has accounting.
- ``squeue`` can be made to fail as when the controller is unreachable, for its first N calls
  (``squeue_down_for``), while the jobs go on.

The cluster advances when any command runs (each first starts what can start), so a test controls time
by polling. :func:`install` writes the commands into a directory for ``PATH``; the state is a JSON file
under a lock, so concurrent commands see one consistent cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "srun")
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def install(
    bin_dir: Path, state_dir: Path, *, cpus: int = 2, accounting: bool = False, squeue_down_for: int = 0
) -> Path:
    """Write the fake commands into ``bin_dir`` (put it first on PATH) for a cluster kept in ``state_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    config = {"cpus": cpus, "accounting": accounting, "squeue_down_for": squeue_down_for}
    (state_dir / "config.json").write_text(json.dumps(config))
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(
            f'#!/bin/sh\nFAKE_SLURM_DIR={state_dir} exec {sys.executable} {Path(__file__).resolve()} {name} "$@"\n'
        )
        path.chmod(0o755)
    return bin_dir


def read_state(state_dir: Path) -> dict:
    """The cluster's jobs as the fake controller keeps them (for the tests' assertions)."""
    path = state_dir / "state.json"
    empty = {"next_id": 1, "jobs": {}, "submitted": [], "squeue_calls": 0}
    return json.loads(path.read_text()) if path.exists() else empty


@contextlib.contextmanager
def cluster(state_dir: Path):
    """The state, locked, advanced (tasks that finished end, pending ones start), and saved afterwards."""
    with open(state_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(state_dir)
        config = json.loads((state_dir / "config.json").read_text())
        schedule(state, config, state_dir)
        yield state, config
        (state_dir / "state.json").write_text(json.dumps(state))


def schedule(state: dict, config: dict, state_dir: Path) -> None:
    """End the tasks whose script exited; start pending ones while the array's cap and the CPUs allow."""
    jobs = state["jobs"]
    for job in jobs.values():
        rc_file = state_dir / f"{job['id']}.rc"
        if job["state"] == "RUNNING" and rc_file.exists():
            job["state"] = "COMPLETED" if rc_file.read_text().strip() == "0" else "FAILED"
    used = sum(j["cpus"] for j in jobs.values() if j["state"] == "RUNNING")
    for job in jobs.values():
        if job["state"] != "PENDING" or job["reason"] == "PartitionConfig":
            continue
        siblings = [j for j in jobs.values() if j["array"] == job["array"] and j["state"] == "RUNNING"]
        if job["cap"] and len(siblings) >= job["cap"]:
            job["reason"] = "JobArrayTaskLimit"
        elif used + job["cpus"] > config["cpus"]:
            job["reason"] = "Resources"
        else:
            used += job["cpus"]
            job.update(state="RUNNING", reason="None")
            job["pid"] = subprocess.Popen(
                [sys.executable, __file__, "_run", job["id"]],
                env={**os.environ, "FAKE_SLURM_DIR": str(state_dir)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: scancel kills the group, as proctrack/pgid does
            ).pid


def sbatch(args: list[str], state_dir: Path) -> int:
    script = Path(args[-1])
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script.read_text(), re.MULTILINE))
    with cluster(state_dir) as (state, config):
        if options.get("partition", "debug") != "debug":
            print(f"sbatch: error: invalid partition specified: {options['partition']}", file=sys.stderr)
            print(
                "sbatch: error: Batch job submission failed: Invalid partition name specified",
                file=sys.stderr,
            )
            return 1
        if int(options.get("gpus-per-node", "0")) > 0 or "gpu" in options.get("gres", ""):
            print("sbatch: error: Invalid generic resource (gres) specification", file=sys.stderr)
            return 1
        array_id = str(state["next_id"])
        state["next_id"] += 1
        state["submitted"].append({"id": array_id, "options": options})
        cpus = int(options.get("cpus-per-task", "1"))
        match = re.fullmatch(r"0-(\d+)(?:%(\d+))?", options.get("array", ""))
        indices = range(int(match.group(1)) + 1) if match else [None]
        for i in indices:
            job_id = array_id if i is None else f"{array_id}_{i}"
            state["jobs"][job_id] = {
                "id": job_id,
                "array": array_id,
                "task": i,
                "state": "PENDING",
                "reason": "PartitionConfig" if cpus > config["cpus"] else "None",
                "cpus": cpus,
                "cap": int(match.group(2)) if match and match.group(2) else 0,
                "script": str(script),
                "options": options,
                "pid": None,
            }
        schedule(state, config, state_dir)
    print(f"Submitted batch job {array_id}")
    return 0


def squeue(args: list[str], state_dir: Path) -> int:
    wanted = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--jobs=")), None)
    every_state = "--states=all" in args
    with cluster(state_dir) as (state, config):
        state["squeue_calls"] += 1
        if state["squeue_calls"] <= config["squeue_down_for"]:
            print(
                "slurm_load_jobs error: Unable to contact slurm controller (connect failure)", file=sys.stderr
            )
            return 1
        known = [
            j for j in state["jobs"].values() if wanted is None or j["array"] in wanted or j["id"] in wanted
        ]
    if wanted and not known:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    for job in known:
        if every_state or job["state"] not in FINAL:
            print(f"{job['id']}|{job['state']}|{job['reason']}")
    return 0


def scancel(args: list[str], state_dir: Path) -> int:
    with cluster(state_dir) as (state, _):
        for target in (a for a in args if not a.startswith("-")):
            for job in [j for j in state["jobs"].values() if target in (j["id"], j["array"])]:
                if job["state"] == "PENDING":  # a pending array task leaves no trace at all
                    del state["jobs"][job["id"]]
                elif job["state"] == "RUNNING":
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(job["pid"], signal.SIGKILL)
                    job.update(state="CANCELLED", reason="None")
    return 0


def sacct(args: list[str], state_dir: Path) -> int:
    with cluster(state_dir) as (state, config):
        if not config["accounting"]:
            print("Slurm accounting storage is disabled", file=sys.stderr)
            return 1
        wanted = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--jobs=")), [])
        for job in state["jobs"].values():
            if job["array"] in wanted or job["id"] in wanted:
                print(f"{job['id']}|{job['state']}")
    return 0


def sinfo(args: list[str], state_dir: Path) -> int:
    config = json.loads((state_dir / "config.json").read_text())
    print(f"debug*|{config['cpus']}|2000|(null)")
    return 0


def srun(args: list[str], state_dir: Path) -> int:
    """Run the step's command in place; its output goes where the job's does (the real one splits per task)."""
    while args and args[0].startswith("--"):
        args = args[2:] if args[0] in ("--output", "--error") else args[1:]
    os.execvp(args[0], args)


def run_task(job_id: str, state_dir: Path) -> int:
    """One task on the "node": the submission script with SLURM's environment; its exit status recorded."""
    job = read_state(state_dir)["jobs"][job_id]
    array, task = job["array"], job["task"]

    def path(pattern: str) -> str:
        return pattern.replace("%A", array).replace("%a", str(task)).replace("%j", job_id)

    env = {
        **os.environ,
        "SLURM_JOB_ID": array if task is None else str(10_000 * int(array) + task),  # each task has its own
        "SLURM_CPUS_PER_TASK": str(job["cpus"]),
        "SLURM_JOB_NODELIST": "fakenode",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    if task is not None:
        env.update(SLURM_ARRAY_JOB_ID=array, SLURM_ARRAY_TASK_ID=str(task))
    out = Path(path(job["options"]["output"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as stdout, open(path(job["options"]["error"]), "a") as stderr:
        rc = subprocess.run(["bash", job["script"]], env=env, stdout=stdout, stderr=stderr).returncode
    (state_dir / f"{job_id}.rc").write_text(str(rc))
    return rc


def main(argv: list[str]) -> int:
    state_dir = Path(os.environ["FAKE_SLURM_DIR"])
    name, args = argv[0], argv[1:]
    if name == "_run":
        return run_task(args[0], state_dir)
    return {
        "sbatch": sbatch,
        "squeue": squeue,
        "sacct": sacct,
        "scancel": scancel,
        "sinfo": sinfo,
        "srun": srun,
    }[name](args, state_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
