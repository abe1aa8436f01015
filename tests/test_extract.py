"""Extraction end to end: cube schema and attributes, agreement with an independent numpy computation,
sites, GQA, drop_first, incremental runs, atomic writes and determinism."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import checkpoint_files, eval_ids, make_run
from safetensors.torch import load_file, save_file

from spectra.cube import CENTERINGS
from spectra.extract.run import extract
from trainer.config import ModelConfig
from trainer.model import LLM


def independent_model(path: Path) -> LLM:
    """The model of a checkpoint, rebuilt without spectra's loader."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        cfg = ModelConfig(**json.loads(f.metadata()["model_config"]))
    model = LLM(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def numpy_head_keys(
    path: Path, ids: torch.Tensor, layer: int, kv_head: int, drop_first: int = 0
) -> np.ndarray:
    """(N, D) keys of one head at the raw projection, from our own hook on k_proj, in float64 numpy."""
    model = independent_model(path)
    seen = []
    handle = model.blocks[layer].attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.numpy().copy())
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    d = model.cfg.resolved_head_dim
    k = seen[0][:, drop_first:, kv_head * d : (kv_head + 1) * d]  # (B, T', D)
    return k.reshape(-1, d).astype(np.float64)


# ----------------------------------------------------------------------------------------------------
# Kernels (spectra/svd.py)


@pytest.mark.parametrize("shape", [(5, 40, 8), (2, 3, 64, 16), (7, 7)])
def test_singular_values_match_numpy(shape):
    from spectra.extract.svd import singular_values

    x = np.random.default_rng(1).normal(size=shape)
    for centered in (False, True):
        ref_in = x - x.mean(axis=-2, keepdims=True) if centered else x
        ref = np.linalg.svd(ref_in, compute_uv=False)
        got = singular_values(torch.from_numpy(x), centered=centered).numpy()
        # a centred square matrix is singular: its last value is zero up to rounding, ~eps * sigma_1
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14 * ref.max())


@pytest.mark.parametrize("method", ["qr", "svd"])
def test_token_spectra_match_numpy_also_when_ill_conditioned(method):
    from spectra.extract.svd import token_spectra

    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 300, 16))
    x[:3] *= np.logspace(0, -6, 16)  # condition number 1e6: a Gram-matrix method would lose ~12 digits here
    x[3:] += 50.0 * rng.normal(size=(3, 1, 16))  # a mean much larger than the spread, as keys often have
    got = token_spectra(torch.from_numpy(x).float(), method=method)
    x32 = torch.from_numpy(x).float().double().numpy()  # the same float32 values, exactly
    ref_u = np.linalg.svd(x32, compute_uv=False)
    ref_c = np.linalg.svd(x32 - x32.mean(axis=-2, keepdims=True), compute_uv=False)
    # backward-stable SVDs agree to a few eps of the largest singular value of each matrix
    np.testing.assert_allclose(got.uncentered.numpy(), ref_u, rtol=1e-10, atol=1e-13 * ref_u[:, :1].max())
    for b in range(6):
        np.testing.assert_allclose(got.centered[b].numpy(), ref_c[b], rtol=1e-10, atol=1e-13 * ref_c[b, 0])
    np.testing.assert_allclose(got.energy.numpy(), (x32**2).mean(axis=-2), rtol=1e-12)
    assert got.uncentered.dtype == got.centered.dtype == got.energy.dtype == torch.float64


def test_energy_is_the_spectrum_spread_over_coordinates():
    from spectra.extract.svd import token_spectra

    x = torch.randn(4, 50, 6, dtype=torch.float64)
    before = x.clone()
    s = token_spectra(x)
    assert torch.equal(x, before)  # the input is not centred in place
    # sum_j E_j = ||X||_F^2 / N = sum_k sigma_k^2 / N
    torch.testing.assert_close(s.energy.sum(-1), s.uncentered.square().sum(-1) / 50, rtol=1e-12, atol=0)
    # ||X||^2 = ||X_c||^2 + N ||mean||^2
    mean_sq = x.mean(-2).square().sum(-1)
    torch.testing.assert_close(s.uncentered.square().sum(-1), s.centered.square().sum(-1) + 50 * mean_sq)


def test_token_spectra_refuses_fewer_tokens_than_coordinates():
    from spectra.extract.svd import token_spectra

    with pytest.raises(ValueError, match="N=3 < D=4"):
        token_spectra(torch.randn(3, 4))


def test_head_weight_singular_values_match_numpy_per_slice():
    from spectra.extract.svd import head_weight_singular_values

    w = np.random.default_rng(3).normal(size=(2, 4 * 8, 32))  # (L, H*D, d_model)
    got = head_weight_singular_values(torch.from_numpy(w), n_heads=4).numpy()
    assert got.shape == (2, 4, 8)
    for layer in range(2):
        for h in range(4):
            ref = np.linalg.svd(w[layer, h * 8 : (h + 1) * 8], compute_uv=False)
            np.testing.assert_allclose(got[layer, h], ref, rtol=1e-10)
    # a head wider than the model has rank <= d_model: the missing values are zeros
    wide = head_weight_singular_values(torch.randn(2 * 6, 4), n_heads=2)
    assert wide.shape == (2, 6) and torch.all(wide[:, 4:] == 0) and torch.all(wide[:, :4] > 0)


# ----------------------------------------------------------------------------------------------------
# The cube against independent computations


@pytest.fixture(scope="module")
def learned_cube(tmp_path_factory) -> tuple[Path, xr.Dataset]:
    run = make_run(tmp_path_factory.mktemp("learned"))
    result = extract(run, progress=False)
    with xr.open_dataset(result.path) as ds:
        return run, ds.load()


@pytest.mark.parametrize(("layer", "kv_head"), [(0, 1), (1, 0)])
def test_keys_match_an_independent_hook_and_numpy(learned_cube, layer, kv_head):
    run, ds = learned_cube
    path = checkpoint_files(run)[1]  # step 10
    keys = numpy_head_keys(path, eval_ids(run), layer, kv_head)
    assert keys.shape == (72, 8)
    ref_u = np.linalg.svd(keys, compute_uv=False)
    ref_c = np.linalg.svd(keys - keys.mean(axis=0), compute_uv=False)
    got = ds.k_sv.sel(step=10, layer=layer, kv_head=kv_head, site="proj")
    np.testing.assert_allclose(got.sel(centering="uncentered").values, ref_u, rtol=1e-10)
    np.testing.assert_allclose(got.sel(centering="centered").values, ref_c, rtol=1e-10)
    energy = ds.k_energy.sel(step=10, layer=layer, kv_head=kv_head, site="proj").values
    np.testing.assert_allclose(energy, (keys**2).mean(axis=0), rtol=1e-10)


def test_weight_spectra_and_gammas_match_the_checkpoint(learned_cube):
    run, ds = learned_cube
    state = load_file(str(checkpoint_files(run)[2]))  # step 20
    for layer in range(2):
        wk = state[f"blocks.{layer}.attn.k_proj.weight"].double().numpy()  # (Hkv*D, d_model)
        wq = state[f"blocks.{layer}.attn.q_proj.weight"].double().numpy()
        for h in range(2):
            ref = np.linalg.svd(wk[h * 8 : (h + 1) * 8], compute_uv=False)
            np.testing.assert_allclose(ds.wk_sv.sel(step=20, layer=layer, kv_head=h).values, ref, rtol=1e-10)
        for h in range(4):
            ref = np.linalg.svd(wq[h * 8 : (h + 1) * 8], compute_uv=False)
            np.testing.assert_allclose(ds.wq_sv.sel(step=20, layer=layer, head=h).values, ref, rtol=1e-10)
        gamma = state[f"blocks.{layer}.attn.k_norm.weight"].double().numpy()
        np.testing.assert_array_equal(ds.k_gamma.sel(step=20, layer=layer).values, gamma)
        assert not np.allclose(gamma, 1.0)  # the fixture perturbed it, so the test can see a mix-up


def test_cube_schema_and_attributes(learned_cube):
    run, ds = learned_cube
    assert dict(ds.sizes) == {
        "step": 3, "layer": 2, "head": 4, "kv_head": 2, "site": 4, "centering": 2, "sv": 8, "dim": 8
    }  # fmt: skip
    dims = {
        "q_sv": ("step", "layer", "head", "site", "centering", "sv"),
        "k_sv": ("step", "layer", "kv_head", "site", "centering", "sv"),
        "wq_sv": ("step", "layer", "head", "sv"),
        "wk_sv": ("step", "layer", "kv_head", "sv"),
        "q_gamma": ("step", "layer", "dim"),
        "k_gamma": ("step", "layer", "dim"),
        "q_energy": ("step", "layer", "head", "site", "dim"),
        "k_energy": ("step", "layer", "kv_head", "site", "dim"),
        "train_loss": ("step",),
        "val_loss": ("step",),
    }
    assert set(ds.data_vars) == set(dims)
    for name, expected in dims.items():
        assert ds[name].dims == expected, name
        assert ds[name].dtype == np.float64, name
        assert ds[name].attrs["long_name"] and ds[name].attrs["units"] == "1", name
    for name in ds.coords:
        assert ds[name].attrs.get("long_name"), name
    assert ds.step.values.tolist() == [0, 10, 20] and ds.tokens.values.tolist() == [0, 640, 1280]
    assert ds.site.values.tolist() == ["proj", "unit", "normed", "rope"]
    assert ds.centering.values.tolist() == list(CENTERINGS) == ["uncentered", "centered"]
    # spectra are descending and non-negative
    for name in ("q_sv", "k_sv", "wq_sv", "wk_sv"):
        assert (ds[name].diff("sv") <= 1e-12).all() and (ds[name] >= 0).all(), name
    assert np.isnan(ds.train_loss.sel(step=0)) and ds.train_loss.sel(step=20) == pytest.approx(3.8)
    assert ds.val_loss.values.tolist() == pytest.approx([4.2, 4.1, 4.0])
    a = ds.attrs
    assert (
        a["Conventions"] == "CF-1.10"
        and a["format"] == "collapse-spectra-cube"
        and a["format_version"] == "1"
    )
    assert (a["run_name"], a["qk_norm"], a["optimizer"], a["seed"], a["data"]) == (
        "test-run", "learned", "adamw", 7, "tiny-data"
    )  # fmt: skip
    assert (
        json.loads(a["model_config"])["n_kv_heads"] == 2 and json.loads(a["run_config"])["name"] == "test-run"
    )
    assert a["eval_batch_sha256"] == hashlib.sha256(eval_ids(run).numpy().tobytes()).hexdigest()
    assert a["eval_batch_shape"].tolist() == [3, 24]
    assert (a["drop_first"], a["n_tokens"], a["train_tokens"]) == (0, 72, 6400)
    assert "added steps 0, 10, 20" in a["history"] and "on cpu" in a["history"]
    assert set(json.loads(a["versions"])) >= {"torch", "numpy", "xarray", "netCDF4", "collapse"}


def test_cube_file_is_compressed_netcdf4(learned_cube):
    import netCDF4

    run, _ = learned_cube
    with netCDF4.Dataset(run / "spectra.nc") as nc:
        assert nc.data_model == "NETCDF4"
        filters = nc.variables["k_sv"].filters()
        assert filters["zlib"] and filters["complevel"] == 4


def test_sites_learned(learned_cube):
    run, ds = learned_cube
    k = ds.k_sv.sel(centering="uncentered")
    assert not np.isnan(k).any()
    # unit vectors have RMS 1 over head_dim up to the norm's eps: a token whose key has mean square ms adds
    # D ms / (ms + eps) to sum sigma^2 (= N * D without eps). The float32 unit entries are within 7 u of exact
    # (test_capture), their squares within 14 u = 8e-7: rtol 1e-6. An eps 10 times larger is 1e-4 off here.
    eps = independent_model(checkpoint_files(run)[0]).cfg.norm_eps
    for step, path in zip(ds.step.values, checkpoint_files(run)):
        for layer, kv_head in itertools.product(range(2), range(2)):
            ms = (numpy_head_keys(path, eval_ids(run), layer, kv_head) ** 2).mean(axis=1)  # (N,)
            unit = k.sel(step=step, layer=layer, kv_head=kv_head, site="unit")
            np.testing.assert_allclose((unit**2).sum("sv"), (8 * ms / (ms + eps)).sum(), rtol=1e-6)
    # RoPE rotates each token vector, so it keeps the Frobenius norm (not the spectrum: the
    # rotation angle depends on the position)
    np.testing.assert_allclose(
        (k.sel(site="rope") ** 2).sum("sv"), (k.sel(site="normed") ** 2).sum("sv"), rtol=1e-5
    )
    assert not np.allclose(k.sel(site="rope"), k.sel(site="normed"), rtol=1e-3)
    # RoPE rotates the coordinate pairs (j, j + D/2): the energy of each pair is kept, not the coordinates'
    for var in ("q_energy", "k_energy"):
        e = ds[var]
        pairs = {
            site: e.sel(site=site, dim=slice(0, 3)).values + e.sel(site=site, dim=slice(4, 7)).values
            for site in ("normed", "rope")
        }
        np.testing.assert_allclose(pairs["rope"], pairs["normed"], rtol=1e-5)
        assert not np.allclose(e.sel(site="rope"), e.sel(site="normed"), rtol=1e-3)
    # a learned gamma changes the spectrum of the unit vectors
    assert not np.allclose(k.sel(site="normed"), k.sel(site="unit"), rtol=1e-3)


def test_sites_frozen_and_none(tmp_path):
    frozen = xr.load_dataset(
        extract(make_run(tmp_path / "f", qk_norm="frozen", steps=(5,)), progress=False).path
    )
    np.testing.assert_array_equal(frozen.k_sv.sel(site="unit"), frozen.k_sv.sel(site="normed"))
    np.testing.assert_array_equal(frozen.q_sv.sel(site="unit"), frozen.q_sv.sel(site="normed"))
    assert (frozen.q_gamma == 1).all() and (frozen.k_gamma == 1).all()
    assert frozen.attrs["qk_norm"] == "frozen"

    none = xr.load_dataset(extract(make_run(tmp_path / "n", qk_norm="none", steps=(5,)), progress=False).path)
    for var in ("q_sv", "k_sv", "q_energy", "k_energy"):
        assert np.isnan(none[var].sel(site="unit")).all()
        assert not np.isnan(none[var].sel(site=["proj", "normed", "rope"])).any()
        np.testing.assert_array_equal(none[var].sel(site="normed"), none[var].sel(site="proj"))
    assert np.isnan(none.q_gamma).all() and np.isnan(none.k_gamma).all()


def test_drop_first_reduces_the_tokens(tmp_path):
    run = make_run(tmp_path, steps=(10,))
    result = extract(run, drop_first=4, progress=False)
    ds = xr.load_dataset(result.path)
    assert ds.attrs["drop_first"] == 4 and ds.attrs["n_tokens"] == 3 * (24 - 4)
    keys = numpy_head_keys(checkpoint_files(run)[0], eval_ids(run), layer=1, kv_head=1, drop_first=4)
    assert keys.shape == (60, 8)
    np.testing.assert_allclose(
        ds.k_sv.sel(step=10, layer=1, kv_head=1, site="proj", centering="centered").values,
        np.linalg.svd(keys - keys.mean(axis=0), compute_uv=False),
        rtol=1e-10,
    )


def test_explicit_batch_and_out(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    out = tmp_path / "elsewhere" / "cube.nc"
    result = extract(run / "checkpoints", batch=tmp_path / "data" / "tiny-data", out=out, progress=False)
    assert result.path == out and out.is_file() and not (run / "spectra.nc").exists()


# ----------------------------------------------------------------------------------------------------
# Incremental, atomic, deterministic


def data_only(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_attrs(deep=False)


def test_incremental_extraction_skips_and_matches_one_shot(tmp_path):
    run = make_run(tmp_path / "a", steps=(0, 10))
    first = extract(run, progress=False)
    assert (first.added, first.skipped) == ((0, 10), ())
    make_run(
        tmp_path / "a", steps=(20, 5)
    )  # new checkpoints appear, one of them earlier than the cube's last
    second = extract(run, progress=False)
    assert (second.added, second.skipped) == ((5, 20), (0, 10))
    third = extract(run, progress=False)
    assert (third.added, third.skipped) == ((), (0, 5, 10, 20))

    one_shot = extract(make_run(tmp_path / "b", steps=(0, 5, 10, 20)), progress=False)
    inc, ref = xr.load_dataset(second.path), xr.load_dataset(one_shot.path)
    assert inc.step.values.tolist() == [0, 5, 10, 20]
    xr.testing.assert_identical(data_only(inc), data_only(ref))

    def plain(attrs):
        return {k: np.asarray(v).tolist() for k, v in attrs.items() if k != "history"}

    assert plain(inc.attrs) == plain(ref.attrs)
    assert inc.attrs["history"].count("\n") == 1 and "added steps 5, 20" in inc.attrs["history"]


def test_existing_cube_of_another_setting_is_an_error(tmp_path):
    from spectra.errors import SpectraError

    run = make_run(tmp_path, steps=(0,))
    extract(run, progress=False)
    make_run(tmp_path, steps=(10,))
    with pytest.raises(SpectraError, match="drop_first"):
        extract(run, drop_first=2, progress=False)
    other = tmp_path / "other.safetensors"
    save_file({"input_ids": torch.zeros(3, 24, dtype=torch.int64)}, str(other))
    with pytest.raises(SpectraError, match="eval_batch_sha256"):
        extract(run, batch=other, force=True, progress=False)
    (tmp_path / "junk.nc").write_text("not a cube")
    with pytest.raises(SpectraError, match="junk.nc"):
        extract(run, out=tmp_path / "junk.nc", progress=False)
    assert (tmp_path / "junk.nc").read_text() == "not a cube"  # left as it was


def test_incomplete_run_config_is_an_error(tmp_path):
    from safetensors import safe_open

    from spectra.errors import SpectraError

    run = make_run(tmp_path, steps=(0,))
    path = checkpoint_files(run)[0]
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    run_config = json.loads(meta["run_config"])
    del run_config["optim"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "run_config": json.dumps(run_config)})
    with pytest.raises(SpectraError, match="run_config lacks optim") as info:
        extract(run, progress=False)
    assert str(path) in str(info.value)


def test_checkpoints_of_different_runs_are_an_error(tmp_path):
    from spectra.errors import SpectraError

    run = make_run(tmp_path, steps=(0,))
    other = make_run(tmp_path, steps=(10,), name="other-run")
    (other / "checkpoints" / "tokens_000000000640.safetensors").rename(
        run / "checkpoints" / "tokens_000000000640.safetensors"
    )
    with pytest.raises(SpectraError, match="run_name"):
        extract(run, progress=False)


def test_interrupted_write_leaves_the_old_cube(tmp_path, monkeypatch):
    run = make_run(tmp_path, steps=(0, 10))
    cube = extract(run, progress=False).path
    before = cube.read_bytes()
    make_run(tmp_path, steps=(20,))
    real = xr.Dataset.to_netcdf

    def killed_midway(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])  # half a file, then the "kill"
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        extract(run, progress=False)
    monkeypatch.undo()
    assert cube.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "spectra.nc"]  # no temporary left over
    assert xr.load_dataset(cube).step.values.tolist() == [0, 10]
    assert extract(run, progress=False).added == (20,)


def test_sigkill_during_the_write_leaves_the_old_cube(tmp_path):
    import subprocess
    import sys

    run = make_run(tmp_path, steps=(0,))
    cube = extract(run, progress=False).path
    before = cube.read_bytes()
    make_run(tmp_path, steps=(10,))
    script = f"""
import os, signal
from pathlib import Path
import xarray as xr
from spectra.extract.run import extract
real = xr.Dataset.to_netcdf
def killed(self, path, *args, **kwargs):
    real(self, path, *args, **kwargs)
    os.truncate(path, 1000)
    os.kill(os.getpid(), signal.SIGKILL)
xr.Dataset.to_netcdf = killed
extract({str(run)!r}, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert cube.read_bytes() == before
    assert xr.load_dataset(cube).step.values.tolist() == [0]
    # the killed process could not remove its temporary file; it is hidden and never read
    assert [p.name for p in run.glob(".spectra.nc.*.tmp")]


def test_a_long_extraction_keeps_its_finished_checkpoints(tmp_path, monkeypatch):
    import spectra.extract.run as extract_module

    run = make_run(tmp_path, steps=(0, 10, 20))
    real = extract_module.spectra_for_checkpoint

    def fails_at_step_20(ckpt, *args, **kwargs):
        if ckpt.step == 20:
            raise KeyboardInterrupt
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(extract_module, "_FLUSH_SECONDS", -1.0)  # flush after every checkpoint
    monkeypatch.setattr(extract_module, "spectra_for_checkpoint", fails_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        extract(run, progress=False)
    kept = xr.load_dataset(run / "spectra.nc")
    assert kept.step.values.tolist() == [0, 10] and "added steps 0, 10 " in kept.attrs["history"]
    monkeypatch.undo()
    assert extract(run, progress=False).added == (20,)


def test_extraction_is_deterministic(tmp_path):
    run = make_run(tmp_path, steps=(0, 10))
    cube = extract(run, progress=False).path
    first = cube.read_bytes()
    cube.rename(tmp_path / "first.nc")
    assert extract(run, progress=False).path.read_bytes() == first


def test_qr_r_split_over_threads_matches_one_call_and_restores_threads():
    from spectra.extract.svd import qr_r

    x = torch.randn(3, 5, 40, 6, dtype=torch.float64)
    threads = torch.get_num_threads()
    r = qr_r(x)
    assert r.shape == (3, 5, 6, 6) and torch.get_num_threads() == threads
    # R is unique up to the signs of its rows: compare R^T R = X^T X and |R|
    torch.testing.assert_close(r.mT @ r, x.mT @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.abs(), torch.linalg.qr(x, mode="r").R.abs(), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):  # raised in a worker thread, re-raised here, threads restored
        qr_r(torch.ones(4, 5, 3, dtype=torch.int64))
    assert torch.get_num_threads() == threads
