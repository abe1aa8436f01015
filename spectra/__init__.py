"""Offline spectral analysis of attention queries and keys: cubes, metrics, and a ``.spectra`` accessor.

``import spectra`` never imports torch: reading cubes and computing metrics works in any notebook. The
extraction (which rebuilds models from checkpoints and needs torch) is the package ``spectra.extract``,
imported only when first accessed.

Examples
--------
>>> import spectra  # doctest: +SKIP
>>> ds = spectra.open_cubes(["runs/A1-s0", "runs/B1-s0"])  # doctest: +SKIP
>>> pr = spectra.participation_ratio(ds.k_sv.sel(site="normed", centering="uncentered"))  # doctest: +SKIP
>>> pr.mean(["layer", "kv_head"]).groupby("optimizer").mean()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType

from spectra.analysis import accessor  # noqa: F401  (registers DataArray.spectra and Dataset.spectra)
from spectra.analysis.metrics import (
    compute,
    condition_number,
    decay_exponent,
    effective_rank,
    energy_rank,
    participation_ratio,
    rankme,
    stable_rank,
)
from spectra.analysis.summary import summary_table
from spectra.cube import open_cube, open_cubes
from spectra.errors import SpectraError

__all__ = [
    "SpectraError",
    "compute",
    "condition_number",
    "decay_exponent",
    "effective_rank",
    "energy_rank",
    "extract",
    "open_cube",
    "open_cubes",
    "participation_ratio",
    "rankme",
    "stable_rank",
    "summary_table",
]

# Lazily imported submodules (PEP 562): they import torch. A plain function named ``extract`` cannot stand
# in for the subpackage of the same name: importing ``spectra.extract`` anywhere (the CLI does) rebinds the
# package attribute ``spectra.extract`` to the subpackage, so ``spectra.extract.extract(...)`` is the call.
_LAZY_SUBMODULES = ("extract",)


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"spectra.{name}")
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
