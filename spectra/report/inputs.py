"""What a report (or a figure) is made of: the runs' cubes, surgery results and eval results, found from the
paths given on the command line (each file is read by the module of its format)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spectra.cube import CUBE_FILENAME, find_cubes, open_cube
from spectra.errors import SpectraError
from spectra.evals.results import EVALS_FILENAME
from spectra.surgery.file import SURGERY_FILENAME, read_surgery

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RunInput:
    """One run of the report: its cube and, when there is one, its surgery results."""

    cube: Path
    surgery: Path | None = None
    evals: Path | None = None
    """The run's ``evals.json`` (``collapse-spectra eval``), when there is one."""


def resolve_inputs(inputs: Iterable[PathLike]) -> tuple[list[RunInput], list[tuple[Path, str]]]:
    """Turn the command line's RUN_OR_CUBE arguments into cubes and surgery files.

    - a run directory (holding ``spectra.nc``): its cube, and its ``surgery.nc`` if present;
    - a directory of run directories: each of them, sorted by name;
    - a ``.nc`` cube file: itself, and a ``surgery.nc`` beside it if that file's ``run_name`` is the cube's
      (a directory of cubes may hold other runs' results).

    Returns the runs and the runs skipped because they have no cube yet, with the reason
    (:func:`spectra.cube.find_cubes`: the same rule as ``collapse-spectra metrics``). Raises
    :class:`SpectraError` for a path that is none of these, naming it, or when no cube is left.
    """
    cubes, skipped = find_cubes(list(inputs))
    runs = []
    for cube in cubes:
        if cube.name == SURGERY_FILENAME:
            raise SpectraError(
                f"{cube}: a surgery file, not a cube; give the run directory or its {CUBE_FILENAME}"
            )
        runs.append(_run_input(cube))
    seen: set[Path] = set()
    for r in runs:
        key = r.cube.resolve()
        if key in seen:
            raise SpectraError(f"the same cube is given more than once: {r.cube}")
        seen.add(key)
    return runs, skipped


def _run_input(cube: Path) -> RunInput:
    sibling = cube.parent / SURGERY_FILENAME
    evals = cube.parent / EVALS_FILENAME
    evals_path = evals if cube.name == CUBE_FILENAME and evals.is_file() else None
    if not sibling.is_file():
        return RunInput(cube, None, evals_path)
    if cube.name == CUBE_FILENAME:  # a run directory's own cube: its surgery.nc and evals.json are the run's
        return RunInput(cube, sibling, evals_path)
    run_name = open_cube(cube).attrs.get("run_name")
    return RunInput(cube, sibling if read_surgery(sibling).attrs.get("run_name") == run_name else None)
