"""The trainer: trains small Llama-style models and writes self-describing checkpoints, nothing else.

One run, built from its parts (``spectra`` may import only the first four):

- :mod:`trainer.model`, :mod:`trainer.config`: the model in one file and its typed config.
- :mod:`trainer.errors`, :mod:`trainer.provenance`: the errors other layers read; the one record of
  versions, git revision, device and time that every writer of results uses.
- :mod:`trainer.optim`, :mod:`trainer.muon`: AdamW and Muon (``torch.optim.Muon`` or the batched one).
- :mod:`trainer.distributed`: DDP under torchrun. :mod:`trainer.fileio`: atomic writes, locks, full disks.
- :mod:`trainer.schedule`: tokens per step, total steps, checkpoint milestones (pure arithmetic).
- :mod:`trainer.train`: :func:`~trainer.train.train` builds a run, then steps it; the loop calls
  :mod:`trainer.step` (one optimizer step and its kernels), :mod:`trainer.components` (loss window,
  validator, stop signals), :mod:`trainer.checkpoint` (the checkpoint format and its writer),
  :mod:`trainer.resume` (the resume state), and :mod:`trainer.rundir` (every name in a run directory, and
  the one reader and writer of ``config.toml``, ``run.json``, ``metrics.jsonl``); :mod:`trainer.start`
  decides how a run begins in its directory.

Two packages around it: :mod:`trainer.data` (the dataset contract and how a dataset is prepared) below the
run, and :mod:`trainer.study` (many runs from one study file) above it.
"""
