"""Cubes from our checkpoints (torch): load a checkpoint, record queries and keys, float64 SVDs, write the cube.

- :mod:`spectra.extract.load`: checkpoints (self-describing safetensors) and the fixed eval batch;
- :mod:`spectra.extract.capture`: one forward pass that records every read-out site;
- :mod:`spectra.extract.svd`: the float64 singular values of every head;
- :mod:`spectra.extract.run`: one run's cube, incremental and atomic;
- :mod:`spectra.extract.runs`: every run of a study or a directory of runs, in parallel;
- :mod:`spectra.extract.workers`: worker processes that die with the command that started them.
"""
