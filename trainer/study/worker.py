"""``python -m trainer.study.worker``: train one run of a study in this process (what the executors launch).

It decides from the run directory alone how to train it, so a retry, a re-run of the study or a
SLURM requeue does the right thing without being told: a ``completed`` run is left alone, an
existing run directory is resumed (``resume=True``), a missing or empty one is started. The exit
status tells the executor how it ended: 0 completed, :data:`trainer.study.executors.EXIT_DIVERGED`,
:data:`trainer.study.executors.EXIT_LOCKED` (another process holds the run directory), 1 any other error
(its message on the last ``error: ...`` line). With ``--parent-pid`` it stops (as on SIGTERM) when the
process that launched it dies, however it dies (:func:`stop_with_parent`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from trainer.config import ConfigError, run_config_from_dict
from trainer.errors import DivergedError, RunLockedError, TrainerError, TrainingInterrupted
from trainer.study.executors import EXIT_DIVERGED, EXIT_LOCKED

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies (Linux)."""


def stop_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """SIGTERM this process when ``parent_pid`` (the study runner that launched it) dies, however it dies.

    The workers run in sessions of their own (a Ctrl-C reaches the runner only, which forwards it), so
    nothing else would stop them after a SIGKILL of the runner: they would train on unsupervised. SIGTERM
    stops a run like Ctrl-C does (a resume state is written, ``run.json`` says ``interrupted``). On Linux
    the kernel sends it (``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent every ``poll_s``.
    A parent that is already gone stops this process at once.
    """
    try:
        kernel_watches = (
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        )
    except (OSError, AttributeError):  # no prctl: not Linux
        kernel_watches = False
    if os.getppid() != parent_pid:  # it died before the line above: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    if not kernel_watches:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(poll_s)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.study.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config-json", required=True, help="the full run config as JSON")
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process dies")
    args = parser.parse_args(argv)
    if args.parent_pid:
        stop_with_parent(args.parent_pid)

    # imported once the parent is watched: torch and the training stack take seconds to import, and a
    # runner that dies meanwhile must still stop this worker
    import torch

    from trainer.rundir import read_run_state
    from trainer.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        cfg = run_config_from_dict(json.loads(args.config_json))
    except (json.JSONDecodeError, ConfigError) as e:
        print(f"error: --config-json: {e}", flush=True)
        return 1
    state = read_run_state(out)
    if state.status == "completed":
        print(f"{cfg.name}: already completed, nothing to do", flush=True)
        return 0
    resume = out.exists() and not (out.is_dir() and not any(out.iterdir()))
    print(
        f"{'resuming' if resume else 'starting'} {cfg.name} (run.json: {state.status}) in {out}", flush=True
    )
    try:
        train(cfg, args.data, out, resume=resume, progress=False)
    except DivergedError as e:
        print(f"error: {e}", flush=True)
        return EXIT_DIVERGED
    except RunLockedError as e:
        print(f"error: {e}", flush=True)
        return EXIT_LOCKED
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: a resume state is written, run.json says why
        print(f"error: {e}", flush=True)
        return TrainingInterrupted.exit_code
    except TrainerError as e:
        print(f"error: {e}", flush=True)
        return 1
    except KeyboardInterrupt:  # run.json already says interrupted; the next attempt resumes
        print("error: interrupted", flush=True)
        return 130
    print(f"completed {cfg.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
