"""spectra reads a study directory by its file format (docs/studies.md): its runs, labels, sweep; extract
STUDY_DIR in parallel; the report labels runs by the study and adds the learning-rate section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_run, synthetic_cube, write_cube

from cli.spectra import main
from spectra import report as rep
from spectra.analysis import plan, stats
from spectra.cube import find_cubes, open_cubes
from spectra.errors import SpectraError
from spectra.report.context import with_study_labels
from spectra.study import read_study

pytestmark = pytest.mark.usefixtures("one_thread")

# the 300M plan's configuration names, which are not the plan's A1 ... C2
CONFIGS = [
    ("muon-qk", "learned", "muon", 0.02),
    ("muon-noqk", "none", "muon", 0.02),
    ("adamw-qk", "learned", "adamw", 0.003),
]


def _lrs(optimizer: str, base: float, m: float) -> dict:
    return {"muon_lr": base * m, "lr": 0.003 * m} if optimizer == "muon" else {"lr": base * m}


def write_study(root: Path, seeds=(0, 1), make=None) -> Path:
    """A study directory as `collapse-train study` writes it: study.json, sweep.json, runs/, sweep/.

    ``make(run_dir, name, qk_norm, optimizer, seed)`` creates each main run's directory (default: a
    synthetic cube only).
    """
    root.mkdir(parents=True)
    configurations, runs, table = [], [], []
    for label, qk, opt, base in CONFIGS:
        for m in (0.5, 1.0, 2.0):
            name = f"{label}-x{m:g}"
            loss = {0.5: 5.2, 1.0: 5.0, 2.0: 5.1}[m] + (0.1 if opt == "adamw" else 0.0)
            diverged = opt == "adamw" and m == 2.0
            runs.append({"name": name, "phase": "sweep", "label": label, "description": "", "qk_norm": qk,
                         "optimizer": opt, "data_class": "standard", "data_dir": "/data/x", "seed": 100,
                         "tokens": 1000, "lrs": _lrs(opt, base, m), "multiplier": m,
                         "run_dir": f"sweep/{name}", "log": f"logs/sweep/{name}.log"})  # fmt: skip
            table.append({"label": label, "run": name, "run_dir": f"sweep/{name}", "multiplier": m,
                          "lrs": _lrs(opt, base, m), "final_val_loss": None if diverged else loss,
                          "status": "diverged" if diverged else "completed", "chosen": m == 1.0,
                          "reason": "lowest final validation loss" if m == 1.0 else ""})  # fmt: skip
        choice = {"status": "chosen", "reason": "lowest final validation loss (5)", "run": f"{label}-x1",
                  "multiplier": 1.0, "lrs": _lrs(opt, base, 1.0), "val_loss": 5.0}  # fmt: skip
        configurations.append({"label": label, "description": f"{opt} {qk}", "qk_norm": qk, "optimizer": opt,
                               "data_class": "standard", "data_dir": "/data/x", "sweep": True, "choice": choice})  # fmt: skip
    for label, qk, opt, base in CONFIGS:
        for seed in seeds:
            name = f"{label}-s{seed}"
            runs.append({"name": name, "phase": "main", "label": label, "description": "", "qk_norm": qk,
                         "optimizer": opt, "data_class": "standard", "data_dir": "/data/x", "seed": seed,
                         "tokens": 1000, "lrs": _lrs(opt, base, 1.0), "multiplier": 1.0,
                         "run_dir": f"runs/{name}", "log": f"logs/runs/{name}.log"})  # fmt: skip
            if make is None:
                rank = {"muon-qk": 4.0, "muon-noqk": 6.0, "adamw-qk": 3.0}[label] + 0.1 * seed
                cube = synthetic_cube(name, qk_norm=qk, optimizer=opt, seed=seed, data="my-corpus", rank=rank)
                write_cube(root / "runs" / name / "spectra.nc", cube)
            else:
                make(root / "runs", name, qk, opt, seed)
    manifest = {"format": "collapse-study", "format_version": 1, "name": "mini", "description": "",
                "configurations": configurations, "runs": runs, "seeds": list(seeds)}  # fmt: skip
    (root / "study.json").write_text(json.dumps(manifest))
    sweep = {"format": "collapse-sweep", "format_version": 1, "study": "mini", "table": table,
             "configurations": {c["label"]: c["choice"] for c in configurations}}  # fmt: skip
    (root / "sweep.json").write_text(json.dumps(sweep))
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("s") / "study")


def test_read_study_and_its_tables(study):
    s = read_study(study)
    main = s.runs("main")
    assert list(main["name"]) == [
        "muon-qk-s0",
        "muon-qk-s1",
        "muon-noqk-s0",
        "muon-noqk-s1",
        "adamw-qk-s0",
        "adamw-qk-s1",
    ]
    assert s.run_dirs("main")[0] == (study / "runs" / "muon-qk-s0").resolve()
    table = s.sweep_table()
    assert len(table) == 9 and table["chosen"].sum() == 3
    assert np.isnan(table.set_index("run").loc["adamw-qk-x2", "final_val_loss"])
    assert list(s.configurations()["status"]) == ["chosen"] * 3


def test_a_foreign_or_newer_study_file_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "study.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SpectraError, match="not a collapse-study file"):
        read_study(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "study.json").write_text(json.dumps({"format": "collapse-study", "format_version": 9}))
    with pytest.raises(SpectraError, match="format_version 9 is not readable here"):
        read_study(tmp_path / "b")
    with pytest.raises(SpectraError, match="not a study directory"):
        read_study(tmp_path)


def test_find_cubes_reads_a_study_and_skips_untrained_runs(tmp_path):
    root = write_study(tmp_path / "study")
    (root / "runs" / "adamw-qk-s1" / "spectra.nc").unlink()
    files, skipped = find_cubes([root])
    assert [f.parent.name for f in files] == [
        "muon-qk-s0",
        "muon-qk-s1",
        "muon-noqk-s0",
        "muon-noqk-s1",
        "adamw-qk-s0",
    ]
    assert [(p.name, why) for p, why in skipped] == [
        (
            "adamw-qk-s1",
            f"no spectra.nc (run `collapse-spectra extract {(root / 'runs' / 'adamw-qk-s1').resolve()}`)",
        )
    ]


def test_the_studys_labels_replace_the_guess_and_map_onto_the_plans_pairs(study):
    ds = with_study_labels(open_cubes([study]), [read_study(study)])
    runs = plan.run_table(ds)
    assert list(runs["label"]) == ["muon-qk"] * 2 + ["muon-noqk"] * 2 + ["adamw-qk"] * 2
    assert list(runs["plan_cell"]) == ["A1"] * 2 + ["A2"] * 2 + ["B1"] * 2
    summaries = stats.run_summaries(ds, n_resamples=100)
    comparisons = stats.compare_configurations(summaries, n_resamples=100).set_index("pair")
    row = comparisons.loc["muon-qk vs muon-noqk"]
    assert (
        row["n_a"] == 2 and row["n_b"] == 2 and row["diff"] == pytest.approx(-2.0, abs=0.2)
    )  # seeds replicate
    assert "the plan's A1 vs A2" in row["question"]
    assert "muon-qk vs adamw-qk" in comparisons.index


def test_report_on_a_study_has_its_labels_and_a_learning_rate_section(study, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(study), "-o", str(out), "--n-resamples", "100"])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "## Learning rates" in md and "Best LR / Sweep val loss" in md
    assert "| muon-qk |" in md and "| muon-qk vs muon-noqk |" in md
    assert (out / "figures" / "lr_sweep_mini.png").is_file()
    best = (out / "tables" / "best_lr_mini.csv").read_text().splitlines()
    assert best[0].startswith(
        "configuration,description,optimizer,best muon_lr,best lr (AdamW),multiplier,sweep val loss"
    )
    assert best[1].startswith("muon-qk,muon learned,muon,0.02,0.003,1.0,5.0")
    assert "muon-qk-s0" in md and "C1" in md  # the plan's missing cells are still said to be missing


def test_the_lr_figure_marks_the_choice_and_the_diverged_run(study):
    from spectra.figures import sweep as plots_sweep

    s = read_study(study)
    fig = plots_sweep.lr_sweep(s.sweep_table(), s.configurations(), s.name)
    ax = fig.axes[0]
    stars = [c for c in ax.collections if len(c.get_offsets()) and c.get_paths()]
    chosen = np.concatenate([c.get_offsets() for c in stars if c.get_sizes()[0] == 160])
    assert sorted(chosen[:, 0].round(4).tolist()) == [0.003, 0.02, 0.02]  # each configuration's x1 point
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "diverged (drawn at the top edge)" in legend and "no interval" in fig._suptitle.get_text()


def test_extract_a_study_in_parallel(tmp_path):
    def make(runs_root: Path, name: str, qk: str, opt: str, seed: int) -> None:
        make_run(runs_root, qk_norm=qk, steps=(0, 10), name=name)

    root = write_study(tmp_path / "study", seeds=(0,), make=make)
    result = CliRunner().invoke(main, ["extract", str(root), "--jobs", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = sorted(result.output.strip().splitlines())
    assert len(lines) == 3 and all(
        line.startswith("extracted ") and "added 2 step(s)" in line for line in lines
    )
    for name in ("muon-qk-s0", "muon-noqk-s0", "adamw-qk-s0"):
        assert (root / "runs" / name / "spectra.nc").is_file()
    again = CliRunner().invoke(main, ["extract", str(root), "--no-progress"])
    assert again.exit_code == 0 and again.output.count("added 0 step(s), 2 already in the cube") == 3
    usage = CliRunner().invoke(main, ["extract", str(root), "--out", str(tmp_path / "x.nc")])
    assert usage.exit_code == 2 and "apply to one run" in usage.output


def test_report_inputs_accept_a_study(study):
    runs, skipped = rep.resolve_inputs([study])
    assert len(runs) == 6 and skipped == []
