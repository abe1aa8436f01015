"""Cubes opened lazily (spectra.lazy, the ``dask`` extra): nothing read until computed, and every reader equal.

The metrics table, the ``metrics`` command and the report are computed on a dask-backed ``open_cubes`` result
and on the eager one, and compared exactly: the same floating-point values are read either way and reduced by
the same numpy code per block (dask's blocks run along ``step``, every reduction here is over heads, layers or
singular values, whole within a block), so equality is exact, not approximate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import make_cube, surgery_result, synthetic_cube, write_cube

import spectra
import spectra.cube
import spectra.lazy
import spectra.report.context
from spectra.analysis.summary import summary_table
from spectra.errors import SpectraError

da = pytest.importorskip("dask.array")

FACTORIAL = [
    ("A1", "muon", "learned"),
    ("A2", "muon", "none"),
    ("B1", "adamw", "learned"),
    ("B2", "adamw", "none"),
]


@pytest.fixture
def cubes(tmp_path: Path) -> list[Path]:
    """Four runs of the 2x2 plan; B2 lacks step 20 (the outer join along ``step`` fills it with NaN)."""
    return [
        write_cube(
            tmp_path / "runs" / name / "spectra.nc",
            make_cube(run_name=name, optimizer=opt, qk_norm=qk, rng_seed=i, steps=(0, 10) if name == "B2" else (0, 10, 20)),
        )
        for i, (name, opt, qk) in enumerate(FACTORIAL)
    ]  # fmt: skip


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every block read from a file by a lazily opened cube, as ``variable`` names."""
    seen: list[str] = []
    real = spectra.lazy._BlockReader.__getitem__

    def counted(self, key):
        seen.append(self.name)
        return real(self, key)

    monkeypatch.setattr(spectra.lazy._BlockReader, "__getitem__", counted)
    return seen


def without_dask(monkeypatch) -> None:
    """As if the ``dask`` extra were not installed, for spectra's choice (xarray keeps its own)."""
    monkeypatch.setattr(spectra.cube, "dask_installed", lambda: False)


def test_lazy_open_reads_nothing_until_computed_and_equals_eager(cubes, reads):
    lazy = spectra.open_cubes(cubes, lazy=True)
    assert reads == []  # opening read the metadata and the per-step numbers only
    assert isinstance(lazy.k_sv.data, da.Array) and isinstance(lazy.q_energy.data, da.Array)
    assert isinstance(lazy.tokens.data, np.ndarray) and isinstance(lazy.val_loss.data, np.ndarray)
    eager = spectra.open_cubes(cubes, lazy=False)
    assert not any(isinstance(v.data, da.Array) for v in eager.variables.values())
    xr.testing.assert_identical(lazy.compute(), eager)
    assert set(reads) >= {"k_sv", "q_sv", "wk_sv", "wq_sv"}
    assert np.isnan(eager.k_sv.sel(run="B2", step=20)).all()  # the outer join's fill, in both


def test_open_cubes_is_lazy_by_default_when_dask_is_installed(cubes, monkeypatch):
    assert isinstance(spectra.open_cubes(cubes).k_sv.data, da.Array)
    without_dask(monkeypatch)
    assert isinstance(spectra.open_cubes(cubes).k_sv.data, np.ndarray)


@pytest.mark.parametrize(
    ("metric", "var", "site"),
    [("pr_sv", "k_sv", "rope"), ("energy_rank_90", "q_sv", "unit"), ("pr_sv", "wk_sv", None)],
)
def test_metrics_are_equal_on_lazy_and_eager_cubes(cubes, metric, var, site):
    lazy = summary_table(spectra.open_cubes(cubes, lazy=True), metric, var, site)
    eager = summary_table(spectra.open_cubes(cubes, lazy=False), metric, var, site)
    assert len(eager) > 0
    pd.testing.assert_frame_equal(lazy, eager, check_exact=True)


def test_metrics_command_prints_the_same_with_and_without_dask(cubes, monkeypatch):
    from cli.spectra import main

    args = ["metrics", *map(str, cubes), "--site", "rope", "--format", "csv"]
    lazy = CliRunner().invoke(main, args)
    without_dask(monkeypatch)
    eager = CliRunner().invoke(main, args)
    assert lazy.exit_code == eager.exit_code == 0, lazy.output + eager.output
    assert lazy.output == eager.output and len(lazy.output.splitlines()) > 4


def test_a_report_loads_cubes_within_its_byte_budget_and_keeps_larger_ones_lazy(cubes, monkeypatch):
    from spectra.report.context import load_context
    from spectra.report.inputs import resolve_inputs

    runs_in, _ = resolve_inputs([c.parent for c in cubes])
    kw = dict(measurement=spectra.cube.Measurement(), gamma_site="unit", simple_data=(), complex_data=(), n_resamples=20, seed=0)  # fmt: skip
    assert isinstance(load_context(runs_in, [], **kw).ds.k_sv.data, np.ndarray)  # a few KiB: in memory
    monkeypatch.setattr(spectra.report.context, "EAGER_BYTES", 1024)
    assert isinstance(load_context(runs_in, [], **kw).ds.k_sv.data, da.Array)


@pytest.mark.slow
def test_report_is_the_same_with_and_without_dask(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764806400")  # both builds state one time, even across a minute
    a1 = write_cube(tmp_path / "runs" / "a1-s0" / "spectra.nc", synthetic_cube("a1-s0", rank=3.0)).parent
    a2 = write_cube(
        tmp_path / "runs" / "a2-s0" / "spectra.nc", synthetic_cube("a2-s0", qk_norm="none", rank=6.0)
    ).parent
    surgery_result("a1-s0").to_netcdf(a1 / "surgery.nc")
    from spectra import report

    with monkeypatch.context() as m:
        m.setattr(spectra.report.context, "EAGER_BYTES", 0)  # lazy, however small the cubes
        report.build_report([a1, a2], tmp_path / "lazy", n_resamples=50)
    without_dask(monkeypatch)
    report.build_report([a1, a2], tmp_path / "eager", n_resamples=50)
    tables = sorted(p.relative_to(tmp_path / "eager") for p in (tmp_path / "eager" / "tables").iterdir())
    assert tables and tables == sorted(
        p.relative_to(tmp_path / "lazy") for p in (tmp_path / "lazy" / "tables").iterdir()
    )
    for name in [*tables, Path("report.md")]:
        lazy_text = (tmp_path / "lazy" / name).read_text().replace(str(tmp_path / "lazy"), "OUT")
        assert lazy_text == (tmp_path / "eager" / name).read_text().replace(str(tmp_path / "eager"), "OUT"), (
            name
        )


def test_a_damaged_file_is_one_line_naming_it_when_computed(cubes):
    lazy = spectra.open_cubes(cubes, lazy=True)
    cubes[1].write_bytes(b"not NetCDF any more")  # replaced after opening: found when its blocks are read
    with pytest.raises(SpectraError, match="not a readable NetCDF file") as info:
        lazy.k_sv.sum().compute()
    assert str(cubes[1]) in str(info.value) and "\n" not in str(info.value)
