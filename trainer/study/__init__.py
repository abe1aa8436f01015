"""Studies: many ordinary runs planned from one study file, run into one study directory.

- :mod:`trainer.study.spec`: the study file (typed, validated, resolved), the run plan and the learning-rate
  choice; pure, nothing runs.
- :mod:`trainer.study.directory`: the study directory's contract (``study.toml``, ``study.json``,
  ``sweep.json``, ``sweep.csv``, its lock).
- :mod:`trainer.study.runner`: ``collapse-train study``: the two phases, retries, ``--dry-run``, ``--status``.
- :mod:`trainer.study.executors`: where runs execute (local processes, SLURM through submitit);
  :mod:`trainer.study.slurm_queue` is what SLURM says about partitions and jobs.
- :mod:`trainer.study.worker`: ``python -m trainer.study.worker``, one run in one process.
- ``files/``: the shipped study files, loadable by name (``collapse-train study demo``).

The study layer trains only through :func:`trainer.train.train` (in the worker) and reads run directories
through :mod:`trainer.rundir` like any other reader (an import-linter contract keeps the run layer from
importing it).
"""
