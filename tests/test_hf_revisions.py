"""Sources, revisions, steps and tokens of public models; every selection form over local revisions directories
named as Pythia's and OLMo-2's branches (the hub's listing and cache: test_hf_hub.py)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")

from conftest import PYTHIA_STYLE  # noqa: E402

from spectra.errors import SpectraError  # noqa: E402
from spectra.hf.revisions import (  # noqa: E402
    PYTHIA_TOKENS_PER_STEP,
    is_public_source,
    list_revisions,
    parse_source,
    plan_revisions,
    step_of,
    tokens_for,
    tokens_in_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("label", "step", "tokens"),
    [
        ("step0", 0, None),
        ("step143000", 143000, None),
        ("stage1-step1000-tokens5B", 1000, 5 * 10**9),
        ("stage1-step928646-tokens3896B", 928646, 3896 * 10**9),
        ("stage2-ingredient1-step11931-tokens50B", 11931, 50 * 10**9),
        ("main", None, None),
        ("prestep5", None, None),  # "step" must start a word
    ],
)
def test_step_and_tokens_from_revision_names(label, step, tokens):
    assert step_of(label) == step
    assert tokens_in_name(label) == tokens


def test_tokens_rules_in_order():
    assert tokens_for("EleutherAI/pythia-1.4b-deduped", "step10", 10, None)[0] == 10 * PYTHIA_TOKENS_PER_STEP
    assert tokens_for("allenai/OLMo-2-0425-1B", "stage1-step10-tokens21B", 10, None)[0] == 21 * 10**9
    assert tokens_for("EleutherAI/pythia-160m", "step10", 10, 100)[0] == 1000  # explicit wins
    value, rule = tokens_for("HuggingFaceTB/SmolLM2-135M", "step10", 10, None)
    assert math.isnan(value) and "--tokens-per-step" in rule


def test_sources(hf_revisions, tmp_path):
    root = hf_revisions("llama")
    assert parse_source("hf:EleutherAI/pythia-160m").kind == "hub"
    assert parse_source(root).kind == "revisions-dir" and parse_source(root / "step0").kind == "model-dir"
    assert is_public_source(root) and is_public_source("hf:a/b") and not is_public_source(tmp_path)
    with pytest.raises(SpectraError, match="not a model directory"):
        parse_source(tmp_path)
    with pytest.raises(SpectraError, match="not a hub model name"):
        parse_source("hf:")


def test_plan_revisions(hf_revisions):
    root = hf_revisions("llama")
    assert [(r.label, r.step) for r in plan_revisions(parse_source(root)).revisions] == [
        ("step0", 0),
        ("step1000", 1000),
    ]
    picked = plan_revisions(parse_source(root), ["step1000"], tokens_per_step=10).revisions
    assert [(r.label, r.step, r.tokens, r.selected_by) for r in picked] == [
        ("step1000", 1000, 10_000, "named")
    ]
    one = plan_revisions(parse_source(root / "step1000")).revisions
    assert [(r.label, r.step) for r in one] == [(".", 1000)]  # the directory's own name gives the step
    hub = plan_revisions(parse_source("hf:Qwen/Qwen3-0.6B"), ["main:32000"]).check().revisions
    assert [(r.label, r.step) for r in hub] == [("main", 32000)] and math.isnan(hub[0].tokens)
    with pytest.raises(SpectraError, match="its name has no step"):
        plan_revisions(parse_source("hf:Qwen/Qwen3-0.6B")).check()
    with pytest.raises(SpectraError, match="both stand for step 1000"):
        plan_revisions(parse_source("hf:a/b"), ["step1000", "other:1000"]).check()
    with pytest.raises(SpectraError, match="no such revision directory"):
        plan_revisions(parse_source(root), ["step5"])
    with pytest.raises(SpectraError, match="its revision is '.'"):
        plan_revisions(parse_source(root / "step0"), ["step0"])
    with pytest.raises(SpectraError, match="must be the step"):
        plan_revisions(parse_source(root), ["step0:x"])


# ----------------------------------------------------------------------------------------------------
# every selection form over a local revisions directory named as Pythia's and OLMo-2's branches


def _plan(directory, selection):
    return plan_revisions(parse_source(directory), selection)


def test_a_revisions_directory_lists_its_model_subdirectories(hf_pythia_dir):
    listed = list_revisions(parse_source(hf_pythia_dir))
    assert listed == sorted(PYTHIA_STYLE)
    plan = _plan(hf_pythia_dir, None)  # default: all
    assert [r.step for r in plan.revisions] == [0, 1, 2, 4, 8, 16, 512, 1000, 2000, 3000, 5000, 6000, 7000]
    assert {r.selected_by for r in plan.revisions} == {"all"} and plan.problems == ()
    assert plan.notes() == [
        f"{hf_pythia_dir}: not selected, no step in the name (add one as REV:STEP): main",
        f"{hf_pythia_dir}: gaps in the steps the rules drew from: 3000 -> 5000 (about 1 missing at the usual "
        "interval of 1000)",
    ]
    assert plan.revisions[-1].tokens == 7000 * PYTHIA_TOKENS_PER_STEP  # "pythia-tiny": Pythia's rule


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("all", [0, 1, 2, 4, 8, 16, 512, 1000, 2000, 3000, 5000, 6000, 7000]),
        ("step1*", [1, 16, 1000]),
        ("every:3", [0, 4, 512, 3000, 7000]),
        ("log:3", [0, 16, 7000]),
        ("range:2-1000", [2, 4, 8, 16, 512, 1000]),
        ("step0,main:9000", [0, 9000]),
        ("log:2,every:5,step8", [0, 8, 16, 5000, 7000]),
    ],
)
def test_every_selection_form_on_pythia_names(hf_pythia_dir, selection, expected):
    plan = _plan(hf_pythia_dir, selection).check()
    assert [r.step for r in plan.revisions] == expected


def test_olmo2_names(hf_olmo_dir):
    everything = _plan(hf_olmo_dir, "all")
    assert everything.problems and "both stand for step 1000" in everything.problems[0]
    with pytest.raises(
        SpectraError, match="'stage2-ingredient1-step1000-tokens3B', 'stage2-ingredient2-step1000"
    ):
        everything.check()
    stage1 = _plan(
        hf_olmo_dir, "stage1-*,step*"
    ).check()  # the pretraining stage, with and without the prefix
    assert [(r.step, r.tokens) for r in stage1.revisions] == [
        (0, 0),
        (300, 10**9),  # the publisher's count, rounded up to whole billions
        (10000, 21 * 10**9),
        (20000, 42 * 10**9),
        (40000, 84 * 10**9),
        (50000, 105 * 10**9),
        (60000, 126 * 10**9),
    ]
    assert "20000 -> 40000 (about 1 missing at the usual interval of 10000)" in stage1.notes()[-1]
    sampled = _plan(hf_olmo_dir, "stage1-*,step*,log:4").check()
    assert [(r.step, r.selected_by) for r in sampled.revisions] == [
        (0, "log:4"),
        (300, "log:4"),
        (10000, "log:4"),
        (60000, "log:4"),
    ]
    ingredient = _plan(hf_olmo_dir, "stage2-ingredient1-*,range:1500-9999").check()
    assert [r.label for r in ingredient.revisions] == ["stage2-ingredient1-step2000-tokens5B"]


def test_describe(hf_olmo_dir):
    lines = _plan(hf_olmo_dir, "stage2-ingredient2-*,main:99").describe(done={99})
    assert lines[0] == f"{hf_olmo_dir}: 11 revisions listed, 2 selected by 'stage2-ingredient2-*,main:99'"
    assert lines[1].split() == ["revision", "step", "tokens", "selected", "by", "tokens", "rule", "cube"]
    assert lines[2].split() == ["main", "99", "unknown", "named", "[1]", "in", "the", "cube"]
    assert lines[3].split()[:5] == [
        "stage2-ingredient2-step1000-tokens3B",
        "1000",
        "3,000,000,000",
        "stage2-ingredient2-*",
        "[2]",
    ]
    assert lines[4].startswith("[1] tokens: unknown") and lines[5].startswith("[2] tokens: the revision name")


def test_list_revisions_command(hf_pythia_dir, hf_olmo_dir, tmp_path):
    from click.testing import CliRunner

    from cli.spectra import main

    run = CliRunner().invoke(
        main, ["extract", str(hf_pythia_dir), "--revisions", "log:3", "--list-revisions"]
    )
    assert run.exit_code == 0, run.output  # no --batch, no --out, nothing loaded
    assert run.output.splitlines()[0] == f"{hf_pythia_dir}: 14 revisions listed, 3 selected by 'log:3'"
    assert [line.split()[:2] for line in run.output.splitlines()[2:5]] == [
        ["step0", "0"],
        ["step16", "16"],
        ["step7000", "7000"],
    ]
    assert "not selected, no step in the name (add one as REV:STEP): main" in run.output
    bad = CliRunner().invoke(main, ["extract", str(hf_olmo_dir), "--revisions", "all", "--list-revisions"])
    assert bad.exit_code == 1
    assert (
        "problem: revisions 'stage2-ingredient1-step1000-tokens3B', 'stage2-ingredient2-step1000"
        in bad.output
    )
    assert "cannot be extracted as it stands" in bad.output.splitlines()[-1]
