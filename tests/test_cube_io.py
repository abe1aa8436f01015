"""Reading cubes: ``spectra.open_cube`` / ``open_cubes`` on synthetic cubes written to docs/cube.md's schema.

The cubes come from ``helpers.make_cube`` (random spectra, every variable and attribute of the schema).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from helpers import make_cube, write_cube

import spectra
from spectra.errors import SpectraError

# --------------------------------------------------------------------------------------------------------
# open_cube
# --------------------------------------------------------------------------------------------------------


def test_open_cube_round_trips_file_and_run_directory(tmp_path: Path) -> None:
    cube = make_cube()
    path = write_cube(tmp_path / "runs" / "A1" / "spectra.nc", cube)
    for target in (path, path.parent, str(path)):
        ds = spectra.open_cube(target)
        xr.testing.assert_identical(ds.drop_attrs(deep=False), cube.drop_attrs(deep=False))
        assert ds.attrs["run_name"] == "A1" and int(ds.attrs["format_version"]) == 1
        assert ds.k_sv.dtype == np.float64
    # loaded into memory and closed: the file can be replaced while the Dataset is in use
    path.unlink()
    assert float(ds.k_sv.sum()) == pytest.approx(float(cube.k_sv.sum()))


def _text_file(d: Path) -> Path:
    (d / "text.nc").write_text("not netcdf")
    return d / "text.nc"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.nc", "no such cube file"),
        (lambda d: d, "no spectra.nc in this directory"),
        (_text_file, "not a readable NetCDF file"),
        (
            lambda d: write_cube(d / "plain.nc", xr.Dataset({"x": ("a", [1.0])}, attrs={"format": "other"})),
            "not a spectra cube",
        ),
        (
            lambda d: write_cube(d / "future.nc", make_cube().assign_attrs(format_version=2)),
            "format_version 2 is not readable",
        ),
    ],
)
def test_open_cube_errors_name_the_file(tmp_path: Path, make, message: str) -> None:
    target = make(tmp_path)
    with pytest.raises(SpectraError, match=re.escape(message)) as info:
        spectra.open_cube(target)
    assert str(target) in str(info.value)


# --------------------------------------------------------------------------------------------------------
# open_cubes
# --------------------------------------------------------------------------------------------------------

FACTORIAL = [  # the 2x2 of the experiment plan: optimizer x QK-norm
    ("A1", "muon", "learned"),
    ("A2", "muon", "none"),
    ("B1", "adamw", "learned"),
    ("B2", "adamw", "none"),
]


def write_factorial(root: Path, **kwargs) -> list[Path]:
    return [
        write_cube(
            root / name / "spectra.nc",
            make_cube(run_name=name, optimizer=opt, qk_norm=qk, rng_seed=i, **kwargs),
        )
        for i, (name, opt, qk) in enumerate(FACTORIAL)
    ]


def test_open_cubes_stacks_runs_with_metadata_coordinates(tmp_path: Path) -> None:
    paths = write_factorial(tmp_path / "runs")
    ds = spectra.open_cubes(paths)
    assert ds.sizes["run"] == 4
    assert ds["run"].values.tolist() == ["A1", "A2", "B1", "B2"]
    assert ds["optimizer"].dims == ("run",)
    assert ds["optimizer"].values.tolist() == ["muon", "muon", "adamw", "adamw"]
    assert ds["qk_norm"].values.tolist() == ["learned", "none", "learned", "none"]
    assert ds["seed"].values.tolist() == [0, 0, 0, 0]
    assert ds["path"].values.tolist() == [str(p) for p in paths]
    assert ds.k_sv.dims == ("run", "step", "layer", "kv_head", "site", "centering", "sv")
    assert ds["tokens"].dims == ("run", "step")
    assert (
        ds.attrs["format"] == "collapse-spectra-cube" and "run_name" not in ds.attrs
    )  # differs between runs
    for i, path in enumerate(paths):
        one = spectra.open_cube(path)
        np.testing.assert_array_equal(ds.k_sv.isel(run=i).values, one.k_sv.values)
        np.testing.assert_array_equal(ds.tokens.isel(run=i).values, one.tokens.values)


def test_open_cubes_groupby_optimizer_mean(tmp_path: Path) -> None:
    ds = spectra.open_cubes(write_factorial(tmp_path / "runs"))
    pr = ds.k_sv.sel(site="rope", centering="uncentered").spectra.participation_ratio()
    by_optimizer = pr.mean(["layer", "kv_head"]).groupby("optimizer").mean()
    assert sorted(by_optimizer["optimizer"].values.tolist()) == ["adamw", "muon"]
    expected_muon = pr.sel(run=["A1", "A2"]).mean(["run", "layer", "kv_head"])
    np.testing.assert_allclose(by_optimizer.sel(optimizer="muon").values, expected_muon.values, rtol=1e-12)
    # the whole Dataset groups too
    assert ds.groupby("optimizer").mean().sizes["optimizer"] == 2


def test_open_cubes_outer_joins_steps_and_keeps_per_run_tokens(tmp_path: Path) -> None:
    a = write_cube(
        tmp_path / "a" / "spectra.nc", make_cube(run_name="a", steps=(0, 10, 20), tokens_per_step=512)
    )
    b = write_cube(
        tmp_path / "b" / "spectra.nc", make_cube(run_name="b", steps=(0, 20, 30), tokens_per_step=256)
    )
    ds = spectra.open_cubes([a, b])
    assert ds["step"].values.tolist() == [0, 10, 20, 30]
    np.testing.assert_array_equal(ds.tokens.sel(run="a").values, [0, 5120, 10240, np.nan])
    np.testing.assert_array_equal(ds.tokens.sel(run="b").values, [0, np.nan, 5120, 7680])
    assert ds.tokens.dtype == np.float64 and ds.tokens.attrs["units"] == "tokens"
    assert np.isnan(ds.k_sv.sel(run="a", step=30)).all()
    assert np.isnan(ds.k_sv.sel(run="b", step=10)).all()
    assert not np.isnan(ds.k_sv.sel(run="b", step=30, site="proj")).any()
    # the encodings of the first file (int64 tokens) are dropped, so the combination can be written
    out = tmp_path / "combined.nc"
    ds.to_netcdf(out, engine="netcdf4")
    np.testing.assert_array_equal(xr.load_dataset(out).tokens.values, ds.tokens.values)


def test_open_cubes_keeps_each_runs_n_tokens_as_a_run_coordinate(tmp_path: Path) -> None:
    a, b = make_cube(run_name="a"), make_cube(run_name="b")
    b.attrs["n_tokens"] = 4096
    ds = spectra.open_cubes([write_cube(tmp_path / n / "spectra.nc", c) for n, c in (("a", a), ("b", b))])
    assert ds["n_tokens"].dims == ("run",) and ds["n_tokens"].values.tolist() == [a.attrs["n_tokens"], 4096]
    assert "n_tokens" not in ds.attrs  # differs between the runs: only the coordinate says it
    del b.attrs["n_tokens"]
    with pytest.raises(SpectraError, match="n_tokens = None is not an integer"):
        spectra.open_cubes([write_cube(tmp_path / "c" / "spectra.nc", b)])


def test_open_cubes_makes_shared_run_names_unique(tmp_path: Path) -> None:
    same_seed = [
        write_cube(tmp_path / d / "spectra.nc", make_cube(run_name="A1", seed=0)) for d in ("x", "y")
    ]
    ds = spectra.open_cubes(same_seed)
    assert ds["run"].values.tolist() == ["x/A1-seed0", "y/A1-seed0"]
    seeds = [write_cube(tmp_path / f"s{s}" / "spectra.nc", make_cube(run_name="A1", seed=s)) for s in (0, 1)]
    assert spectra.open_cubes(seeds)["run"].values.tolist() == ["A1-seed0", "A1-seed1"]


def test_open_cubes_accepts_a_directory_of_runs_and_a_single_path(tmp_path: Path) -> None:
    write_factorial(tmp_path / "runs")
    assert spectra.open_cubes(tmp_path / "runs")["run"].values.tolist() == ["A1", "A2", "B1", "B2"]
    assert spectra.open_cubes(str(tmp_path / "runs" / "B1"))["run"].values.tolist() == ["B1"]


def test_open_cubes_errors(tmp_path: Path) -> None:
    a = write_cube(tmp_path / "a" / "spectra.nc", make_cube(run_name="a"))
    with pytest.raises(SpectraError, match="more than once"):
        spectra.open_cubes([a, a.parent])
    with pytest.raises(SpectraError, match="no cubes given"):
        spectra.open_cubes([])
    wide = write_cube(tmp_path / "w" / "spectra.nc", make_cube(run_name="w", head_dim=16))
    with pytest.raises(SpectraError, match="different head dimensions") as info:
        spectra.open_cubes([a, wide])
    assert str(wide) in str(info.value)
    with pytest.raises(SpectraError, match="missing.nc"):
        spectra.open_cubes([a, tmp_path / "missing.nc"])
    no_seed = make_cube(run_name="n")
    del no_seed.attrs["seed"]
    bad = write_cube(tmp_path / "n" / "spectra.nc", no_seed)
    with pytest.raises(SpectraError, match="'seed' is missing") as info:
        spectra.open_cubes([a, bad])
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------------------------------------
# docs/notebook.md runs as written
# --------------------------------------------------------------------------------------------------------

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"


def test_notebook_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of docs/notebook.md, in order, against the runs it names."""
    pytest.importorskip("seaborn")
    import matplotlib

    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", NOTEBOOK.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4
    runs = tmp_path / "runs"
    for i, (name, opt, qk) in enumerate(FACTORIAL):
        for seed in (0, 1):
            write_cube(
                runs / f"{name}-s{seed}" / "spectra.nc",
                make_cube(
                    run_name=f"{name}-s{seed}", optimizer=opt, qk_norm=qk, seed=seed, rng_seed=10 * i + seed
                ),
            )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(NOTEBOOK), "exec"), namespace)  # noqa: S102
    assert (tmp_path / "figures" / "pr_vs_tokens.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close("all")
