"""Statistics across heads, seeds and configurations (spectra.analysis.stats), on constructed cubes with known answers.

The cubes come from ``helpers.synthetic_cube``, which builds one exactly per docs/cube.md.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr
from helpers import flat_spectrum, stack, synthetic_cube

from spectra.analysis import checkpoints, plan, stats
from spectra.errors import SpectraError

# ------------------------------------------------------------------------------------------------


def test_data_class_heuristic_and_overrides():
    assert plan.data_class("data/bible-bbe") == "simple"
    assert plan.data_class("bible-kjv/") == "complex"
    assert plan.data_class("cosmo-simple") == "simple"
    assert plan.data_class("complex-tech") == "complex"
    assert plan.data_class("bible-mix") == "standard"
    assert plan.data_class("bbe-kjv-mix") == "standard"  # both subsets: neither
    assert plan.data_class("fineweb", simple_data=["fineweb"]) == "simple"
    assert plan.data_class("runs/x/bible-kjv", simple_data=["bible-kjv"]) == "simple"  # override wins
    with pytest.raises(SpectraError, match="both as simple and as complex"):
        plan.data_class("d", simple_data=["d"], complex_data=["d"])


def test_configuration_labels_cover_the_plan_and_extras():
    assert plan.configuration_label("learned", "muon", "standard") == "A1"
    assert plan.configuration_label("none", "muon", "standard") == "A2"
    assert plan.configuration_label("learned", "adamw", "standard") == "B1"
    assert plan.configuration_label("none", "adamw", "standard") == "B2"
    assert plan.configuration_label("learned", "muon", "simple") == "C1"
    assert plan.configuration_label("learned", "muon", "complex") == "C2"
    extra = plan.configuration_label("frozen", "muon", "standard")
    assert extra.startswith("extra:") and "frozen" in extra


def test_plan_coverage_lists_present_missing_and_extra():
    ds = stack(
        [
            synthetic_cube("a1-s0", seed=0),
            synthetic_cube("a1-s1", seed=1),
            synthetic_cube("a2-s0", qk_norm="none"),
            synthetic_cube("fz-s0", qk_norm="frozen"),
        ]
    )
    cov = plan.plan_coverage(plan.run_table(ds)).set_index("label")
    assert cov.loc["A1", "status"] == "present" and cov.loc["A1", "n_seeds"] == 2
    assert cov.loc["A2", "status"] == "present"
    assert (cov.loc[["B1", "B2", "C1", "C2"], "status"] == "missing").all()
    extras = cov[cov["status"] == "extra"]
    assert len(extras) == 1 and extras["runs"].iloc[0] == "fz-s0"


def test_run_summaries_mean_and_ci_over_heads():
    # heads with PR 2, 4, 6, 8 at the final step: mean 5, CI inside [2, 8]
    rank = np.zeros((2, 2, 2))
    rank[-1] = [[2.0, 4.0], [6.0, 8.0]]
    rank[0] = 8.0
    summary = stats.run_summaries(synthetic_cube(rank=rank, steps=(0, 10)), n_resamples=2000).iloc[0]
    assert summary["mean"] == pytest.approx(5.0)
    assert 2.0 <= summary["ci_low"] < 5.0 < summary["ci_high"] <= 8.0
    assert summary["n_heads"] == 4 and summary["step"] == 10 and summary["label"] == "A1"


def test_final_checkpoint_is_each_runs_own_last_step():
    short = synthetic_cube("a1-s0", steps=(0, 10), rank=3.0)
    long = synthetic_cube("a1-s1", seed=1, steps=(0, 10, 20), rank=np.array([7.0, 7.0, 5.0])[:, None, None])
    s = stats.run_summaries(stack([short, long]), n_resamples=200).set_index("run")
    assert s.loc["a1-s0", "step"] == 10 and s.loc["a1-s0", "mean"] == pytest.approx(3.0)
    assert s.loc["a1-s1", "step"] == 20 and s.loc["a1-s1", "mean"] == pytest.approx(5.0)


def test_compare_groups_clear_difference_gives_small_p():
    a = [10.0, 10.5, 11.0, 10.2]
    b = [20.0, 20.4, 21.0, 20.6]
    c = stats.compare_groups(a, b, name_a="A1", name_b="A2", n_resamples=2000)
    assert c.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert c.welch_p < 1e-4
    assert c.mwu_p == pytest.approx(2 / 70)  # exact two-sided p for complete separation, 4 vs 4
    assert c.diff_ci_low <= c.diff <= c.diff_ci_high < 0
    assert "A1 lower than A2" in c.reading and c.note == ""


def test_compare_groups_identical_groups_give_p_near_one():
    c = stats.compare_groups([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], n_resamples=2000)
    assert c.diff == 0.0
    assert c.welch_p == pytest.approx(1.0)
    assert c.mwu_p == pytest.approx(1.0)
    assert "no difference detected" in c.reading


def test_compare_groups_with_one_constant_group_is_welch_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's "precision loss" for the constant group, before
        c = stats.compare_groups([0.02, 0.02], [0.015, 0.045], n_resamples=200)
    # var_a = 0: t = (mean_a - mean_b) / sqrt(var_b / n_b) with n_b - 1 degrees of freedom (Welch-Satterthwaite)
    t = (0.02 - 0.03) / math.sqrt(np.var([0.015, 0.045], ddof=1) / 2)
    assert c.welch_t == pytest.approx(t) and c.welch_p == pytest.approx(2 * scipy.stats.t.sf(abs(t), df=1))


def test_compare_groups_two_seeds_welch_only():
    c = stats.compare_groups([1.0, 1.2], [3.0, 3.3], n_resamples=500)
    assert not math.isnan(c.welch_p) and math.isnan(c.mwu_p)
    assert "Mann-Whitney U needs >= 3 seeds" in c.note


def test_compare_groups_single_seed_says_so_plainly():
    c = stats.compare_groups([30.0], [51.0], name_a="A1", name_b="A2")
    assert c.diff == pytest.approx(-21.0)
    assert math.isnan(c.welch_p) and math.isnan(c.mwu_p) and math.isnan(c.diff_ci_low)
    assert c.note == stats.ONE_SEED_SENTENCE
    assert c.tests == "none"
    one_side = stats.compare_groups([30.0], [51.0, 50.0], name_a="A1", name_b="A2")
    assert one_side.note.startswith("n=1 seed for A1: no test across seeds is possible")


def test_compare_configurations_over_planned_pairs():
    cubes = [synthetic_cube(f"a1-s{s}", seed=s, rank=3.0 + s) for s in range(3)]
    cubes += [synthetic_cube(f"a2-s{s}", seed=s, qk_norm="none", rank=6.0 + s) for s in range(3)]
    cubes += [synthetic_cube("b1-s0", optimizer="adamw", rank=2.0)]
    summaries = stats.run_summaries(stack(cubes), n_resamples=200)
    table = stats.compare_configurations(summaries, n_resamples=500).set_index("pair")
    assert table.loc["A1 vs A2", "diff"] == pytest.approx(-3.0)
    # t = -3 / sqrt(1/3 + 1/3) with 4 degrees of freedom (equal variances, so Welch's df = 4)
    t = -3.0 / math.sqrt(2 / 3)
    assert table.loc["A1 vs A2", "welch_t"] == pytest.approx(t)
    assert table.loc["A1 vs A2", "welch_p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), df=4))
    assert table.loc["A1 vs A2", "mwu_p"] == pytest.approx(0.1)  # exact: complete separation, 3 vs 3
    assert table.loc["A1 vs B1", "n_b"] == 1
    assert "n=1 seed for B1" in table.loc["A1 vs B1", "note"]
    assert table.loc["C1 vs C2", "reading"] == "not possible: C1 and C2 not among the runs"


def test_a_plan_cell_made_by_two_study_configurations_is_named_not_guessed():
    cubes = [
        synthetic_cube(f"{lab}-s{s}", seed=s, rank=3.0 + s) for lab in ("swept", "control") for s in range(2)
    ]
    cubes += [synthetic_cube(f"a2-s{s}", seed=s, qk_norm="none", rank=6.0) for s in range(2)]
    ds = stack(cubes)
    ds = ds.assign_coords(label=("run", [str(r).rsplit("-s", 1)[0] for r in ds["run"].values]))
    table = stats.compare_configurations(stats.run_summaries(ds, n_resamples=50), n_resamples=50)
    reading = table.set_index("pair").loc["A1 vs a2", "reading"]
    assert reading == "not possible: A1 is made by several configurations (control, swept)"


def test_configuration_summaries_one_and_many_seeds():
    cubes = [synthetic_cube(f"a1-s{s}", seed=s, rank=3.0 + s) for s in range(3)]
    cubes += [synthetic_cube("a2-s0", qk_norm="none", rank=6.0)]
    conf = stats.configuration_summaries(stats.run_summaries(stack(cubes), n_resamples=200), n_resamples=500)
    conf = conf.set_index("label")
    assert conf.loc["A1", "mean"] == pytest.approx(4.0) and conf.loc["A1", "n_seeds"] == 3
    assert conf.loc["A1", "sd"] == pytest.approx(1.0)
    assert 3.0 <= conf.loc["A1", "ci_low"] < 4.0 < conf.loc["A1", "ci_high"] <= 5.0
    assert math.isnan(conf.loc["A2", "ci_low"]) and "one seed" in conf.loc["A2", "note"]


def test_sensitivity_table_rows_are_variants_and_shows_a_sign_flip():
    # A1 lower than A2 at site proj, higher at rope: the table must show the flip
    a1 = synthetic_cube("a1", rank=3.0)
    a2 = synthetic_cube("a2", qk_norm="none", rank=5.0)
    a1["k_sv"].loc[{"site": "rope"}] = flat_spectrum(7.0, 8)
    table = stats.sensitivity_table(stack([a1, a2]))
    assert len(table) == 4 * 2 * 2
    assert list(table.columns) == ["site", "convention", "centering", "A1 vs A2"]
    row = table.set_index(["site", "convention", "centering"])["A1 vs A2"]
    assert row[("proj", "sv", "uncentered")] == pytest.approx(-2.0)
    assert row[("rope", "sv", "uncentered")] == pytest.approx(2.0)
    assert math.isnan(row[("unit", "sv", "centered")])  # A2 has no unit site


def test_sensitivity_table_without_pairs_shows_configuration_means():
    table = stats.sensitivity_table(checkpoints.as_runs(synthetic_cube("a1", rank=3.0)))
    assert "A1" in table.columns and table["A1"].iloc[0] == pytest.approx(3.0)


def test_checkpoint_table_has_both_conventions_and_only_measured_steps():
    short = synthetic_cube("a1-s0", steps=(0, 10), rank=4.0)
    long = synthetic_cube("a1-s1", seed=1, steps=(0, 10, 20), rank=4.0)
    table = stats.checkpoint_table(stack([short, long]))
    assert len(table) == 5
    assert np.allclose(table["pr_sv"], 4.0) and np.allclose(table["pr_eig"], 4.0)  # flat spectra: both = 4
    assert set(table.columns) >= {"run", "label", "tokens", "pr_sv", "pr_eig", "val_loss", "train_loss"}
    assert table.loc[table["run"] == "a1-s1", "tokens"].tolist() == [0, 10_000, 20_000]


def test_bad_choices_raise():
    ds = synthetic_cube()
    with pytest.raises(SpectraError, match="site must be one of"):
        stats.head_pr(ds, site="post")
    with pytest.raises(SpectraError, match="convention"):
        stats.head_pr(ds, convention="pr2")
    with pytest.raises(SpectraError, match="which must be"):
        stats.head_pr(ds, which="v")
    with pytest.raises(SpectraError, match="lacks the global attributes"):
        checkpoints.as_runs(ds.drop_attrs())


def test_bootstrap_ci_edge_cases():
    assert stats.bootstrap_mean_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0, 2.0)
    m, lo, hi = stats.bootstrap_mean_ci(np.array([5.0, np.nan]))
    assert m == 5.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in stats.bootstrap_mean_ci(np.array([np.nan])))
    # fixed seed: the same interval twice
    v = np.arange(10.0)
    assert stats.bootstrap_mean_ci(v, n_resamples=300) == stats.bootstrap_mean_ci(v, n_resamples=300)


def test_run_table_columns():
    t = plan.run_table(
        stack([synthetic_cube("c1", data="bible-bbe"), synthetic_cube("c2", data="bible-kjv")])
    )
    assert isinstance(t, pd.DataFrame)
    assert t.set_index("run")["label"].to_dict() == {"c1": "C1", "c2": "C2"}
    assert t["final_tokens"].tolist() == [20_000, 20_000]


def variant_cube(name: str, muon_qkvo: str, weights_dtype: str = "float32", **kw) -> xr.Dataset:
    ds = synthetic_cube(name, **kw)
    ds.attrs.update(muon_qkvo=muon_qkvo, weights_dtype=weights_dtype)
    return ds


def test_the_muon_variant_is_part_of_a_runs_identity():
    assert plan.configuration_label("learned", "muon", "standard", "fused") == "A1f"
    assert plan.configuration_label("none", "muon", "standard", "separate_stacked_lr") == "A2c"
    assert plan.configuration_label("learned", "muon", "standard", "fused", "bfloat16") == "A1f-bf16"
    assert (
        plan.configuration_label("learned", "adamw", "standard", "fused") == "B1"
    )  # AdamW has no QKVO variant
    assert plan.configuration_label("learned", "adamw", "standard", weights_dtype="bfloat16") == "B1-bf16"
    extra = plan.configuration_label("none", "muon", "simple", "fused", "float64")
    assert extra == "extra: no QK-norm, Muon (fused QKVO)+AdamW, float64 weights, simple data"


def test_run_table_reads_the_variant_and_old_cubes_trained_the_default():
    old = synthetic_cube("old-s0")  # written before the attributes existed: no muon_qkvo, no weights_dtype
    ds = stack([old, variant_cube("f-s0", "fused"), variant_cube("b-s0", "fused", "bfloat16", seed=1)])
    runs = plan.run_table(ds).set_index("run")
    assert runs.loc["old-s0", ["muon_qkvo", "weights_dtype", "plan_cell"]].tolist() == [
        "separate",
        "float32",
        "A1",
    ]
    assert runs.loc["f-s0", "plan_cell"] == "A1f" and runs.loc["b-s0", "plan_cell"] == "A1f-bf16"
    single = plan.run_table(checkpoints.as_runs(variant_cube("c-s0", "separate_stacked_lr")))
    assert single["plan_cell"].tolist() == ["A1c"]


def test_fused_vs_separate_is_compared_where_both_are_present():
    sep = [synthetic_cube(f"sep-s{s}", seed=s, rank=4.0 + 0.1 * s) for s in range(3)]
    fused = [variant_cube(f"fused-s{s}", "fused", seed=s, rank=6.0 + 0.1 * s) for s in range(3)]
    summaries = stats.run_summaries(stack(sep + fused), n_resamples=100)
    table = stats.compare_configurations(summaries, n_resamples=200).set_index("pair")
    row = table.loc["A1f vs A1"]
    assert row["n_a"] == 3 and row["n_b"] == 3
    by_run = summaries.set_index("run")["mean"]
    expected = np.mean([by_run[f"fused-s{s}"] for s in range(3)]) - np.mean(
        [by_run[f"sep-s{s}"] for s in range(3)]
    )
    assert row["diff"] == pytest.approx(expected, rel=1e-12) and row["diff"] > 1.9  # fused minus separate
    assert "A2f vs A2" not in table.index  # a replication pair only where both of its cells are present
    only_plan = stats.compare_configurations(
        stats.run_summaries(stack(sep), n_resamples=100), n_resamples=200
    )
    assert set(only_plan["pair"]) == {p.name for p in plan.PLAN_PAIRS}
