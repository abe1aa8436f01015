"""The cube, ``spectra.nc``: its whole contract in one module (docs/cube.md).

- **schema**: the format tag and version, the file name, every variable with its dimensions and attributes;
- **vocabulary**: the read-out sites, centrings, participation-ratio conventions and keys/queries that every
  measurement is chosen from (:data:`SITES`, :data:`CENTERINGS`, :data:`CONVENTIONS`, :data:`WHICH`),
  :func:`check_choice`, the one validator of a choice among them, and :class:`Measurement`, the four choices
  as one checked value;
- **writing**: one checkpoint's step from numpy arrays (:func:`step_dataset`), steps combined with the
  cube's history and provenance (:func:`combine_steps`), the file written atomically (:func:`write_cube`);
- **reading**: one cube checked against the schema (:func:`open_cube`), the cubes of runs, directories and
  studies (:func:`find_cubes`), many cubes along ``run`` (:func:`open_cubes`).

Extraction (``spectra.extract``, ``spectra.hf.extract``) computes the arrays; everything else reads cubes here.
Neither reading nor writing needs torch, so a notebook opens cubes on any machine.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from spectra.errors import SpectraError
from spectra.fileio import atomic_write
from spectra.lazy import dask_installed, open_lazily
from spectra.rundir import CHECKPOINTS_DIR, RUN_RECORD
from spectra.study import is_study_dir, read_study
from trainer.provenance import software_versions

__all__ = [
    "CENTERINGS",
    "COMPRESSION",
    "CONVENTIONS",
    "CONVENTION_NAMES",
    "CUBE_FILENAME",
    "CUBE_FORMAT",
    "CUBE_FORMAT_VERSION",
    "CUBE_SOFTWARE",
    "CUBE_VARIABLES",
    "DEFAULT_SITE",
    "DEFAULT_VARIANT",
    "DamagedCubeError",
    "Measurement",
    "RUN_COORDS",
    "SITES",
    "WHICH",
    "check_choice",
    "combine_steps",
    "cube_attributes",
    "find_cubes",
    "head_dim_name",
    "n_tokens_attr",
    "open_cube",
    "open_cubes",
    "read_netcdf",
    "step_dataset",
    "write_cube",
]

# --------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------

CUBE_FORMAT = "collapse-spectra-cube"
"""Value of the cube's global attribute ``format``."""
CUBE_FORMAT_VERSION = 1
"""Newest ``format_version`` this reader understands."""
CUBE_FILENAME = "spectra.nc"
"""A run directory's cube."""
CUBE_VARIABLES: dict[str, tuple[str, ...]] = {
    "q_sv": ("step", "layer", "head", "site", "centering", "sv"),
    "k_sv": ("step", "layer", "kv_head", "site", "centering", "sv"),
    "wq_sv": ("step", "layer", "head", "sv"),
    "wk_sv": ("step", "layer", "kv_head", "sv"),
    "q_gamma": ("step", "layer", "dim"),
    "k_gamma": ("step", "layer", "dim"),
    "q_energy": ("step", "layer", "head", "site", "dim"),
    "k_energy": ("step", "layer", "kv_head", "site", "dim"),
    "train_loss": ("step",),
    "val_loss": ("step",),
}
"""Every cube's data variables and their dimensions (docs/cube.md); a cube without one is damaged."""
RUN_COORDS = ("qk_norm", "optimizer", "muon_qkvo", "weights_dtype", "seed", "data")
"""Global attributes that [`open_cubes`][spectra.cube.open_cubes] turns into ``run`` coordinates."""
DEFAULT_VARIANT = {"muon_qkvo": "separate", "weights_dtype": "float32"}
"""The values of the run attributes a cube written before they existed lacks: every run then trained so."""

COMPRESSION = {"zlib": True, "complevel": 4, "shuffle": True}
"""NetCDF4 encoding of every data variable."""
CUBE_SOFTWARE = ("xarray", "netCDF4")
"""Distributions a cube's ``versions`` attribute names besides :func:`trainer.provenance.software_versions`' own."""

_VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "q_sv": {
        "long_name": "singular values of one query head's vectors over the eval-batch tokens (N x head_dim)",
        "units": "1",
    },
    "k_sv": {
        "long_name": "singular values of one key/value head's key vectors over the eval-batch tokens (N x head_dim)",
        "units": "1",
    },
    "wq_sv": {
        "long_name": "singular values of one query head's slice of W_q (head_dim x d_model)",
        "units": "1",
    },
    "wk_sv": {
        "long_name": "singular values of one key/value head's slice of W_k (head_dim x d_model)",
        "units": "1",
    },
    "q_gamma": {
        "long_name": "QK-norm gain of the queries, shared by the heads of a layer (1 if frozen, NaN if none)",
        "units": "1",
    },
    "k_gamma": {
        "long_name": "QK-norm gain of the keys, shared by the heads of a layer (1 if frozen, NaN if none)",
        "units": "1",
    },
    "q_energy": {"long_name": "mean over tokens of the squared query coordinate, uncentred", "units": "1"},
    "k_energy": {"long_name": "mean over tokens of the squared key coordinate, uncentred", "units": "1"},
    "train_loss": {
        "long_name": "training loss: mean next-token cross-entropy in nats over the last log window (NaN at step 0)",
        "units": "1",
    },
    "val_loss": {
        "long_name": "validation loss: mean next-token cross-entropy in nats on the run's fixed validation slice",
        "units": "1",
    },
}

_COORD_ATTRS: dict[str, dict[str, str]] = {
    "step": {"long_name": "optimizer steps taken at the checkpoint", "units": "1"},
    "tokens": {"long_name": "training tokens consumed at the checkpoint", "units": "1"},
    "layer": {"long_name": "transformer block index", "units": "1"},
    "head": {"long_name": "query head index", "units": "1"},
    "kv_head": {"long_name": "key/value head index", "units": "1"},
    "site": {"long_name": "read-out site in the attention: proj, unit (before gamma), normed, rope"},
    "centering": {"long_name": "whether the token mean of each head was subtracted before the SVD"},
    "sv": {"long_name": "singular value index, descending order", "units": "1"},
    "dim": {"long_name": "coordinate within a head", "units": "1"},
}

_RUN_COORD_ATTRS = {
    "run": {"long_name": "run (the cube's run_name, made unique among the cubes opened)"},
    "qk_norm": {"long_name": "QK-norm variant (none, learned, frozen, frozen_k)"},
    "optimizer": {"long_name": "optimizer of the 2-D hidden matrices (muon, adamw)"},
    "muon_qkvo": {
        "long_name": "optim.muon_qkvo: separate, fused or separate_stacked_lr (acts under muon only)"
    },
    "weights_dtype": {
        "long_name": "train.weights_dtype: float32, float64 or bfloat16 (pure bfloat16 training)"
    },
    "seed": {"long_name": "training seed", "units": "1"},
    "data": {"long_name": "training dataset"},
    "eval_batch_sha256": {"long_name": "sha256 of the fixed batch the spectra were computed on"},
    "n_tokens": {"long_name": "token vectors per head in every activation SVD (N)", "units": "1"},
    "path": {"long_name": "cube file the run was read from"},
}

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------------------
# Vocabulary: what a measurement is chosen from
# --------------------------------------------------------------------------------------------------------

SITES = ("proj", "unit", "normed", "rope")
"""Read-out sites in the order of the cube's ``site`` dimension (the attention's order, docs/sites.md): the raw
projections, the unit-RMS vectors before the QK-norm gain (QK-norm models only), after QK-norm with the gain
(equal to ``proj`` without QK-norm), after the rotary embedding."""
CENTERINGS = ("uncentered", "centered")
"""Order of the cube's ``centering`` dimension: whether each head's token mean was subtracted before the SVD."""
CONVENTIONS = ("sv", "eig")
"""Participation-ratio conventions: on singular values, ``(sum s)^2 / sum s^2`` (the source documents'), and on
eigenvalues, ``(sum s^2)^2 / sum s^4`` (the literature's)."""
CONVENTION_NAMES = {"sv": "singular-value convention", "eig": "eigenvalue convention"}
"""Each convention in words, as figures and the report name it."""
WHICH = ("k", "q")
"""Keys (``k_sv``, over ``kv_head``) or queries (``q_sv``, over ``head``)."""
DEFAULT_SITE = "normed"
"""Read-out site of the headline metric: keys after QK-norm (gamma included), before RoPE; the site the
source documents' probe used. Equal to ``proj`` for runs without QK-norm."""


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``: one line naming the choice and what is allowed.

    >>> check_choice("site", "rope", SITES)
    >>> check_choice("site", "post", SITES)
    Traceback (most recent call last):
    spectra.errors.SpectraError: site must be one of ['proj', 'unit', 'normed', 'rope'], got 'post'
    """
    if value not in allowed:
        raise SpectraError(f"{name} must be one of {list(allowed)}, got {value!r}")


def head_dim_name(which: str) -> str:
    """``"kv_head"`` for keys (``which="k"``), ``"head"`` for queries (``which="q"``)."""
    if which not in WHICH:
        raise SpectraError(f"which must be 'k' (keys) or 'q' (queries), got {which!r}")
    return "kv_head" if which == "k" else "head"


@dataclass(frozen=True)
class Measurement:
    """What a participation ratio is measured on: keys or queries, read-out site, centring, and its convention.

    The four choices every analysis of the spectra makes (docs/statistics.md), checked against the vocabulary
    above when the value is made, so that a bad choice is refused, in one line, before anything is read or
    computed. The analysis and figure functions keep the four as keyword arguments, as a notebook writes them
    (``stats.head_pr(ds, site="rope")``); they make one of these first and hand it on.

    Examples
    --------
    >>> Measurement()  # the headline measurement
    Measurement(which='k', site='normed', centering='uncentered', convention='sv')
    >>> Measurement(site="rope").metric, Measurement(which="q").head_dim
    ('pr_sv', 'head')
    >>> Measurement(convention="pr2")
    Traceback (most recent call last):
    spectra.errors.SpectraError: convention must be one of ['sv', 'eig'], got 'pr2'
    """

    which: str = "k"
    """``k`` (keys, one spectrum per key/value head) or ``q`` (queries, one per head); :data:`WHICH`."""
    site: str = DEFAULT_SITE
    """Read-out site, one of :data:`SITES`."""
    centering: str = "uncentered"
    """One of :data:`CENTERINGS`."""
    convention: str = "sv"
    """Participation-ratio convention, one of :data:`CONVENTIONS`."""

    def __post_init__(self) -> None:
        check_choice("site", self.site, SITES)
        check_choice("convention", self.convention, CONVENTIONS)
        check_choice("centering", self.centering, CENTERINGS)
        head_dim_name(self.which)

    @property
    def head_dim(self) -> str:
        """The heads' dimension: ``kv_head`` for keys, ``head`` for queries."""
        return head_dim_name(self.which)

    @property
    def metric(self) -> str:
        """The participation ratio's name, ``pr_sv`` or ``pr_eig`` (as ``compute`` and the tables name it)."""
        return f"pr_{self.convention}"

    def spectra(self, ds: xr.Dataset) -> xr.DataArray:
        """The singular values measured: ``q_sv`` or ``k_sv`` of ``ds`` at this site and centring."""
        return ds[f"{self.which}_sv"].sel(site=self.site, centering=self.centering)

    def keywords(self) -> dict[str, str]:
        """The four choices as the keyword arguments of the analysis and figure functions."""
        return {
            "which": self.which,
            "site": self.site,
            "centering": self.centering,
            "convention": self.convention,
        }


# --------------------------------------------------------------------------------------------------------
# Writing: one step, steps combined, the file
# --------------------------------------------------------------------------------------------------------


def cube_attributes(title: str, source: str) -> dict[str, str]:
    """The global attributes that make a file a cube of this format, with its ``title`` and ``source``."""
    return {
        "Conventions": "CF-1.10",
        "title": title,
        "source": source,
        "format": CUBE_FORMAT,
        "format_version": str(CUBE_FORMAT_VERSION),  # a string attribute, as cubes have always carried it
    }


def step_dataset(
    per_layer: dict[int, dict[str, np.ndarray]],
    *,
    wq_sv: np.ndarray,
    wk_sv: np.ndarray,
    q_gamma: np.ndarray,
    k_gamma: np.ndarray,
    step: int,
    tokens: float,
    train_loss: float,
    val_loss: float,
    attrs: dict[str, Any],
) -> xr.Dataset:
    """One step of a cube from its per-layer reductions and weight-side arrays.

    ``per_layer[i]`` holds layer ``i``'s ``q_sv`` ``(H, site, centering, D)``, ``k_sv`` ``(Hkv, site, centering,
    D)``, ``q_energy`` ``(H, site, D)`` and ``k_energy`` ``(Hkv, site, D)`` (what
    :func:`spectra.extract.run.layer_reducer` returns). ``wq_sv`` is ``(L, H, D)``, ``wk_sv`` ``(L, Hkv, D)``, ``q_gamma`` and ``k_gamma`` ``(L, D)``;
    ``tokens`` is an integer, or NaN where unknown (the coordinate is then float64). Every variable and
    coordinate gets its ``long_name`` and ``units`` (docs/cube.md); ``attrs`` become the global attributes.
    """
    L = len(per_layer)
    acts = {name: np.stack([per_layer[i][name] for i in range(L)]) for name in per_layer[0]}  # (L, ...)
    H, Hkv, D = wq_sv.shape[1], wk_sv.shape[1], wq_sv.shape[2]
    tokens_dtype = np.int64 if np.isfinite(tokens) else np.float64
    one = np.newaxis  # the step dimension, length 1
    values = {
        "q_sv": acts["q_sv"][one],
        "k_sv": acts["k_sv"][one],
        "wq_sv": wq_sv[one],
        "wk_sv": wk_sv[one],
        "q_gamma": q_gamma[one],
        "k_gamma": k_gamma[one],
        "q_energy": acts["q_energy"][one],
        "k_energy": acts["k_energy"][one],
        "train_loss": np.array([train_loss], dtype=np.float64),
        "val_loss": np.array([val_loss], dtype=np.float64),
    }
    data_vars = {name: (dims, values[name]) for name, dims in CUBE_VARIABLES.items()}
    coords = {
        "step": ("step", np.array([step], dtype=np.int64)),
        "tokens": ("step", np.array([tokens], dtype=tokens_dtype)),
        "layer": ("layer", np.arange(L, dtype=np.int64)),
        "head": ("head", np.arange(H, dtype=np.int64)),
        "kv_head": ("kv_head", np.arange(Hkv, dtype=np.int64)),
        "site": ("site", np.array(SITES)),
        "centering": ("centering", np.array(CENTERINGS)),
        "sv": ("sv", np.arange(D, dtype=np.int64)),
        "dim": ("dim", np.arange(D, dtype=np.int64)),
    }
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    for name, var_attrs in {**_VARIABLE_ATTRS, **_COORD_ATTRS}.items():
        ds[name].attrs.update(var_attrs)
    return ds


def write_cube(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a cube atomically: NetCDF4, zlib level 4 on every data variable, no fill value on coordinates."""
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding = {}  # a cube read back carries its old chunking; a fresh layout keeps files comparable
    encoding: dict[str, dict[str, Any]] = {name: dict(COMPRESSION) for name in ds.data_vars}
    for name in ds.coords:
        if ds[name].dtype.kind in "iuf":
            encoding[name] = {"_FillValue": None}
    return atomic_write(
        path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    )


def combine_steps(existing: xr.Dataset | None, new: list[xr.Dataset], history_line: str) -> xr.Dataset:
    """The cube holding ``existing``'s steps and the ``new`` one-step Datasets, sorted by step, with
    ``history_line`` appended to its history and the current ``versions``."""
    parts = ([existing] if existing is not None else []) + new
    ds = xr.concat(parts, dim="step", data_vars="all", coords="minimal", compat="equals", join="exact")
    ds = ds.sortby("step")
    # run-level attributes follow the latest checkpoint (a resumed run may extend its run_config)
    latest = max(new, key=lambda d: int(d.step[0]))
    if existing is not None and int(existing.step.max()) > int(latest.step[0]):
        attrs = dict(existing.attrs)
    else:
        attrs = dict(latest.attrs)
    old_history = existing.attrs.get("history", "") if existing is not None else ""
    attrs["history"] = f"{old_history}\n{history_line}" if old_history else history_line
    attrs["versions"] = json.dumps(software_versions(*CUBE_SOFTWARE), sort_keys=True)
    ds.attrs = attrs
    return ds


# --------------------------------------------------------------------------------------------------------
# Reading: one cube, the cubes of runs and studies, many cubes along ``run``
# --------------------------------------------------------------------------------------------------------


class DamagedCubeError(SpectraError):
    """A cube file that lacks one of the cube's variables or has it over other dimensions; names the file."""


def read_netcdf(file: Path, *, lazy: bool = False) -> xr.Dataset:
    """Load a NetCDF file fully into memory (file closed on return); unreadable bytes are a SpectraError.

    netCDF4 raises ``OSError`` for a file that is not NetCDF at all, xarray ``ValueError`` for one it
    cannot decode, and ``RuntimeError: NetCDF: HDF error`` when the bytes of a variable are damaged
    (a disk error, a partial copy): each becomes one line naming the file.

    With ``lazy``, only the metadata, the coordinates and the variables over one dimension are read now: the
    others become dask arrays read from the file when computed (:func:`spectra.lazy.open_lazily`).
    """
    if lazy:
        return open_lazily(file)
    try:
        return xr.load_dataset(file, engine="netcdf4")
    except (OSError, ValueError, RuntimeError) as e:
        raise SpectraError(f"{file}: not a readable NetCDF file, damaged or truncated? ({e})") from None


def _cube_file(path: PathLike) -> Path:
    """The cube file of ``path``: the file itself, or ``<dir>/spectra.nc`` for a run directory."""
    p = Path(path)
    if p.is_dir():
        if not (p / CUBE_FILENAME).is_file():
            raise SpectraError(
                f"{p}: no {CUBE_FILENAME} in this directory (run `collapse-spectra extract {p}`)"
            )
        return p / CUBE_FILENAME
    if not p.exists():
        raise SpectraError(f"{p}: no such cube file or run directory")
    return p


def open_cube(path: PathLike, *, lazy: bool = False) -> xr.Dataset:
    """Open one spectra cube and load it into memory.

    Parameters
    ----------
    path : str or path-like
        A ``spectra.nc`` file, or a run directory holding one.
    lazy : bool
        Read only the metadata now and the spectra when a computation needs them, as dask arrays (needs the
        ``dask`` extra); each block is read from the file when computed.

    Returns
    -------
    xarray.Dataset
        The cube as written (schema in docs/cube.md); ``tokens`` is a coordinate on ``step``. The file is
        closed on return, so it can be rewritten by a running extraction (a lazily opened cube is read when
        computed: do not compute it across such a rewrite).

    Raises
    ------
    SpectraError
        If the file does not exist, is not a readable NetCDF file, is not a cube of a format version this
        reader understands, or lacks one of the cube's variables (:data:`CUBE_VARIABLES`); the message
        names the file.

    Examples
    --------
    >>> ds = open_cube("runs/A1-s0")  # doctest: +SKIP
    >>> ds.k_sv.sel(site="normed", centering="uncentered").dims  # doctest: +SKIP
    ('step', 'layer', 'kv_head', 'sv')
    """
    file = _cube_file(path)
    ds = read_netcdf(file, lazy=lazy)
    fmt = ds.attrs.get("format")
    if fmt != CUBE_FORMAT:
        raise SpectraError(
            f"{file}: not a spectra cube (global attribute format = {fmt!r}, expected {CUBE_FORMAT!r})"
        )
    version = ds.attrs.get("format_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise SpectraError(f"{file}: cube format_version {version!r} is not an integer") from None
    if not 1 <= version <= CUBE_FORMAT_VERSION:
        raise SpectraError(
            f"{file}: cube format_version {version} is not readable by this version of spectra "
            f"(it reads 1 to {CUBE_FORMAT_VERSION})"
        )
    if "step" not in ds.dims or "tokens" not in ds.coords:
        raise SpectraError(f"{file}: a cube needs a 'step' dimension and a 'tokens' coordinate")
    _check_variables(ds, file)
    return ds


def _check_variables(ds: xr.Dataset, file: Path) -> None:
    """Refuse a cube that lacks one of :data:`CUBE_VARIABLES` or has it over other dimensions.

    Such a file was edited or damaged: read as it is, its runs would be rows of NaN in every summary and
    ``extract`` would take it for complete.
    """
    rebuild = "move it aside and run `collapse-spectra extract` on its run to rebuild it"
    missing = [name for name in CUBE_VARIABLES if name not in ds.data_vars]
    if missing:
        raise DamagedCubeError(
            f"{file}: damaged cube: the variable{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} missing (a cube holds {', '.join(CUBE_VARIABLES)}); {rebuild}"
        )
    for name, dims in CUBE_VARIABLES.items():
        if ds[name].dims != dims:
            raise DamagedCubeError(
                f"{file}: damaged cube: the variable {name} has the dimensions ({', '.join(ds[name].dims)}), "
                f"not ({', '.join(dims)}); {rebuild}"
            )


def _is_run_dir(p: Path) -> bool:
    """A directory the trainer made (or one holding a cube): what a directory of runs holds."""
    return p.is_dir() and any((p / name).exists() for name in (CUBE_FILENAME, CHECKPOINTS_DIR, RUN_RECORD))


def _no_cube_reason(run: Path) -> str:
    return f"no {CUBE_FILENAME} (run `collapse-spectra extract {run}`)"


def find_cubes(paths: PathLike | Iterable[PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The cube files of the given paths, and the runs skipped because they have none.

    Parameters
    ----------
    paths
        Cube files, run directories, directories of run directories (each child run directory, sorted by
        name; children that are not runs are ignored), or study directories (their main runs, in the
        study's order, see docs/studies.md).

    Returns
    -------
    files, skipped
        The cube files in order, and ``(run directory, reason)`` for every run without a cube, whether it
        was named itself or found in a directory of runs: both are treated the same way.

    Raises
    ------
    SpectraError
        For a path that does not exist, a directory that is neither a run nor holds runs, or when no cube
        is left at all (the message lists what was skipped and why).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise SpectraError(f"{p}: no such cube file or run directory")
        if not p.is_dir():
            files.append(p)
        elif is_study_dir(p):  # a study directory: its main runs (docs/studies.md)
            for run in read_study(p).run_dirs("main"):
                if (run / CUBE_FILENAME).is_file():
                    files.append(run / CUBE_FILENAME)
                else:
                    skipped.append((run, _no_cube_reason(run) if run.is_dir() else "not trained yet"))
        elif (p / CUBE_FILENAME).is_file():
            files.append(p / CUBE_FILENAME)
        elif _is_run_dir(p):
            skipped.append((p, _no_cube_reason(p)))
        else:
            runs = sorted(child for child in p.iterdir() if _is_run_dir(child))
            if not runs:
                raise SpectraError(
                    f"{p}: neither a run directory nor a directory of run directories (no {CUBE_FILENAME}, "
                    "checkpoints/ or run.json in it or its sub-directories)"
                )
            for run in runs:
                if (run / CUBE_FILENAME).is_file():
                    files.append(run / CUBE_FILENAME)
                else:
                    skipped.append((run, _no_cube_reason(run)))
    if not files:
        reasons = "; ".join(f"{run}: {why}" for run, why in skipped)
        raise SpectraError(f"no cubes to read ({reasons})" if reasons else "no cubes given")
    return files, skipped


def _warn_skipped(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _unique_labels(names: list[str], seeds: list[int], files: list[Path]) -> list[str]:
    """Run labels: the cubes' run names, disambiguated by seed, then by parent directory, then by position."""
    schemes = (
        lambda i: names[i],
        lambda i: f"{names[i]}-seed{seeds[i]}",
        lambda i: f"{files[i].parent.name}/{names[i]}-seed{seeds[i]}",
    )
    for scheme in schemes:
        labels = [scheme(i) for i in range(len(names))]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{names[i]}#{i}" for i in range(len(names))]


def _run_attr(ds: xr.Dataset, file: Path, name: str) -> str | int:
    if name not in ds.attrs and name in DEFAULT_VARIANT:
        return DEFAULT_VARIANT[name]
    if name not in ds.attrs:
        raise SpectraError(
            f"{file}: global attribute {name!r} is missing; a cube records {', '.join(RUN_COORDS)}"
        )
    value = ds.attrs[name]
    if name == "seed":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SpectraError(f"{file}: global attribute seed = {value!r} is not an integer") from None
    return str(value)


def n_tokens_attr(ds: xr.Dataset, file: Path | str = "the cube") -> int:
    """The cube's ``n_tokens`` global attribute (N, the token vectors behind every activation spectrum)."""
    value = ds.attrs.get("n_tokens")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpectraError(f"{file}: global attribute n_tokens = {value!r} is not an integer") from None


def _along_run(ds: xr.Dataset, label: str, file: Path) -> xr.Dataset:
    """Give every variable of one cube a leading ``run`` dimension and its metadata as ``run`` coordinates."""
    tokens_attrs = dict(ds["tokens"].attrs)
    meta = {name: _run_attr(ds, file, name) for name in RUN_COORDS}
    meta["eval_batch_sha256"] = str(ds.attrs.get("eval_batch_sha256", ""))
    meta["n_tokens"] = n_tokens_attr(ds, file)
    meta["path"] = str(file)
    # tokens differ between runs at the same step (different batch sizes), so it becomes a (run, step)
    # variable; float64 so that an outer join can mark missing steps with NaN (exact below 2**53 tokens)
    ds = ds.reset_coords("tokens")
    ds["tokens"] = ds["tokens"].astype(np.float64)
    ds = ds.expand_dims(run=[label])
    ds = ds.set_coords("tokens")
    ds["tokens"].attrs = tokens_attrs
    ds = ds.assign_coords({name: ("run", [value]) for name, value in meta.items()})
    for name, attrs in _RUN_COORD_ATTRS.items():
        ds[name].attrs = attrs
    return ds


def open_cubes(
    paths: PathLike | Iterable[PathLike],
    *,
    on_skip: Callable[[str], object] | None = _warn_skipped,
    lazy: bool | None = None,
) -> xr.Dataset:
    """Open several cubes as one Dataset along a new ``run`` dimension.

    Parameters
    ----------
    paths : path-like or iterable of path-like
        Cube files, run directories (their ``spectra.nc``), or directories of run directories (every
        ``*/spectra.nc`` in them, sorted by name), see :func:`find_cubes`.
    on_skip : callable, optional
        Called with one line per run that has no cube yet (``skipped runs/b: no spectra.nc ...``); by
        default a warning, so that a notebook never loses a run silently.
    lazy : bool, optional
        Keep the spectra on disk until a computation needs them, as dask arrays read block by block, so that
        hundreds of cubes open in bounded memory (:func:`open_cube` with ``lazy``). Default: when ``dask`` is
        installed (the ``dask`` extra). Metrics, tables and the report compute on either the same way; a
        lazily opened cube is read when computed, so do not compute across an extraction that rewrites it.

    Returns
    -------
    xarray.Dataset
        Every variable gains a leading ``run`` dimension, in the order given. Coordinates along ``run``:
        ``run`` (the cube's ``run_name``; if two cubes share one, the seed is appended, then the parent
        directory), ``qk_norm``, ``optimizer``, ``seed``, ``data`` (from each cube's global attributes, so
        that ``ds.groupby("optimizer")`` works), ``eval_batch_sha256``, ``n_tokens`` (N, the token vectors per
        head behind every activation spectrum) and ``path``. Cubes are aligned by an
        outer join: where a run has no checkpoint at a step, its variables are NaN. ``tokens`` becomes a
        float64 coordinate over ``(run, step)``, NaN where the run lacks the step, because runs with different
        batch sizes reach a step at different token counts. Global attributes shared by all cubes are kept;
        the others are dropped (read them per run with [`open_cube`][spectra.cube.open_cube]).

    Raises
    ------
    SpectraError
        For any unreadable cube (naming it), a cube given twice, a cube without the run attributes, or cubes
        of different head dimensions (their spectra cannot share an ``sv`` axis).

    Examples
    --------
    >>> ds = open_cubes(["runs/A1-s0", "runs/B1-s0"])  # doctest: +SKIP
    >>> keys = ds.k_sv.sel(site="normed", centering="uncentered")  # doctest: +SKIP
    >>> pr = keys.spectra.participation_ratio()  # doctest: +SKIP
    >>> pr.mean(["layer", "kv_head"]).groupby("optimizer").mean()  # doctest: +SKIP
    """
    files, skipped = find_cubes(paths)
    for run, why in skipped:
        if on_skip is not None:
            on_skip(f"skipped {run}: {why}")
    repeated = [str(f) for f, n in Counter(f.resolve() for f in files).items() if n > 1]
    if repeated:
        raise SpectraError(f"the same cube is given more than once: {', '.join(repeated)}")
    if lazy is None:
        lazy = dask_installed()
    cubes = [open_cube(f, lazy=lazy) for f in files]
    for dim in ("sv", "dim"):
        sizes = {str(f): ds.sizes[dim] for f, ds in zip(files, cubes) if dim in ds.dims}
        if len(set(sizes.values())) > 1:
            raise SpectraError(
                f"cubes of different head dimensions cannot share the {dim!r} axis: "
                + ", ".join(f"{f}: {n}" for f, n in sizes.items())
            )
    names = [str(ds.attrs.get("run_name", f.parent.name)) for f, ds in zip(files, cubes)]
    seeds = [_run_attr(ds, f, "seed") for f, ds in zip(files, cubes)]
    labels = _unique_labels(names, seeds, files)
    parts = [_along_run(ds, label, f) for ds, label, f in zip(cubes, labels, files)]
    combined = xr.concat(
        parts,
        dim="run",
        data_vars="all",
        coords="minimal",
        join="outer",
        fill_value=np.nan,
        combine_attrs="drop_conflicts",
    )
    for variable in combined.variables.values():
        # the first file's on-disk encoding (int64 tokens, chunk sizes) no longer fits the combined arrays
        variable.encoding = {}
    return combined
