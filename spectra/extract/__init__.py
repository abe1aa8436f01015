"""Cubes from our checkpoints (torch): load a checkpoint, record queries and keys, float64 SVDs, write the cube.

- :mod:`spectra.extract.load`: checkpoints (self-describing safetensors) and the fixed eval batch;
- :mod:`spectra.extract.capture`: one forward pass that records every read-out site;
- :mod:`spectra.extract.svd`: the float64 singular values of every head;
- :mod:`spectra.extract.run`: one run's cube, incremental and atomic;
- :mod:`spectra.extract.runs`: every run of a study or a directory of runs, in parallel;
- :mod:`spectra.extract.workers`: worker processes that die with the command that started them.

The package's entry points are importable from it, so that ``spectra.extract.extract(...)`` works after
``import spectra`` (which imports this package lazily, on first use). Everything here needs torch.
"""

from spectra.extract.run import ExtractResult, UnreadableCheckpointsError, extract, spectra_for_checkpoint
from spectra.extract.runs import ExtractRunsResult, extract_runs

__all__ = [
    "ExtractResult",
    "ExtractRunsResult",
    "UnreadableCheckpointsError",
    "extract",
    "extract_runs",
    "spectra_for_checkpoint",
]
