"""The numbers a watch shows per checkpoint: mean participation ratios, their fraction of the Gaussian null, losses.

Every number is the one ``collapse-spectra metrics`` prints for the cube (they come from the same
[`summary_table`][spectra.analysis.summary.summary_table]) or the report's headline divides by (the null of
[`null_metric`][spectra.analysis.null.null_metric], at the cube's N and head dimension), so that a curve in
TensorBoard and a row of a table never disagree. No I/O and no torch.

Tags, with the training tokens of the checkpoint as the step (``keys`` or ``queries``, ``pr_sv`` or ``pr_eig``,
each read-out site of the cube where the model has it; uncentred spectra, as the headline):

| tag | value |
| --- | --- |
| ``keys_pr_sv/normed`` | mean over every head of every layer (the ``all`` row of ``metrics``) |
| ``keys_pr_sv_by_layer/normed/layer_03`` | mean over the heads of one layer |
| ``keys_pr_sv_fraction_of_null/normed`` | the first divided by the mean PR of Gaussian N x head_dim matrices |
| ``loss/val``, ``loss/train`` | the cube's validation and training loss (the checkpoint's own; train absent at step 0) |
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import xarray as xr

from spectra.analysis.null import null_metric
from spectra.analysis.summary import summary_table
from spectra.cube import CONVENTIONS, SITES, WHICH, Measurement, n_tokens_attr

__all__ = ["HEADLINE", "HEADLINE_TAG", "Scalar", "checkpoint_scalars", "headline_pr", "tag"]

HEADLINE = Measurement()
"""The measurement of the progress line and of the report's headline: keys after QK-norm, uncentred, PR on
singular values."""
_VECTORS = {"k": "keys", "q": "queries"}


@dataclass(frozen=True)
class Scalar:
    """One point of one curve."""

    tokens: int
    """Training tokens of the checkpoint: the step of the point."""
    tag: str
    value: float


def tag(measurement: Measurement, kind: str = "", layer: int | None = None, n_layers: int = 0) -> str:
    """The tag of a mean PR: over all layers, of one ``layer`` (zero-padded to sort in order among
    ``n_layers``), or of ``kind`` ``fraction_of_null``.

    >>> tag(Measurement()), tag(Measurement(which="q", convention="eig"), layer=3, n_layers=22)
    ('keys_pr_sv/normed', 'queries_pr_eig_by_layer/normed/layer_03')
    >>> tag(Measurement(site="rope"), "fraction_of_null")
    'keys_pr_sv_fraction_of_null/rope'
    """
    name = f"{_VECTORS[measurement.which]}_{measurement.metric}"
    if layer is not None:
        return f"{name}_by_layer/{measurement.site}/layer_{layer:0{len(str(max(n_layers - 1, 0)))}d}"
    return f"{name}_{kind}/{measurement.site}" if kind else f"{name}/{measurement.site}"


HEADLINE_TAG = tag(HEADLINE)
"""The tag of the progress line's mean key PR."""


def checkpoint_scalars(cube: xr.Dataset, steps: Iterable[int] | None = None) -> list[Scalar]:
    """Every scalar of the ``steps`` of one run's cube (all of them by default), in step order, then tag order.

    Parameters
    ----------
    cube
        One run's cube ([`open_cube`][spectra.cube.open_cube]).
    steps
        The steps (optimizer steps, the cube's ``step`` coordinate) to compute, e.g. those just added.

    Examples
    --------
    >>> from spectra.cube import open_cube
    >>> points = checkpoint_scalars(open_cube("runs/A1-s0"))  # doctest: +SKIP
    >>> [(p.tokens, p.value) for p in points if p.tag == HEADLINE_TAG]  # doctest: +SKIP
    """
    sub = cube if steps is None else cube.sel(step=sorted(int(s) for s in steps))
    n_tokens, head_dim, n_layers = n_tokens_attr(cube), int(cube.sizes["sv"]), int(cube.sizes["layer"])
    points: list[Scalar] = []
    for which in WHICH:
        for convention in CONVENTIONS:
            null = null_metric(n_tokens, head_dim, f"pr_{convention}", centering=HEADLINE.centering).mean
            for site in SITES:
                m = Measurement(which=which, site=site, centering=HEADLINE.centering, convention=convention)
                points += _pr_points(sub, m, null, n_layers)
    for name in ("val", "train"):
        for tokens, value in zip(sub["tokens"].values, sub[f"{name}_loss"].values):
            if math.isfinite(float(value)):
                points.append(Scalar(int(tokens), f"loss/{name}", float(value)))
    return sorted(points, key=lambda p: (p.tokens, p.tag))


def headline_pr(cube: xr.Dataset, steps: Iterable[int]) -> dict[int, float]:
    """Training tokens -> the mean key PR of the progress line (:data:`HEADLINE`) at the ``steps`` of ``cube``,
    where it is defined: the value of :data:`HEADLINE_TAG`, without the other scalars."""
    sub = cube.sel(step=sorted(int(s) for s in steps))
    points = _pr_points(sub, HEADLINE, None, int(cube.sizes["layer"]))
    return {p.tokens: p.value for p in points if p.tag == HEADLINE_TAG}


def _pr_points(ds: xr.Dataset, m: Measurement, null: float | None, n_layers: int) -> list[Scalar]:
    """The mean PRs of one measurement (per layer and over all) and, with a ``null``, its fraction of it, where
    defined."""
    table = summary_table(ds, metric=m.metric, var=f"{m.which}_sv", site=m.site, centering=m.centering)
    table = table[table["heads"] > 0]  # a site the model lacks (unit without QK-norm) has no defined value
    out = []
    for tokens, layer, mean in zip(table["tokens"], table["layer"], table["mean"]):
        tokens, mean = int(tokens), float(mean)
        if layer == "all":
            out.append(Scalar(tokens, tag(m), mean))
            if null is not None:
                out.append(Scalar(tokens, tag(m, "fraction_of_null"), mean / null))
        else:
            out.append(Scalar(tokens, tag(m, layer=int(layer), n_layers=n_layers), mean))
    return out
