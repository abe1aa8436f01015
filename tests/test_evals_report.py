"""The tables and figures of the report's two new sections, on cubes and eval files built here (no torch, no
lm-eval): scores per configuration and seed, table D, PR against score, breakpoints on the trajectory figure."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import flat_spectrum, synthetic_cube, write_cube
from test_dynamics import dense_cube

from spectra.analysis import stats
from spectra.analysis.kernels import participation_ratio_sv
from spectra.analysis.null import headline_with_null
from spectra.cube import open_cubes
from spectra.errors import SpectraError
from spectra.evals import results as evals_io
from spectra.evals import scores as evals_stats
from spectra.figures.dynamics import trajectory_with_breakpoints
from spectra.figures.evals import pr_vs_score

# (run directory, configuration, seed, PR rank of every head, choice accuracy, cloze accuracy)
RUNS = [
    ("a2-s0", "none", "muon", 0, 6.0, 0.40, 0.10),
    ("a2-s1", "none", "muon", 1, 5.5, 0.36, 0.12),
    ("b1-s0", "learned", "adamw", 0, 3.0, 0.26, 0.02),
    ("b1-s1", "learned", "adamw", 1, 2.5, 0.30, 0.04),
]
N_DOCS = 200


def record(task: str, acc: float, tokens: int, n: int = N_DOCS, chance: float | None = 0.25) -> dict:
    return {
        "checkpoint": f"tokens_{tokens:012d}.safetensors",
        "step": tokens // 1000,
        "tokens": tokens,
        "task": task,
        "task_version": 1.0,
        "num_fewshot": 0,
        "requested_num_fewshot": None,
        "limit": None,
        "n_samples": n,
        "chance": chance,
        "metrics": {
            "acc": {
                "value": acc,
                "stderr": math.sqrt(acc * (1 - acc) / (n - 1)),
                "filter": "none",
                "higher_is_better": True,
            }
        },
        "lm_eval_version": "0.4.13",
    }


@pytest.fixture
def study(tmp_path: Path):
    for name, qk, optimizer, seed, rank, choice, cloze in RUNS:
        cube = synthetic_cube(name, qk_norm=qk, optimizer=optimizer, seed=seed, rank=rank)
        run = tmp_path / name
        write_cube(run / "spectra.nc", cube)
        final = int(cube.tokens.values[-1])
        evals_io.write_eval_results(
            run,
            name,
            [
                record("choice", choice - 0.1, final // 2),  # an earlier checkpoint: not the final score
                record("choice", choice, final),
                record("cloze", cloze, final, chance=None),
            ],
        )
    ds = open_cubes(sorted(tmp_path.iterdir()))
    results = [evals_io.read_eval_results(tmp_path / r[0]) for r in RUNS]
    return ds, results


def test_score_table_takes_each_runs_final_checkpoint_with_intervals(study) -> None:
    ds, results = study
    scores = evals_stats.score_table(results, ds)
    assert sorted(set(scores["label"])) == ["A2", "B1"] and scores["label"].tolist()[0] == "A2"
    assert len(scores) == len(RUNS) * 2  # two tasks at the final checkpoint, the earlier one left out
    choice = scores[scores.task == "choice"].set_index("run")
    for name, *_rest, acc, _cloze in RUNS:
        row = choice.loc[name]
        assert row["value"] == acc and row["tokens"] == row["final_tokens"]
        lo, hi, how = evals_io.score_interval(acc, None, N_DOCS, "acc")
        assert (row["ci_low"], row["ci_high"]) == (lo, hi) and how.startswith("Wilson")
    assert choice.loc["b1-s0", "chance_in_interval"] and not choice.loc["a2-s0", "chance_in_interval"]
    assert scores[scores.task == "cloze"]["chance_in_interval"].isna().all()


def test_table_d_has_a_row_per_run_and_the_difference(study) -> None:
    ds, results = study
    table = evals_stats.table_d(evals_stats.score_table(results, ds), tasks=("choice", "cloze"))
    assert table["seed"].tolist()[:4] == [0, 1, 0, 1] and table["label"].tolist()[:4] == [
        "A2",
        "A2",
        "B1",
        "B1",
    ]
    diff = table.iloc[-1]
    assert diff["config"] == "difference A2 - B1"
    assert diff["choice"] == pytest.approx(np.mean([0.40, 0.36]) - np.mean([0.26, 0.30]))
    assert diff["cloze"] == pytest.approx(np.mean([0.10, 0.12]) - np.mean([0.02, 0.04]))
    assert 0 < diff["choice_p"] < 1  # two seeds each side: Welch's test
    with pytest.raises(SpectraError, match="no acc_norm scores"):
        evals_stats.table_d(evals_stats.score_table(results, ds), tasks=("choice",), metric="acc_norm")


def test_table_d_has_no_test_where_neither_group_varies(study) -> None:
    ds, results = study
    scores = evals_stats.score_table(results, ds)
    scores.loc[scores["label"] == "A2", "value"], scores.loc[scores["label"] == "B1", "value"] = 0.3, 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diff = evals_stats.table_d(scores, tasks=("choice",)).iloc[-1]
    assert diff["choice"] == pytest.approx(0.05) and math.isnan(diff["choice_p"])


def test_rank_against_score_and_its_correlation(study) -> None:
    ds, results = study
    summaries = headline_with_null(stats.run_summaries(ds, n_resamples=200), ds)
    points = evals_stats.rank_vs_score(summaries, evals_stats.score_table(results, ds), "choice")
    assert points["run"].tolist() == [r[0] for r in RUNS]
    expected = [participation_ratio_sv(flat_spectrum(r[4], 8)) for r in RUNS]  # the PR of each run's heads
    np.testing.assert_allclose(points["pr"], expected)
    assert "fraction_of_null" in points and (points["fraction_of_null"] < 1).all()
    corr = evals_stats.rank_score_correlation(points)
    assert corr["n_runs"] == 4 and corr["n_configurations"] == 2
    assert corr["rho"] == pytest.approx(0.8)  # PR ranks 4, 3, 2, 1 against score ranks 4, 3, 1, 2
    assert "very few configurations" in corr["note"]
    few = evals_stats.rank_score_correlation(points.iloc[:2])
    assert np.isnan(few["rho"]) and "at least three" in few["note"]
    fig = pr_vs_score(points, corr)
    title = fig._suptitle.get_text().replace("\n", " ")
    assert fig.axes and "Spearman rho = 0.80, p = 0.2 over 4 runs (2 configurations)" in title


def test_results_of_a_run_not_among_the_cubes_are_refused(study, tmp_path: Path) -> None:
    ds, results = study
    stray = dict(results[0], run_dir=str(tmp_path / "elsewhere"), run_name="zz")
    with pytest.raises(SpectraError, match="not among the cubes"):
        evals_stats.score_table([stray], ds)


def test_trajectory_figure_marks_breakpoints_and_plateaus(tmp_path: Path) -> None:
    cubes = [dense_cube("A1-s0", 0, (4.5, 4.5)), dense_cube("A1-s1", 1, (4.7, 4.7))]
    ds = open_cubes([write_cube(tmp_path / c.attrs["run_name"] / "spectra.nc", c) for c in cubes])
    fig = trajectory_with_breakpoints(ds)
    top, bottom = fig.axes[0], fig.axes[1]
    assert top.get_xscale() == "log" and "loss" in bottom.get_ylabel() and "mean PR" in top.get_ylabel()
    breakpoints = [line.get_xdata()[0] for line in top.get_lines() if line.get_linestyle() == ":"]
    assert sorted(np.round(np.log10(breakpoints), 1)) == [4.5, 4.7]
    assert len(bottom.patches) >= 2  # the loss plateaus, shaded
    layer = trajectory_with_breakpoints(ds, series="1")
    assert "layer 1" in layer.axes[0].get_ylabel()
    with pytest.raises(SpectraError, match="no series"):
        trajectory_with_breakpoints(ds, series="9")


def test_the_report_modules_import_no_torch() -> None:
    code = (
        "import sys, spectra.analysis.dynamics, spectra.analysis.null, spectra.evals.results, spectra.evals.scores, "
        "spectra.figures.dynamics, spectra.figures.evals, spectra.evals.tasks; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_report_shows_rank_vs_reasoning_and_when_collapse_happens(study, tmp_path: Path) -> None:
    from spectra.report import build_report

    runs = sorted(p for p in tmp_path.iterdir() if (p / "spectra.nc").is_file())
    dense = tmp_path / "dense"
    write_cube(dense / "spectra.nc", dense_cube("dense-a1", 0, (3e5, 3e6)))
    out = tmp_path / "report"
    build_report([*runs, dense], out, n_resamples=100)
    md = (out / "report.md").read_text()
    rank = md[md.index("## Does rank predict reasoning?") : md.index("## Gamma vs importance")]
    assert "Scores per run, task and metric" in rank and "The plan's table D" in rank
    assert "difference A2 − B1" in (out / "tables" / "table_d.csv").read_text().replace("-", "−")
    assert "Spearman ρ" in rank and (out / "figures" / "pr_vs_score_choice.png").is_file()
    when = md[md.index("## When does collapse happen?") : md.index("## Spectral shape")]
    assert "the breakpoints BIC chose" in when and (out / "figures" / "trajectory_breakpoints.png").is_file()
    assert "| dense-a1 |" in when
    headline = md[md.index("## Headline") : md.index("## Comparisons")]
    assert "fraction_of_null" in headline and "null_mean" in headline


def test_without_evals_the_section_says_how_to_get_them(tmp_path: Path) -> None:
    from spectra.report import build_report

    write_cube(tmp_path / "a1" / "spectra.nc", synthetic_cube("a1"))
    build_report([tmp_path / "a1"], tmp_path / "report", n_resamples=100)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**Downstream evals: not applicable.** No run has an evals.json" in md
