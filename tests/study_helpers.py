"""The tiny study the study and SLURM tests share, and ways to run its runs quickly (shared by test_study.py and
test_slurm*.py; plain functions, like ``helpers.py``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path

from helpers import TINY_MODEL_OVERRIDES

from trainer.study.executors import LocalExecutor, RunOutcome, RunTask, classify, worker_command
from trainer.study.runner import run_study
from trainer.study.worker import main as worker_main

HANG_GUARD_S = 600
"""How long a test waits for something that takes seconds before it calls it a hang (the old code hung for
ever). It guards against hanging only: no test asserts how long anything takes."""

# a tiny study: 24k-parameter model, 10 optimizer steps of 128 tokens per main run


def tiny_study_text(vocab: int, **fields: object) -> str:
    """A study of two configurations (A: muon + QK-norm with a 2-point sweep; B: adamw, no QK-norm, no
    sweep) x 2 seeds on the session's tiny dataset; ``fields`` replace top-level keys (TOML values)."""
    shared = [f"model.vocab_size={vocab}", *TINY_MODEL_OVERRIDES]
    shared += ["train.batch_size=4", "train.seq_len=32", "train.val_tokens=256", "train.log_every=1"]
    top = {
        "name": '"tiny-study"',
        "base": '"tiny"',
        "set": json.dumps(shared),
        "seeds": "[0, 1]",
        "tokens": "1280",
        **{k: str(v) for k, v in fields.items()},
    }
    return (
        "\n".join(f"{k} = {v}" for k, v in top.items())
        + """
[datasets]
standard = "DATA"

[sweep]
multipliers = [0.5, 2.0]
tokens = 640
seed = 7

[[configurations]]
label = "A"
qk_norm = "learned"
optimizer = "muon"

[[configurations]]
label = "B"
description = "AdamW, no QK-norm"
qk_norm = "none"
optimizer = "adamw"
sweep = { multipliers = [] }
"""
    )


def write_tiny_study(path: Path, data_dir: Path, vocab: int, **fields: object) -> Path:
    """:func:`tiny_study_text` on the dataset ``data_dir``, written to ``path``."""
    path.write_text(tiny_study_text(vocab, **fields).replace("DATA", str(data_dir)))
    return path


def inprocess_launch(task: RunTask, env=None, *, threads=None, on_start=None, nproc=1) -> RunOutcome:
    """The worker's own code in this process, its output in the task's log (for one job at a time)."""
    Path(task.log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(task.log, "a") as log, contextlib.redirect_stdout(log):
        print(f"=== attempt {task.attempt} of {task.name} (in process) ===")
        args = worker_command(task)[3:]  # drop `python -m trainer.study.worker`
        rc = worker_main(args)
    return classify(task, rc, time.monotonic() - t0)


def inprocess(jobs: int = 1) -> LocalExecutor:
    return LocalExecutor(jobs, gpus=[], cpus=1, launch=inprocess_launch)


def tree_bytes(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every file under ``root``: a finished run must not be touched."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_guarded(study_file: Path, out: Path, executor, echo, **options) -> None:
    """:func:`run_study` in a thread, re-raising what it raised; a study still running after
    :data:`HANG_GUARD_S` fails the test instead of hanging it (the old SLURM executor waited for ever)."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            run_study(study_file, out, executor=executor, echo=echo, **options)
        except BaseException as e:  # handed to the test's thread
            raised.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), f"the study still runs after {HANG_GUARD_S} s: it hangs"
    if raised:
        raise raised[0]
