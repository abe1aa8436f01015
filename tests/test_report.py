"""The report (spectra.report) and the plot/report commands (cli.spectra.analysis), through click's CliRunner."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import surgery_result, synthetic_cube, write_cube

from cli.spectra.analysis import plot, report
from spectra import report as rep
from spectra.analysis import stats
from spectra.errors import SpectraError


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    a1 = write_cube(
        root / "a1-s0" / "spectra.nc", synthetic_cube("a1-s0", rank=np.array([7.0, 5.0, 4.0])[:, None, None])
    ).parent
    a2 = write_cube(root / "a2-s0" / "spectra.nc", synthetic_cube("a2-s0", qk_norm="none", rank=6.0)).parent
    surgery_result("a1-s0").to_netcdf(a1 / "surgery.nc")
    return [a1, a2]


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory) -> Path:
    """The report over A1 and A2 (one seed each), written through the command line."""
    out = tmp_path_factory.mktemp("report") / "report"
    result = CliRunner().invoke(report, [*map(str, runs), "-o", str(out), "--n-resamples", "200"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html")
    return out


def test_report_writes_html_markdown_figures_and_tables(built):
    assert (built / "report.html").is_file() and (built / "report.md").is_file()
    figures = sorted(p.name for p in (built / "figures").iterdir())
    for stem in (
        "trajectory",
        "heatmap_a1-s0",
        "heatmap_a2-s0",
        "waterfall",
        "loss",
        "pr_vs_loss",
        "gamma_scatter",
        "surgery",
    ):
        assert f"{stem}.png" in figures and f"{stem}.svg" in figures
    assert "data_complexity.png" not in figures  # no C1/C2 pair: a sentence instead
    assert (built / "tables" / "sensitivity.csv").is_file()


def test_markdown_references_only_files_that_exist(built):
    md = (built / "report.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", md)
    assert len(targets) >= 16  # figures (png + svg) and tables
    for target in targets:
        assert not re.match(r"[a-z]+://", target), target
        assert (built / target).is_file(), target


def test_html_is_self_contained(built):
    page = (built / "report.html").read_text()
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    links = re.findall(r'\shref="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(h.startswith("#") for h in links)
    assert "<link" not in page and "<script" not in page and "url(" not in page and "@import" not in page
    assert len(sources) == len(re.findall(r"\]\(figures/[^)]+\.png\)", (built / "report.md").read_text()))


def test_report_content(built):
    md = (built / "report.md").read_text()
    for heading in (
        "## Caveats",
        "## Runs and the plan's matrix",
        "## Headline: mean key PR at the final checkpoint",
        "## Comparisons between configurations",
        "## Sensitivity to the measurement",
        "## Gamma vs importance",
        "## Pruning surgery",
        "## Provenance",
    ):
        assert heading in md
    assert stats.ONE_SEED_SENTENCE in md  # one seed per configuration, said plainly
    assert "**Data-complexity figure: not applicable.**" in md and "missing: C1, C2" in md
    assert (
        "| A1 vs A2 |" in md
        and "| B1 | learned | adamw | standard | isolates the Muon effect | missing |" in md
    )
    assert "PR (sv convention)" in md and "PR (eig convention)" in md
    assert "no QK-norm" in md  # the gamma table reports A2 as such
    assert "0" * 64 in md  # the eval batch hash, in the provenance
    sensitivity = (built / "tables" / "sensitivity.csv").read_text().splitlines()
    assert sensitivity[0] == "site,convention,centering,A1 vs A2" and len(sensitivity) == 17
    manifest = json.loads((built / "report-files.json").read_text())["files"]
    assert "report.html" in manifest and "figures/trajectory.svg" in manifest


@pytest.mark.slow
def test_rerun_replaces_only_the_reports_own_files(built, runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built, out)  # a report over both runs
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "my_plot.png").write_bytes(b"mine")
    rep.build_report(runs[:1], out, n_resamples=100)
    assert not (out / "figures" / "heatmap_a2-s0.png").exists()  # stale: the run is gone
    assert (out / "figures" / "heatmap_a1-s0.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "figures" / "my_plot.png").read_bytes() == b"mine"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_report_date_follows_source_date_epoch(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764806400")
    rep.build_report(runs[:1], tmp_path / "fixed", n_resamples=20)
    assert "Generated 2025-12-04 00:00 UTC by collapse" in (tmp_path / "fixed" / "report.md").read_text()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(SpectraError, match="SOURCE_DATE_EPOCH='yesterday'"):
        rep.build_report(runs[:1], tmp_path / "bad", n_resamples=20)
    assert not (tmp_path / "bad").exists()  # refused before anything was created


def test_resolve_inputs(runs, tmp_path):
    by_dir, skipped = rep.resolve_inputs([runs[0]])
    assert by_dir == [rep.RunInput(runs[0] / "spectra.nc", runs[0] / "surgery.nc")] and skipped == []
    parent, _ = rep.resolve_inputs([runs[0].parent])
    assert [r.cube.parent.name for r in parent] == ["a1-s0", "a2-s0"]
    # a cube file picks up a surgery.nc beside it only if it is the same run's
    shared = tmp_path / "cubes"
    cube = write_cube(shared / "other.nc", synthetic_cube("other"))
    surgery_result("a1-s0").to_netcdf(shared / "surgery.nc")
    assert rep.resolve_inputs([cube]) == ([rep.RunInput(cube, None)], [])
    with pytest.raises(SpectraError, match="no such cube file or run directory"):
        rep.resolve_inputs([tmp_path / "missing"])
    with pytest.raises(SpectraError, match="neither a run directory"):
        rep.resolve_inputs([tmp_path / "cubes"])
    with pytest.raises(SpectraError, match="more than once"):
        rep.resolve_inputs([runs[0], runs[0] / "spectra.nc"])


def test_report_into_a_file_is_an_error(runs, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SpectraError, match="is not a directory"):
        rep.build_report(runs, target)


def test_plot_command_writes_png_and_svg(runs, tmp_path):
    out = tmp_path / "traj.png"
    result = CliRunner().invoke(
        plot, ["trajectory", *map(str, runs), "-o", str(out), "--site", "rope", "--convention", "eig"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(out), str(tmp_path / "traj.svg")]
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_command_surgery_and_heatmap(runs, tmp_path):
    result = CliRunner().invoke(plot, ["surgery", str(runs[0]), "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        plot, ["heatmap", *map(str, runs), "--run", "a2-s0", "-o", str(tmp_path / "h")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h.png").is_file() and (tmp_path / "h.svg").is_file()


def test_plot_command_errors_are_one_line_and_exit_1(runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(plot, ["data-complexity", *map(str, runs), "-o", str(tmp_path / "d.png")])
    assert result.exit_code == 1 and "needs runs of C1" in result.output
    assert not (tmp_path / "d.png").exists()
    result = runner.invoke(plot, ["trajectory", str(runs[0]), "--layer", "1", "-o", str(tmp_path / "t.png")])
    assert result.exit_code == 1 and "--layer does not apply to the trajectory figure" in result.output
    result = runner.invoke(plot, ["gamma", str(runs[0]), "--site", "rope", "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 1 and "gamma analysis site must be one of" in result.output
    result = runner.invoke(plot, ["surgery", str(runs[1]), "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 1 and "no such surgery file" in result.output
