"""``collapse-spectra extract`` through click's CliRunner: output, exit status and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
import xarray as xr
from click.testing import CliRunner
from helpers import checkpoint_files, make_run
from safetensors.torch import load_file, save_file

from cli.spectra.extract import extract


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


def test_bad_checkpoint_files_are_named_and_the_good_ones_extracted(tmp_path):
    run = make_run(tmp_path, steps=(0, 20))
    good = checkpoint_files(run)[0]
    bad = run / "checkpoints" / "tokens_000000000640.safetensors"  # step 10, between the good ones

    bad.write_bytes(good.read_bytes()[:-100])
    result = invoke(run)
    assert_fails(result, bad.name, "truncated", "1 checkpoint(s) could not be read", "added: 0, 20")
    assert len(result.output.strip().splitlines()) == 1 and result.output.count(bad.name) == 1
    assert xr.load_dataset(run / "spectra.nc").step.values.tolist() == [0, 20]

    save_file({"w": torch.zeros(3)}, str(bad))  # a safetensors file, not ours
    assert_fails(invoke(run), bad.name, "not a collapse checkpoint", "added: none")

    with safetensors.safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(good)), str(bad), metadata={**meta, "format_version": "7"})
    assert_fails(invoke(run), bad.name, "unsupported checkpoint format_version '7'")

    tensors = load_file(str(good))
    tensors.pop("norm.weight")  # a header that reads well over tensors that do not fit it
    save_file(tensors, str(bad), metadata={**meta, "step": "10", "tokens": "640"})
    assert_fails(invoke(run), bad.name, "tensors do not fit the model")

    bad.unlink()  # what the message says to do: the run is then complete and the command succeeds
    assert invoke(run).exit_code == 0
    assert xr.load_dataset(run / "spectra.nc").step.values.tolist() == [0, 20]


def test_a_run_of_only_bad_checkpoints_writes_nothing(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    good = checkpoint_files(run)[0]
    good.write_bytes(good.read_bytes()[:-100])
    assert_fails(invoke(run), good.name, "truncated")
    assert not (run / "spectra.nc").exists()


def with_model_field(path: Path, field: str, value, where: tuple[str, ...]) -> None:
    """Rewrite a checkpoint's header with the model field changed in ``model_config`` and/or ``run_config``."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if "model_config" in where:
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), field: value})
    if "run_config" in where:
        run_config = json.loads(meta["run_config"])
        run_config["model"][field] = value
        meta["run_config"] = json.dumps(run_config)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_a_checkpoint_of_another_model_is_refused_naming_it_and_the_field(tmp_path):
    run = make_run(tmp_path, steps=(0, 10, 20))
    odd = checkpoint_files(run)[-1]

    # what the issue found accepted silently: the run config the cube records says another rope_theta
    with_model_field(odd, "rope_theta", 500000.0, ("run_config",))
    assert_fails(
        invoke(run), f"{odd}: the metadata contradicts itself: model_config.rope_theta = 10000.0 but "
        "run_config.model.rope_theta = 500000.0"
    )  # fmt: skip
    assert not (run / "spectra.nc").exists()  # refused before anything was computed

    # said consistently in both places: then it is another model than the run's other checkpoints
    with_model_field(odd, "rope_theta", 500000.0, ("model_config",))
    first = checkpoint_files(run)[0].name
    assert_fails(
        invoke(run),
        f"{odd}: its model_config differs from {first}'s (rope_theta: 500000.0 here, 10000.0 in {first})",
    )
    assert not (run / "spectra.nc").exists()

    # and another model than the cube was computed for, when it is extracted on its own
    assert invoke(checkpoint_files(run)[0]).exit_code == 0
    cube = run / "spectra.nc"
    before = cube.read_bytes()
    assert_fails(
        invoke(odd), f"{odd}: its model_config differs from the one the cube {cube} was computed for "
        "(rope_theta: 500000.0 here, 10000.0 in the cube)"
    )  # fmt: skip
    assert cube.read_bytes() == before


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
