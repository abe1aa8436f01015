"""Reading cubes: ``spectra.open_cube`` / ``open_cubes`` on synthetic cubes written to docs/cube.md's schema.

``make_cube`` and ``write_cube`` are imported by the other spectra tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import spectra
from spectra.errors import SpectraError

SITES = ["proj", "unit", "normed", "rope"]
CENTERINGS = ["uncentered", "centered"]
N_TOKENS = 24


def _random_spectra(rng: np.random.Generator, shape: tuple[int, ...], head_dim: int) -> np.ndarray:
    """Singular values of random (N_TOKENS x head_dim) matrices with decaying column scales, float64."""
    scales = np.geomspace(1.0, 0.05, head_dim)  # (D,) a collapsing spectrum, as in a trained model
    x = rng.standard_normal((*shape, N_TOKENS, head_dim)) * scales  # (..., N, D)
    return np.linalg.svd(x, compute_uv=False)  # (..., D), descending


def make_cube(
    *,
    run_name: str = "A1",
    qk_norm: str = "learned",
    optimizer: str = "muon",
    seed: int = 0,
    data: str = "bible-mix",
    steps: tuple[int, ...] = (0, 10, 20),
    tokens_per_step: int = 512,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    k_sv: np.ndarray | None = None,
    rng_seed: int = 0,
) -> xr.Dataset:
    """A cube with every variable, coordinate and global attribute of docs/cube.md.

    ``k_sv`` (step, layer, kv_head, site, centering, sv) replaces the random key spectra when given.
    """
    rng = np.random.default_rng(rng_seed)
    S, L, H, Hkv, D = len(steps), n_layers, n_heads, n_kv_heads, head_dim
    q = _random_spectra(rng, (S, L, H, len(SITES), len(CENTERINGS)), D)
    k = (
        _random_spectra(rng, (S, L, Hkv, len(SITES), len(CENTERINGS)), D)
        if k_sv is None
        else np.asarray(k_sv)
    )
    assert k.shape == (S, L, Hkv, len(SITES), len(CENTERINGS), D)
    energy_q = rng.random((S, L, H, len(SITES), D))
    energy_k = rng.random((S, L, Hkv, len(SITES), D))
    gamma = rng.random((S, L, D)) + 0.5
    if qk_norm == "none":
        q, k = q.copy(), k.copy()
        for arr in (q, k):
            arr[:, :, :, SITES.index("unit")] = np.nan
            arr[:, :, :, SITES.index("normed")] = arr[:, :, :, SITES.index("proj")]
        energy_q[:, :, :, SITES.index("unit")] = np.nan
        energy_k[:, :, :, SITES.index("unit")] = np.nan
        gamma[:] = np.nan
    act = "activation units"
    ds = xr.Dataset(
        {
            "q_sv": (
                ("step", "layer", "head", "site", "centering", "sv"),
                q,
                {"long_name": "query singular values", "units": act},
            ),
            "k_sv": (
                ("step", "layer", "kv_head", "site", "centering", "sv"),
                k,
                {"long_name": "key singular values", "units": act},
            ),
            "wq_sv": (
                ("step", "layer", "head", "sv"),
                _random_spectra(rng, (S, L, H), D),
                {"long_name": "W_q head singular values", "units": "1"},
            ),
            "wk_sv": (
                ("step", "layer", "kv_head", "sv"),
                _random_spectra(rng, (S, L, Hkv), D),
                {"long_name": "W_k head singular values", "units": "1"},
            ),
            "q_gamma": (
                ("step", "layer", "dim"),
                gamma,
                {"long_name": "QK-norm gain of the queries", "units": "1"},
            ),
            "k_gamma": (
                ("step", "layer", "dim"),
                gamma.copy(),
                {"long_name": "QK-norm gain of the keys", "units": "1"},
            ),
            "q_energy": (
                ("step", "layer", "head", "site", "dim"),
                energy_q,
                {"long_name": "mean square query coordinate", "units": "activation units2"},
            ),
            "k_energy": (
                ("step", "layer", "kv_head", "site", "dim"),
                energy_k,
                {"long_name": "mean square key coordinate", "units": "activation units2"},
            ),
            "train_loss": (
                "step",
                np.r_[np.nan, rng.random(S - 1) + 3.0],
                {"long_name": "training loss", "units": "nats/token"},
            ),
            "val_loss": (
                "step",
                rng.random(S) + 3.0,
                {"long_name": "validation loss", "units": "nats/token"},
            ),
        },  # fmt: skip
        coords={
            "step": (
                "step",
                np.asarray(steps, dtype=np.int64),
                {"long_name": "optimizer step", "units": "1"},
            ),
            "tokens": (
                "step",
                np.asarray(steps, dtype=np.int64) * tokens_per_step,
                {"long_name": "training tokens", "units": "tokens"},
            ),
            "layer": ("layer", np.arange(L), {"long_name": "transformer block", "units": "1"}),
            "head": ("head", np.arange(H), {"long_name": "query head", "units": "1"}),
            "kv_head": ("kv_head", np.arange(Hkv), {"long_name": "key/value head", "units": "1"}),
            "site": ("site", SITES, {"long_name": "read-out site", "units": "1"}),
            "centering": ("centering", CENTERINGS, {"long_name": "centring over tokens", "units": "1"}),
            "sv": ("sv", np.arange(D), {"long_name": "singular value index, descending", "units": "1"}),
            "dim": ("dim", np.arange(D), {"long_name": "coordinate within a head", "units": "1"}),
        },  # fmt: skip
        attrs={
            "Conventions": "CF-1.10",
            "title": f"attention Q/K singular-value spectra of run {run_name}",
            "history": "synthetic cube written by tests/test_cube_io.py",
            "source": "tests",
            "format": "collapse-spectra-cube",
            "format_version": 1,
            "run_name": run_name,
            "qk_norm": qk_norm,
            "optimizer": optimizer,
            "seed": seed,
            "data": data,
            "model_config": json.dumps({"n_layers": L, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D}),
            "run_config": json.dumps({"seed": seed}),
            "eval_batch_sha256": "0" * 64,
            "eval_batch_shape": np.array([2, 16]),
            "drop_first": 4,
            "n_tokens": N_TOKENS,
            "train_tokens": int(max(steps) * tokens_per_step),
            "versions": json.dumps({"numpy": np.__version__, "xarray": xr.__version__}),
        },
    )
    return ds


def write_cube(path: Path, ds: xr.Dataset) -> Path:
    """Write ``ds`` as docs/cube.md says (NetCDF4, zlib) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    ds.to_netcdf(path, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return path


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
