"""When does collapse happen: breakpoints in a trajectory, by continuous piecewise-linear fits in log tokens.

The plan (seed 002, comparison 4) asks whether the participation ratio falls in a sudden drop (a phase
transition) or decays gradually, and whether that coincides with a plateau of the loss. A run's trajectory has
10 to 50 checkpoints, so the model is kept small and the search exhaustive:

- **the model**: ``y = a + b x + sum_j c_j (x - t_j)_+`` with ``x = log10(tokens)``: a continuous line in log
  tokens that changes slope at ``k = 0, 1 or 2`` breakpoints ``t_j``. Slopes are in units of ``y`` per decade of
  tokens. Step 0 (no tokens) has no place on a log axis and is left out;
- **the search**: every breakpoint on a grid of :data:`GRID_PER_INTERVAL` positions per interval between
  consecutive checkpoints (the checkpoints themselves included), every pair for ``k = 2``, each segment holding at
  least :data:`MIN_POINTS_PER_SEGMENT` checkpoints (one at a breakpoint counts on both sides); ordinary least
  squares for each candidate; then the best candidate's breakpoints refined continuously between their grid
  neighbours (Nelder-Mead), so a breakpoint is not rounded to the grid;
- **the choice**: the Bayesian information criterion ``BIC = n log(RSS / n) + p log n`` with ``p = 2 + 2k``
  parameters (intercept, slope, a slope change and a location per breakpoint). A model with more breakpoints is
  chosen only when its BIC is lower than the best simpler model's by more than :data:`BIC_MARGIN` (6, "strong
  evidence" on the scale of Kass & Raftery 1995): a breakpoint location found by search fits noise better than
  one parameter would. In ``benchmarks/calibrate_breakpoints.py`` (10 checkpoints over three decades, noise sd 0.5
  PR, a fall of 10 PR per decade after a plateau), plain BIC chose two breakpoints for that one-breakpoint series in
  15 of 40 draws, and one or two for a straight line in 7 of 40; with the margin, 2 of 40 and none. The price: at
  noise sd 2 the margin missed the breakpoint in 7 of 40 draws (plain BIC in 1). RSS is floored at
  ``n (1e-9 max|y|)^2`` so that exact fits of constructed series compare by their penalty;
- **"sudden"** (:func:`sudden_segment`): a segment of the chosen fit is a sudden drop when it falls, carries at
  least :data:`SUDDEN_SHARE` of the fitted curve's whole range, spans at most :data:`SUDDEN_SPAN` of the
  log-token range of the run, and falls by more than three residual standard deviations. A straight decline is
  therefore gradual, however steep: it spans the whole range;
- **loss plateaus** (:func:`plateau_segments`): a segment of the validation-loss fit whose slope is at most
  :data:`PLATEAU_RATIO` of the steepest segment's, in absolute value. A loss fit without breakpoints has no
  plateau.

Limits, said plainly: with 10 checkpoints a two-breakpoint model has 6 parameters for 10 numbers, and BIC's
penalty is an asymptotic argument; a breakpoint is located only to within the spacing of the checkpoints
around it; and the fits see each series on its own, without noise estimates across seeds. Breakpoints across
seeds (:func:`breakpoint_spread`) are the check that a breakpoint is a property of the configuration.

The fit of one series is here; [`dynamics`][spectra.analysis.dynamics] applies it to every run of a set of cubes
(:func:`~spectra.analysis.dynamics.breakpoint_table`, :func:`~spectra.analysis.dynamics.loss_breakpoint_table`).
No I/O, no torch.

References: Schwarz, G. (1978), Estimating the dimension of a model, *Annals of Statistics* 6, 461-464;
Kass, R. E. & Raftery, A. E. (1995), Bayes factors, *JASA* 90, 773-795 (section 3.2, the scale of BIC differences).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from spectra.errors import SpectraError

__all__ = [
    "BIC_MARGIN",
    "GRID_PER_INTERVAL",
    "MAX_BREAKPOINTS",
    "MIN_POINTS_PER_SEGMENT",
    "PLATEAU_RATIO",
    "SUDDEN_SHARE",
    "SUDDEN_SPAN",
    "PiecewiseFit",
    "fit_piecewise",
    "plateau_segments",
    "sudden_segment",
]

MAX_BREAKPOINTS = 2
"""Models with 0, 1 and 2 breakpoints are compared."""
BIC_MARGIN = 6.0
"""BIC improvement a model with more breakpoints needs over the best simpler one (Kass & Raftery 1995: > 6 is
strong evidence)."""
MIN_POINTS_PER_SEGMENT = 3
"""Checkpoints each segment must hold, so that no segment is fitted to one or two outlying points."""
GRID_PER_INTERVAL = 2
"""Candidate breakpoint positions per interval between consecutive checkpoints (in log tokens)."""
SUDDEN_SHARE = 0.5
"""A sudden drop carries at least this fraction of the range of the fitted trajectory."""
SUDDEN_SPAN = 0.25
"""… within at most this fraction of the run's log-token range (a factor of ``(last/first)^0.25`` in tokens)."""
PLATEAU_RATIO = 0.25
"""A loss segment is a plateau when ``|slope| <= PLATEAU_RATIO * max |slope|`` over the segments of its fit."""

_RSS_FLOOR = 1e-9


@dataclass(frozen=True)
class PiecewiseFit:
    """The chosen continuous piecewise-linear model of one series, with the criteria of every candidate."""

    x: np.ndarray
    """log10 of the tokens of the points used (sorted)."""
    y: np.ndarray
    """The values at those points."""
    breakpoints: tuple[float, ...]
    """Breakpoints in log10 tokens, ascending; empty for a straight line."""
    coefficients: tuple[float, ...]
    """``a, b, c_1, ..., c_k`` of ``a + b x + sum_j c_j (x - t_j)_+``."""
    rss: float
    """Residual sum of squares of the chosen model."""
    bic: tuple[float, ...]
    """BIC of the best model with 0, 1, 2 breakpoints (NaN where too few points allow none)."""

    @property
    def n_breakpoints(self) -> int:
        return len(self.breakpoints)

    @property
    def breakpoint_tokens(self) -> tuple[float, ...]:
        """The breakpoints as token counts."""
        return tuple(10.0**t for t in self.breakpoints)

    @property
    def slopes(self) -> tuple[float, ...]:
        """Slope of each segment, in units of ``y`` per decade of tokens (``k + 1`` values)."""
        b, changes = self.coefficients[1], self.coefficients[2:]
        return tuple(b + sum(changes[:i]) for i in range(len(changes) + 1))

    @property
    def knots(self) -> np.ndarray:
        """Segment ends in log10 tokens: the first point, the breakpoints, the last point."""
        return np.array([self.x[0], *self.breakpoints, self.x[-1]])

    @property
    def residual_sd(self) -> float:
        """``sqrt(RSS / (n - p))``; 0 when the model has as many parameters as points."""
        dof = len(self.x) - (2 + 2 * self.n_breakpoints)
        return math.sqrt(self.rss / dof) if dof > 0 else 0.0

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """The fitted curve at ``x`` (log10 tokens)."""
        x = np.asarray(x, dtype=np.float64)
        return _design(x, self.breakpoints) @ np.asarray(self.coefficients)

    @property
    def main_breakpoint(self) -> int | None:
        """Index of the breakpoint with the largest change of slope, or None for a straight line."""
        if not self.breakpoints:
            return None
        return int(np.argmax(np.abs(self.coefficients[2:])))


def _design(x: np.ndarray, breakpoints: Iterable[float]) -> np.ndarray:
    cols = [np.ones_like(x), x] + [np.maximum(x - t, 0.0) for t in breakpoints]
    return np.stack(cols, axis=-1)  # (..., n, 2 + k)


def _candidates(x: np.ndarray) -> np.ndarray:
    """Interior grid of breakpoint positions: GRID_PER_INTERVAL per interval between consecutive points."""
    steps = np.arange(GRID_PER_INTERVAL) / GRID_PER_INTERVAL
    grid = (x[:-1, None] + np.diff(x)[:, None] * steps[None, :]).ravel()
    return grid[1:]  # not the first point itself; the last point is never in the grid


def _feasible_sets(x: np.ndarray, k: int, min_points: int) -> np.ndarray:
    """Breakpoint sets (P, k), ascending, whose every segment holds ``min_points`` checkpoints."""
    grid = _candidates(x)
    if k == 0:
        return np.empty((1, 0))
    upto = np.searchsorted(x, grid, side="right")  # points with x <= t
    below = np.searchsorted(x, grid, side="left")  # points with x < t
    n = len(x)
    if k == 1:
        ok = (upto >= min_points) & (n - below >= min_points)
        return grid[ok][:, None]
    i, j = np.triu_indices(len(grid), k=1)  # every pair t_i < t_j
    ok = (upto[i] >= min_points) & (upto[j] - below[i] >= min_points) & (n - below[j] >= min_points)
    return np.stack([grid[i[ok]], grid[j[ok]]], axis=1)


def _lstsq(x: np.ndarray, y: np.ndarray, breakpoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of ``y`` on the hinge design for each row of ``breakpoints`` (P, k): (RSS (P,), beta (P, 2+k))."""
    xc = x.mean()  # centre x for conditioning; undone below
    u = x - xc
    hinges = np.maximum(u[None, :, None] - (breakpoints - xc)[:, None, :], 0.0)  # (P, n, k)
    base = np.broadcast_to(np.stack([np.ones_like(u), u], axis=-1), (len(breakpoints), len(u), 2))
    design = np.concatenate([base, hinges], axis=-1)  # (P, n, 2 + k)
    q, r = np.linalg.qr(design)
    beta = np.linalg.solve(r, np.einsum("pnk,n->pk", q, y)[..., None])[..., 0]  # (P, 2 + k)
    rss = np.sum((np.einsum("pnk,pk->pn", design, beta) - y) ** 2, axis=1)
    beta[:, 0] -= beta[:, 1] * xc  # back to a + b x; the slope and its changes are unchanged
    return rss, beta


def _best_fit(
    x: np.ndarray, y: np.ndarray, k: int, min_points: int
) -> tuple[float, tuple, np.ndarray] | None:
    """(RSS, breakpoints, coefficients) of the best model with ``k`` breakpoints, or None if none is feasible.

    The grid's best breakpoints are then refined continuously (Nelder-Mead between the grid neighbours of each), so
    that a breakpoint between grid positions is located where it is, not rounded to the grid; a refinement that
    would leave a segment with too few checkpoints is refused.
    """
    sets = _feasible_sets(x, k, min_points)  # (P, k)
    if len(sets) == 0:
        return None
    rss, beta = _lstsq(x, y, sets)
    best = int(np.argmin(rss))
    if k == 0:
        return float(rss[0]), (), beta[0]
    start = sets[best]
    grid = np.r_[x[0], _candidates(x), x[-1]]
    where = np.searchsorted(grid, start)  # each start is a grid position: bounds are its two neighbours

    xc = x.mean()

    def objective(t: np.ndarray) -> float:
        t = np.sort(t)
        if not _segments_hold(x, t, min_points):
            return math.inf
        design = _design(x - xc, t - xc)  # (n, 2 + k), one candidate: plain lstsq is the cheapest call
        residual = np.linalg.lstsq(design, y, rcond=None)[1]
        return float(residual[0]) if residual.size else 0.0

    bounds = [(grid[i - 1], grid[i + 1]) for i in where]
    found = scipy.optimize.minimize(
        objective, start, method="Nelder-Mead", bounds=bounds, options={"xatol": 1e-10, "fatol": 0.0}
    )
    t = np.sort(found.x) if found.fun < rss[best] else start
    rss_t, beta_t = _lstsq(x, y, t[None, :])
    return float(rss_t[0]), tuple(float(v) for v in t), beta_t[0]


def _segments_hold(x: np.ndarray, breakpoints: np.ndarray, min_points: int) -> bool:
    edges = np.r_[x[0], breakpoints, x[-1]]
    upto = np.searchsorted(x, edges[1:], side="right")  # points <= each segment's end
    below = np.searchsorted(x, edges[:-1], side="left")  # points < each segment's start
    return bool(np.all(upto - below >= min_points))


def fit_piecewise(
    tokens: Iterable[float],
    values: Iterable[float],
    *,
    max_breakpoints: int = MAX_BREAKPOINTS,
    min_points: int = MIN_POINTS_PER_SEGMENT,
) -> PiecewiseFit:
    """Fit continuous piecewise-linear models in log10 tokens with 0 … ``max_breakpoints`` breakpoints; choose by BIC.

    Parameters
    ----------
    tokens, values
        The series: training tokens of each checkpoint and the value there. Points with tokens <= 0 (step 0)
        or a NaN value are left out; tokens must be distinct.
    max_breakpoints
        Largest number of breakpoints tried (0, 1 or 2).
    min_points
        Checkpoints each segment must hold.

    Returns
    -------
    PiecewiseFit
        The model BIC chooses, with the margin (see the module's description).

    Raises
    ------
    SpectraError
        Fewer than three usable points, repeated token counts, or a bad ``max_breakpoints``.

    Examples
    --------
    >>> tokens = np.geomspace(1e5, 1e8, 13)  # 4 checkpoints per decade
    >>> pr = np.where(tokens < 1e7, 40.0, 40.0 - 20.0 * np.log10(tokens / 1e7))  # flat, then -20 per decade
    >>> fit = fit_piecewise(tokens, pr)
    >>> fit.n_breakpoints, [round(t, 6) for t in fit.breakpoints], [round(s, 6) + 0.0 for s in fit.slopes]
    (1, [7.0], [0.0, -20.0])
    """
    if max_breakpoints not in (0, 1, 2):
        raise SpectraError(f"max_breakpoints must be 0, 1 or 2, got {max_breakpoints!r}")
    t = np.asarray(list(tokens), dtype=np.float64)
    y = np.asarray(list(values), dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise SpectraError(f"tokens and values must be 1-D of one length, got {t.shape} and {y.shape}")
    keep = (t > 0) & np.isfinite(t) & np.isfinite(y)
    t, y = t[keep], y[keep]
    order = np.argsort(t)
    t, y = t[order], y[order]
    if len(t) < 3:
        raise SpectraError(f"a trajectory needs at least 3 checkpoints after step 0 to fit, got {len(t)}")
    if np.any(np.diff(t) == 0):
        raise SpectraError("two checkpoints have the same token count; a trajectory needs distinct tokens")
    x = np.log10(t)
    n = len(x)
    floor = n * (_RSS_FLOOR * max(float(np.abs(y).max()), 1e-300)) ** 2
    fits, bic = {}, []
    for k in range(3):
        found = _best_fit(x, y, k, min_points) if k <= max_breakpoints else None
        if found is None:
            bic.append(math.nan)
            continue
        fits[k] = found
        bic.append(n * math.log(max(found[0], floor) / n) + (2 + 2 * k) * math.log(n))
    k = 0
    for more in (1, 2):
        if np.isfinite(bic[more]) and bic[more] < bic[k] - BIC_MARGIN:
            k = more
    rss, breakpoints, coefficients = fits[k]
    return PiecewiseFit(
        x=x,
        y=y,
        breakpoints=breakpoints,
        coefficients=tuple(float(c) for c in coefficients),
        rss=rss,
        bic=tuple(bic),
    )


def sudden_segment(fit: PiecewiseFit) -> int | None:
    """The segment of ``fit`` that is a sudden drop by the module's rule, or None (the steepest if several).

    A segment between knots ``u < v`` with fitted values ``f(u) > f(v)`` is a sudden drop when
    ``f(u) - f(v) >= SUDDEN_SHARE * R``, ``v - u <= SUDDEN_SPAN * (x_last - x_first)`` and
    ``f(u) - f(v) > 3 * residual_sd``, where ``R`` is the range of the fitted curve over the run.

    Examples
    --------
    >>> tokens = np.geomspace(1e5, 1e8, 13)
    >>> cliff = np.clip(40.0 - 60.0 * (np.log10(tokens) - 6.5), 10.0, 40.0)  # 40 -> 10 within half a decade
    >>> sudden_segment(fit_piecewise(tokens, cliff))
    1
    >>> sudden_segment(fit_piecewise(tokens, 40.0 - 5.0 * np.log10(tokens)))  # a straight decline is gradual
    """
    knots = fit.knots
    f = fit.predict(knots)
    total = float(f.max() - f.min())
    if total <= 0:
        return None
    span = knots[-1] - knots[0]
    drops = f[:-1] - f[1:]  # positive where the curve falls
    widths = np.diff(knots)
    sudden = (drops >= SUDDEN_SHARE * total) & (widths <= SUDDEN_SPAN * span) & (drops > 3 * fit.residual_sd)
    if not sudden.any():
        return None
    return int(np.argmax(np.where(sudden, drops / widths, -np.inf)))


def plateau_segments(fit: PiecewiseFit) -> list[int]:
    """Segments of a (loss) fit that are plateaus: ``|slope| <= PLATEAU_RATIO * max |slope|``; none without breakpoints.

    Examples
    --------
    >>> tokens = np.geomspace(1e5, 1e8, 13)
    >>> loss = np.where(tokens < 1e6, 8.0, 8.0 - 1.5 * np.log10(tokens / 1e6))  # flat at first, then learning
    >>> plateau_segments(fit_piecewise(tokens, loss))
    [0]
    """
    if not fit.breakpoints:
        return []
    slopes = np.abs(np.asarray(fit.slopes))
    steepest = slopes.max()
    return [int(i) for i in np.flatnonzero(slopes <= PLATEAU_RATIO * steepest)] if steepest > 0 else []
