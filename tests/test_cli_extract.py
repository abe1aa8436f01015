"""``collapse-spectra extract`` through click's CliRunner: output, exit status and every bad input."""

from __future__ import annotations

import safetensors
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import checkpoint_files, make_run
from safetensors.torch import load_file, save_file

from cli.extract import extract


def invoke(*args: str):
    return CliRunner().invoke(extract, [*map(str, args), "--no-progress"])


def test_extract_then_skip(tmp_path):
    run = make_run(tmp_path, steps=(0, 10))
    result = invoke(run)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(run / "spectra.nc")
    assert lines[1] == "added steps: 0, 10" and lines[2] == "skipped steps (already in the cube): none"
    make_run(tmp_path, steps=(20,))
    result = invoke(run / "checkpoints", "--drop-first", "0")
    assert result.exit_code == 0, result.output
    assert (
        "added steps: 20" in result.output and "skipped steps (already in the cube): 0, 10" in result.output
    )
    assert xr.load_dataset(run / "spectra.nc").step.values.tolist() == [0, 10, 20]


def test_options(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    out = tmp_path / "cube.nc"
    result = invoke(
        run, "--out", out, "--batch", tmp_path / "data" / "tiny-data", "--drop-first", "3", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    ds = xr.load_dataset(out)
    assert ds.attrs["drop_first"] == 3 and ds.attrs["n_tokens"] == 3 * 21


def assert_fails(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def test_empty_or_missing_directory(tmp_path):
    assert_fails(invoke(tmp_path), "no checkpoints", str(tmp_path))
    assert_fails(invoke(tmp_path / "nowhere"), "no such file or directory", "nowhere")


def test_bad_checkpoint_files(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    good = checkpoint_files(run)[0]
    bad = run / "checkpoints" / "tokens_000000000640.safetensors"

    bad.write_bytes(good.read_bytes()[:-100])
    assert_fails(invoke(run), bad.name, "truncated")

    save_file({"w": torch.zeros(3)}, str(bad))  # a safetensors file, not ours
    assert_fails(invoke(run), bad.name, "not a collapse checkpoint")

    with safetensors.safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(good)), str(bad), metadata={**meta, "format_version": "7"})
    assert_fails(invoke(run), bad.name, "unsupported checkpoint format_version '7'")
    assert not (run / "spectra.nc").exists()  # nothing was written by any failed call


def test_wrong_batch_hash_needs_force(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    other = tmp_path / "other.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (2, 16))}, str(other))
    assert_fails(invoke(run, "--batch", other), "other.safetensors", "differs", "--force")
    result = invoke(run, "--batch", other, "--force")
    assert result.exit_code == 0, result.output
    ds = xr.load_dataset(run / "spectra.nc")
    assert (
        ds.attrs["eval_batch_shape"].tolist() == [2, 16] and "forced over the recorded" in ds.attrs["history"]
    )


def test_missing_recorded_batch_and_bad_options(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    (tmp_path / "data" / "tiny-data" / "eval_batch.safetensors").unlink()
    assert_fails(invoke(run), "eval_batch.safetensors", "--batch")
    result = invoke(run, "--device", "gpu0")  # a usage error, before anything is read
    assert result.exit_code == 2 and "'gpu0' is not a device: use auto, cpu, cuda or cuda:N" in result.output
    result = invoke(run, "--drop-first", "-1")
    assert result.exit_code == 2 and "--drop-first" in result.output
