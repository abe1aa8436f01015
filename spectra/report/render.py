"""``collapse-spectra plot``: one figure on its own, from cubes or surgery files."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from spectra.cube import Measurement, open_cubes
from spectra.errors import SpectraError
from spectra.figures.kinds import FIGURE_KINDS, PLOTTERS
from spectra.figures.surgery import surgery_curves
from spectra.figures.toolkit import check_figure_output, save_figure
from spectra.surgery.file import read_surgery

PathLike = str | os.PathLike[str]

_MEASUREMENT = tuple(field.name for field in dataclasses.fields(Measurement))  # which, site, centering, ...
_LABELS = ("simple_data", "complex_data")
KIND_OPTIONS = {
    "trajectory": (*_MEASUREMENT, *_LABELS),
    "heatmap": (*_MEASUREMENT, "run", *_LABELS),
    "waterfall": ("site", "centering", "which", "layer", *_LABELS),
    "data-complexity": (*_MEASUREMENT, *_LABELS),
    "surgery": (),
    "gamma": ("site", "which", "run", *_LABELS),
    "loss": _LABELS,
    "pr-vs-loss": (*_MEASUREMENT, *_LABELS),
}
"""Options each figure kind accepts; ``site`` of ``gamma`` is where the coordinate energy is read."""


def render_plot(kind: str, inputs: Sequence[PathLike], output: PathLike, **options) -> list[Path]:
    """Draw one figure of kind ``kind`` from ``inputs`` and write it as PNG and SVG; returns both paths.

    Parameters
    ----------
    kind
        One of :data:`spectra.figures.trajectories.FIGURE_KINDS`.
    inputs
        Cube files or run directories; for ``surgery``, surgery files or run directories.
    output
        ``FILE.png``, ``FILE.svg`` or ``FILE``: both ``FILE.png`` and ``FILE.svg`` are written.
    **options
        Options of the figure function (``site``, ``convention``, ``centering``, ``which``, ``layer``,
        ``run``, ``simple_data``, ``complex_data``); ``None`` means the default. An option the kind does
        not use is an error, so that nothing given is silently ignored.

    Examples
    --------
    >>> render_plot("trajectory", ["runs/A1-s0", "runs/A2-s0"], "trajectory.png", site="rope")  # doctest: +SKIP
    [PosixPath('trajectory.png'), PosixPath('trajectory.svg')]
    """
    if kind not in PLOTTERS:
        raise SpectraError(f"unknown figure kind {kind!r}; kinds: {', '.join(FIGURE_KINDS)}")
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    unused = sorted(set(given) - set(KIND_OPTIONS[kind]))
    if unused:
        names = ", ".join("--" + u.replace("_", "-") for u in unused)
        raise SpectraError(f"{names} does not apply to the {kind} figure")
    if not inputs:
        raise SpectraError("no inputs given")
    check_figure_output(output)
    if kind == "surgery":
        fig = surgery_curves([read_surgery(p) for p in inputs])
    else:
        ds = open_cubes(list(inputs))
        fig = PLOTTERS[kind](ds, **given)
    return save_figure(fig, output)
