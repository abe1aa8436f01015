"""Which revisions a ``--revisions`` value picks from those a model publishes: names, globs and sampling rules.

The value is a comma-separated list of items, each of one kind:

- **names**: ``REV`` or ``REV:STEP`` (``step1000``, ``main:143000``), taken as given;
- **patterns**: ``all`` (every listed revision) or a glob (``'step*'``, ``'stage1-*'``; ``*``, ``?``, ``[...]``,
  matched against the whole name, case-sensitively);
- **samplers**: ``every:N`` (every N-th step), ``log:K`` (K steps evenly spaced in log step), ``range:A-B``
  (steps A to B, both included).

How they combine (:func:`select`):

1. The **pool** is the listed revisions that have a step and match a pattern; without a pattern, every listed
   revision that has a step. Listed names without a step (``main``) are never in the pool: they are reported,
   and taken only when named with their step (``main:143000``).
2. Without a sampler, the selection is the pool (when a pattern was given). Each sampler picks **steps** among
   the pool's distinct steps; the selection is the union of what the samplers pick, and every pool revision at a
   picked step comes with it (two revisions at one step are then reported, never one dropped silently).
3. Names are added to the selection; a name a rule also picked keeps the rule ``named``.
4. The selection is sorted by step; each revision records the first item, in the order given, that picked it.

Sampling, over the pool's distinct steps ``s_0 < s_1 < ... < s_{n-1}``:

- ``every:N`` picks ``s_0, s_N, s_2N, ...``: the last step only when it falls on that grid;
- ``log:K`` places steps at ``x = log(1 + step)``, so step 0 (the initialisation) sits at ``x = 0`` and steps far
  from 0 are spaced as by ``log(step)``; it picks K steps, the first and the last among them, whose consecutive
  gaps in ``x`` are as equal as the available steps allow: the least sum of squared gaps (:func:`log_spaced`).
  Where the steps are sparser than that spacing, all of them are taken and the rest spread evenly; with
  K >= n, every step;
- ``range:A-B`` picks every step with ``A <= step <= B``.

A **gap** is a place where two consecutive steps of the pool lie further apart than the pool's usual interval,
its most common one when that occurs at least three times (:func:`gaps`): the checkpoints that interval would
have put between them are missing.

This module is pure (names and steps in, choices out): no I/O, no hub, no torch.

Examples
--------
>>> pythia = [(f"step{s}", s) for s in (0, 1, 2, 4, 8, 1000, 2000, 3000)] + [("main", None)]
>>> [(c.label, c.rule) for c in select("log:4", pythia).chosen]
[('step0', 'log:4'), ('step8', 'log:4'), ('step1000', 'log:4'), ('step3000', 'log:4')]
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from spectra.errors import SpectraError

__all__ = [
    "NAMED",
    "Choice",
    "Gap",
    "Selection",
    "Sampler",
    "gaps",
    "log_spaced",
    "parse_selection",
    "select",
]

NAMED = "named"
"""The rule of a revision given by name."""
_GLOB_CHARS = re.compile(r"[*?\[]")
_SAMPLER_RE = re.compile(r"^(every|log|range):(.*)$")
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")
_GRID_MIN = 3  # occurrences of the usual interval that make a checkpoint grid to find gaps in


@dataclass(frozen=True)
class Sampler:
    """One sampling rule: ``every:N``, ``log:K`` or ``range:A-B``."""

    kind: str
    """``every``, ``log`` or ``range``."""
    args: tuple[int, ...]
    """``(N,)``, ``(K,)`` or ``(A, B)``."""
    text: str
    """As given, for reports."""

    def pick(self, steps: Sequence[int]) -> list[int]:
        """The steps this rule picks among ``steps`` (distinct, ascending)."""
        if self.kind == "every":
            return list(steps[:: self.args[0]])
        if self.kind == "log":
            return [steps[i] for i in log_spaced(steps, self.args[0])]
        low, high = self.args
        return [s for s in steps if low <= s <= high]


@dataclass(frozen=True)
class Selection:
    """A parsed ``--revisions`` value."""

    names: tuple[tuple[str, int | None, str], ...]
    """``(label, step or None, item as given)`` for each name item."""
    patterns: tuple[str, ...]
    """Globs; ``all`` is kept as ``all``."""
    samplers: tuple[Sampler, ...]
    order: tuple[str, ...]
    """Every item as given, in order (a revision records the first that picked it)."""

    @property
    def needs_listing(self) -> bool:
        """Whether the source's list of revisions is needed (a pattern or a sampler is present)."""
        return bool(self.patterns or self.samplers)


@dataclass(frozen=True)
class Choice:
    """One selected revision."""

    label: str
    step: int | None
    """From ``REV:STEP`` or the name; None for a name without a step (which extraction refuses)."""
    rule: str
    """The item that picked it: ``named``, ``all``, a glob, or a sampler as given."""


@dataclass(frozen=True)
class Gap:
    """Consecutive steps of a pool further apart than its most common interval."""

    after: int
    before: int
    interval: int
    """The pool's most common interval between consecutive steps."""

    @property
    def missing(self) -> int:
        """How many checkpoints the common interval would have put strictly between ``after`` and ``before``."""
        return math.ceil((self.before - self.after) / self.interval) - 1

    def describe(self) -> str:
        return f"{self.after} -> {self.before} (about {self.missing} missing at the usual interval of {self.interval})"


@dataclass(frozen=True)
class Outcome:
    """What a selection resolves to over a list of revisions (:func:`select`)."""

    chosen: tuple[Choice, ...]
    """Sorted by step (a name without a step last)."""
    pool: tuple[tuple[str, int], ...]
    """The revisions the rules drew from (empty when only names were given and nothing was listed)."""
    without_step: tuple[str, ...]
    """Listed names that match the patterns (or, without a pattern, any listed name) but carry no step."""
    empty_rules: tuple[str, ...]
    """Patterns and samplers that picked nothing."""

    @property
    def duplicates(self) -> dict[int, tuple[str, ...]]:
        """Steps that more than one chosen revision stands for, with their labels."""
        by_step: dict[int, list[str]] = {}
        for c in self.chosen:
            if c.step is not None:
                by_step.setdefault(c.step, []).append(c.label)
        return {s: tuple(labels) for s, labels in by_step.items() if len(labels) > 1}

    @property
    def gaps(self) -> list[Gap]:
        """Gaps in the pool's steps (:func:`gaps`)."""
        return gaps(sorted({s for _, s in self.pool}))


def _positive(item: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise SpectraError(f"revision selection {item!r}: {value!r} is not a positive integer")
    return int(value)


def _sampler(item: str, kind: str, arg: str) -> Sampler:
    if kind == "range":
        m = _RANGE_RE.match(arg)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise SpectraError(f"revision selection {item!r}: expected range:A-B with steps A <= B")
        return Sampler("range", (int(m.group(1)), int(m.group(2))), item)
    n = _positive(item, arg)
    if kind == "log" and n < 2:
        raise SpectraError(f"revision selection {item!r}: log:K keeps the first and the last step, so K >= 2")
    return Sampler(kind, (n,), item)


def _name(item: str) -> tuple[str, int | None, str]:
    """``REV`` or ``REV:STEP`` (a git ref name cannot contain a colon)."""
    if ":" not in item:
        return item, None, item
    label, step = item.rsplit(":", 1)
    if not label or not step.isdigit():
        raise SpectraError(
            f"revision {item!r}: the part after ':' must be the step, a non-negative integer (REV:STEP; the "
            "rules are all, a glob, every:N, log:K, range:A-B)"
        )
    return label, int(step), item


def parse_selection(items: str | Sequence[str]) -> Selection:
    """Parse a ``--revisions`` value (a comma-separated string, or its items); empty items are ignored.

    Raises
    ------
    SpectraError
        A malformed sampler (``every:0``, ``log:1``, ``range:9-3``) or name (``REV:x``), or no item at all.

    Examples
    --------
    >>> s = parse_selection("stage1-*,log:30,main:143000")
    >>> s.patterns, [x.text for x in s.samplers], s.names
    (('stage1-*',), ['log:30'], (('main', 143000, 'main:143000'),))
    """
    raw = items.split(",") if isinstance(items, str) else list(items)
    order = tuple(i.strip() for i in raw if i.strip())
    if not order:
        raise SpectraError("--revisions is empty: give names, all, a glob, every:N, log:K or range:A-B")
    names, patterns, samplers = [], [], []
    for item in order:
        m = _SAMPLER_RE.match(item)
        if m:
            samplers.append(_sampler(item, m.group(1), m.group(2)))
        elif item == "all" or _GLOB_CHARS.search(item):
            patterns.append(item)
        else:
            names.append(_name(item))
    return Selection(tuple(names), tuple(patterns), tuple(samplers), order)


def log_spaced(steps: Sequence[int], k: int) -> list[int]:
    """Indices of ``k`` of the (distinct, ascending) ``steps``, first and last included, as evenly spaced in
    ``log(1 + step)`` as the steps allow.

    Among the increasing index sequences that start at 0, end at ``n - 1`` and have ``k`` members, the one whose
    consecutive gaps in ``x = log1p(step)`` have the least sum of squares; the gaps sum to ``x[-1] - x[0]``
    whatever is picked, so equal gaps would minimise it, and where the steps are too sparse for equal gaps (the
    early, power-of-two checkpoints of Pythia), every one of them is taken and the rest are spread evenly over
    what is left. Dynamic programming over (picks made, last pick), ``O(k n^2)``; ties go to the smaller step.
    With ``k >= n``, every index.

    Examples
    --------
    >>> log_spaced([0, 1, 2, 4, 8, 16, 1000, 2000], 3)
    [0, 5, 7]
    """
    n = len(steps)
    if k >= n:
        return list(range(n))
    x = np.log1p(np.asarray(steps, dtype=np.float64))
    gap2 = (x[None, :] - x[:, None]) ** 2  # gap2[a, b]: squared gap from step a to step b
    later = np.triu(np.ones((n, n), dtype=bool), 1)  # b after a
    best = np.full(n, np.inf)  # best[b]: least sum of squared gaps of picks so far ending at b
    best[0] = 0.0  # the first step is always the first pick
    came_from = np.zeros((k, n), dtype=np.int64)
    for i in range(1, k):
        through = np.where(later, best[:, None] + gap2, np.inf)  # (a, b): pick i at b, pick i - 1 at a
        came_from[i] = through.argmin(axis=0)
        best = through.min(axis=0)
    picked = [n - 1]  # the last step is always the last pick
    for i in range(k - 1, 0, -1):
        picked.append(int(came_from[i, picked[-1]]))
    return picked[::-1]


def gaps(steps: Sequence[int]) -> list[Gap]:
    """Consecutive ``steps`` (distinct, ascending) further apart than their usual interval.

    The usual interval is the most common one between consecutive steps (the larger where two are equally
    common), provided it occurs at least three times: a checkpoint grid to compare with. A few steps, or steps
    without a repeated spacing (a geometric grid), have none, and no gap is reported.

    Examples
    --------
    >>> [g.describe() for g in gaps([0, 1000, 2000, 3000, 5000, 6000])]
    ['3000 -> 5000 (about 1 missing at the usual interval of 1000)']
    >>> gaps([0, 1, 2, 1000])
    []
    """
    intervals = np.diff(np.asarray(steps, dtype=np.int64)).tolist()
    counts = Counter(intervals)
    if not counts or max(counts.values()) < _GRID_MIN:
        return []
    usual = max(counts, key=lambda d: (counts[d], d))
    return [Gap(a, b, usual) for a, b, d in zip(steps, steps[1:], intervals) if d > usual]


def _pool(selection: Selection, listed: Sequence[tuple[str, int | None]]) -> tuple[list, list, list[str]]:
    """``(pool, matched names without a step, patterns that matched nothing)``."""
    patterns = selection.patterns or ("all",)
    matched: dict[str, int | None] = {}
    empty = []
    for pattern in patterns:
        hits = [(n, s) for n, s in listed if pattern == "all" or fnmatchcase(n, pattern)]
        if not hits and selection.patterns:
            empty.append(pattern)
        matched.update((n, s) for n, s in hits if n not in matched)
    pool = sorted(((n, s) for n, s in matched.items() if s is not None), key=lambda p: (p[1], p[0]))
    return pool, sorted(n for n, s in matched.items() if s is None), empty


def _rule_of(selection: Selection, name: str, step: int, picked_by: dict[str, set[int]]) -> str | None:
    """The first pattern or sampler, in the order given, that picked ``(name, step)``; None if none did."""
    for item in selection.order:
        if item in picked_by and step in picked_by[item]:
            return item
        if not selection.samplers and item in selection.patterns:
            if item == "all" or fnmatchcase(name, item):
                return item
    return None


def select(
    items: str | Sequence[str] | Selection,
    listed: Sequence[tuple[str, int | None]] | None,
    step_of: Callable[[str], int | None] | None = None,
) -> Outcome:
    """Resolve a selection over the listed revisions ``(name, step or None)`` (see the module docstring).

    ``listed`` may be None when the selection holds only names (nothing needs listing). A name without
    ``:STEP`` stands for the step ``step_of(name)`` gives (default: its step in ``listed``; None if not listed).

    Raises
    ------
    SpectraError
        A pattern or sampler without a list of revisions to draw from.
    """
    selection = items if isinstance(items, Selection) else parse_selection(items)
    if listed is None:
        if selection.needs_listing:
            raise SpectraError("all, globs and every:/log:/range: need the source's list of revisions")
        listed = []
    pool, without_step, empty = _pool(selection, listed)
    picked_by: dict[str, set[int]] = {}
    distinct = sorted({s for _, s in pool})
    for sampler in selection.samplers:
        picked_by[sampler.text] = set(sampler.pick(distinct))
        if not picked_by[sampler.text]:
            empty.append(sampler.text)
    chosen: dict[str, Choice] = {}
    if selection.needs_listing:
        for name, step in pool:
            rule = _rule_of(selection, name, step, picked_by)
            if rule is not None:
                chosen[name] = Choice(name, step, rule)
    listed_steps = dict(listed)
    for label, step, _ in selection.names:
        if step is None:
            step = step_of(label) if step_of is not None else listed_steps.get(label)
        chosen[label] = Choice(label, step, NAMED)  # a name wins: it may carry its own step
    ordered = sorted(chosen.values(), key=lambda c: (c.step is None, c.step or 0, c.label))
    return Outcome(tuple(ordered), tuple(pool), tuple(without_step), tuple(empty))
