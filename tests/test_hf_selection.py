"""The revision selection grammar (spectra.hf.selection) on the real naming schemes of Pythia and OLMo-2.

Pure: names and steps in, choices out. The listings are those the publishers document: Pythia's 154 checkpoints
(step0, ten log-spaced step1 ... step512, then step1000 ... step143000 every 1000) plus ``main``; OLMo-2-style
``stage1-stepN-tokensMB`` branches, some without the ``stage1-`` prefix, annealing ``stage2-ingredientK-...``
branches whose step counts restart, and ``main``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spectra.errors import SpectraError
from spectra.hf.revisions import step_of
from spectra.hf.selection import NAMED, gaps, log_spaced, parse_selection, select

PYTHIA_STEPS = [0] + [2**i for i in range(10)] + list(range(1000, 143_001, 1000))
PYTHIA = [(f"step{s}", s) for s in PYTHIA_STEPS] + [("main", None)]
OLMO_NAMES = [
    "main",
    "stage1-step0-tokens0B",
    "stage1-step300-tokens1B",
    "stage1-step10000-tokens21B",
    "stage1-step20000-tokens42B",
    "stage1-step40000-tokens84B",  # 30000 is missing: a gap
    "stage1-step50000-tokens105B",
    "step60000-tokens126B",  # the same stage, without the prefix
    "stage2-ingredient1-step1000-tokens3B",
    "stage2-ingredient1-step2000-tokens5B",
    "stage2-ingredient2-step1000-tokens3B",
]
OLMO = [(name, step_of(name)) for name in OLMO_NAMES]


def chosen(items, listed=PYTHIA):
    return [(c.label, c.rule) for c in select(items, listed).chosen]


def steps(items, listed=PYTHIA):
    return [c.step for c in select(items, listed).chosen]


def test_pythia_listing_is_the_documented_one():
    assert len(PYTHIA_STEPS) == 154 and PYTHIA_STEPS[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]


def test_names_alone_need_no_listing():
    out = select("step1000,main:143000", None)
    assert [(c.label, c.step, c.rule) for c in out.chosen] == [
        ("main", 143000, NAMED),
        (
            "step1000",
            None,
            NAMED,
        ),  # without a listing, the caller gives the step (step_of); unknown ones last
    ]
    assert [c.step for c in select("step1000", None, step_of=step_of).chosen] == [1000]
    with pytest.raises(SpectraError, match="need the source's list of revisions"):
        select("log:3", None)


def test_all_and_globs():
    assert len(select("all", PYTHIA).chosen) == 154  # main has no step: reported, not selected
    assert select("all", PYTHIA).without_step == ("main",)
    assert chosen("step1*", PYTHIA)[:3] == [("step1", "step1*"), ("step16", "step1*"), ("step128", "step1*")]
    assert steps("step?") == [0, 1, 2, 4, 8]
    assert steps("step[12]000") == [1000, 2000]
    olmo_stage1 = select("stage1-*", OLMO)
    assert [c.step for c in olmo_stage1.chosen] == [0, 300, 10000, 20000, 40000, 50000]
    assert olmo_stage1.without_step == ()  # main does not match stage1-*
    # a pattern that matches nothing is reported
    assert select("stage3-*,stage1-*", OLMO).empty_rules == ("stage3-*",)


def test_every_n():
    assert steps("every:10") == [0, 512, *range(10000, 140_001, 10000)]  # positions 0, 10, 20, ...
    assert steps("every:1") == PYTHIA_STEPS
    assert steps("every:200") == [0]


def test_range():
    assert steps("range:100-3000") == [128, 256, 512, 1000, 2000, 3000]  # both ends included
    assert steps("range:0-0") == [0]
    out = select("range:5-7", PYTHIA)
    assert out.chosen == () and out.empty_rules == ("range:5-7",)


def test_log_k_on_pythia():
    picked = steps("log:30")
    assert len(picked) == 30 and picked[0] == 0 and picked[-1] == 143000
    # the early checkpoints are sparser than the spacing asks: every one of them is taken ...
    assert picked[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    # ... and beyond them the gaps in log(1 + step) are as equal as the 1000-step grid allows
    late = np.diff(np.log1p(picked[16:]))
    assert late.max() - late.min() < 0.1
    assert steps("log:2") == [0, 143000]
    assert steps("log:500") == PYTHIA_STEPS  # more than there are: all


def test_log_spaced_is_the_least_sum_of_squared_gaps():
    """Against brute force over every choice of k steps with both ends fixed."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        pool = sorted(set(rng.integers(0, 5000, size=9).tolist()) | {0})
        k = int(rng.integers(2, len(pool) + 1))
        x = np.log1p(np.asarray(pool, dtype=np.float64))

        def cost(idx, x=x):
            return float(np.sum(np.diff(x[list(idx)]) ** 2))

        middles = itertools.combinations(range(1, len(pool) - 1), k - 2)
        best = min(cost((0, *m, len(pool) - 1)) for m in middles)
        got = log_spaced(pool, k)
        assert got[0] == 0 and got[-1] == len(pool) - 1 and len(set(got)) == k
        assert cost(got) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_step_zero_sits_at_log_one_plus_zero():
    # log1p places 0 at 0, 1 at log 2, 2 at log 3, 3 at log 4: of three picks over 0..3 the middle one is 1
    # (squared gaps 0.69^2 + 0.69^2 = 0.96), not 2 (1.10^2 + 0.29^2 = 1.29)
    assert log_spaced([0, 1, 2, 3], 3) == [0, 1, 3]


def test_union_and_order_rules():
    # a glob with a sampler restricts the sampler's pool; names are added; each keeps the first rule that chose it
    out = select("stage1-*,log:3,main:99", OLMO)
    assert [(c.label, c.rule) for c in out.chosen] == [  # sorted by step
        ("stage1-step0-tokens0B", "log:3"),
        ("main", NAMED),
        ("stage1-step300-tokens1B", "log:3"),  # log1p: 5.7, nearest the middle of 0 and 10.8
        ("stage1-step50000-tokens105B", "log:3"),
    ]
    # two samplers: the union, each revision credited to the first in the order given
    assert chosen("range:0-2,every:50") == [
        ("step0", "range:0-2"),
        ("step1", "range:0-2"),
        ("step2", "range:0-2"),
        ("step40000", "every:50"),  # positions 50, 100, 150: steps 1000 apart from position 11 (step1000) on
        ("step90000", "every:50"),
        ("step140000", "every:50"),
    ]
    # a name a rule also picks is listed once, as named
    assert chosen("log:2,step143000")[-1] == ("step143000", NAMED)
    # several globs: a union of pools
    assert steps("stage1-step0-*,stage2-ingredient2-*", OLMO) == [0, 1000]


def test_duplicates_are_reported_not_dropped():
    out = select("all", OLMO)
    assert out.duplicates == {
        1000: ("stage2-ingredient1-step1000-tokens3B", "stage2-ingredient2-step1000-tokens3B")
    }
    assert {c.label for c in out.chosen} == {n for n, s in OLMO if s is not None}
    assert out.without_step == ("main",)
    # a sampler picks steps; every revision of the pool at a picked step comes with it
    assert select("range:1000-1000", OLMO).duplicates == out.duplicates


def test_gaps():
    assert select("all", PYTHIA).gaps == []  # 1000 apart after the log-spaced start: no gap
    [gap] = select("stage1-*,step*", OLMO).gaps
    assert (gap.after, gap.before, gap.interval, gap.missing) == (20000, 40000, 10000, 1)
    assert [(g.after, g.before, g.missing) for g in gaps([0, 10, 20, 30, 60])] == [(30, 60, 2)]
    assert gaps([0, 5]) == [] and gaps([0, 1, 2, 1000]) == []  # no interval repeats three times: no grid
    assert gaps([1, 2, 4, 8, 16, 32]) == []  # a geometric grid


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("every:0", "not a positive integer"),
        ("every:x", "not a positive integer"),
        ("log:1", "K >= 2"),
        ("range:9-3", "A <= B"),
        ("range:3", "A <= B"),
        ("step0:x", "must be the step"),
        (" , ", "is empty"),
    ],
)
def test_malformed_selections(text, message):
    with pytest.raises(SpectraError, match=message):
        parse_selection(text)


def test_parse_keeps_the_order_and_kinds():
    s = parse_selection(" stage1-* , log:30,main:143000,step1000 ")
    assert s.order == ("stage1-*", "log:30", "main:143000", "step1000")
    assert s.patterns == ("stage1-*",) and [x.text for x in s.samplers] == ["log:30"]
    assert s.names == (("main", 143000, "main:143000"), ("step1000", None, "step1000"))
    assert s.needs_listing and not parse_selection("step0").needs_listing
