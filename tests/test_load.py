"""Loading checkpoints and the eval batch: the happy paths and every bad input, named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from helpers import checkpoint_files, eval_ids, make_run
from safetensors.torch import load_file, save_file

from spectra.errors import SpectraError
from spectra.extract.load import (
    Checkpoint,
    eval_batch_sha256,
    load_checkpoint,
    load_eval_batch,
    read_metadata,
    resolve_device,
)
from spectra.rundir import find_checkpoints, run_dir_of
from trainer.model import LLM


def rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes: str) -> Path:
    """Copy a checkpoint with its header metadata changed."""
    with safetensors.safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    for key in drop:
        meta.pop(key)
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("load"), steps=(0, 10))


def test_find_checkpoints_accepts_run_dir_checkpoints_dir_and_file(run):
    files = checkpoint_files(run)
    assert find_checkpoints(run) == files
    assert find_checkpoints(run / "checkpoints") == files
    assert find_checkpoints(files[1]) == [files[1]]
    assert run_dir_of(run) == run_dir_of(run / "checkpoints") == run_dir_of(files[0]) == run


def test_find_checkpoints_sorts_by_tokens_and_ignores_other_files(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in [
        "tokens_000000100000.safetensors",
        "tokens_000000020000.safetensors",
        ".tokens_000000300000.safetensors.x1y2.tmp",  # a checkpoint being written
        "tokens_1000.safetensors",  # not 12 digits
        "notes.txt",
    ]:
        (ckpts / name).write_bytes(b"")
    assert [p.name for p in find_checkpoints(tmp_path)] == [
        "tokens_000000020000.safetensors",
        "tokens_000000100000.safetensors",
    ]


def test_find_checkpoints_errors(tmp_path):
    with pytest.raises(SpectraError, match="no checkpoints") as info:
        find_checkpoints(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(SpectraError, match="missing"):
        find_checkpoints(tmp_path / "missing")


def test_load_checkpoint_rebuilds_the_model(run):
    path = checkpoint_files(run)[1]
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and isinstance(ckpt.model, LLM) and not ckpt.model.training
    assert (ckpt.step, ckpt.tokens, ckpt.run_name, ckpt.qk_norm) == (10, 640, "test-run", "learned")
    assert ckpt.data_dir == run.parent / "data" / "tiny-data"
    assert ckpt.eval_batch_sha256 == eval_batch_sha256(eval_ids(run))
    assert ckpt.run_config["optim"]["name"] == "adamw" and ckpt.model_config.n_kv_heads == 2
    assert ckpt.metadata_float("val_loss") == pytest.approx(4.1) and ckpt.metadata_float("absent") != 0.0
    saved = load_file(str(path))
    state = ckpt.model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


def test_load_checkpoint_reuses_a_model(run):
    first, second = checkpoint_files(run)
    a = load_checkpoint(first)
    b = load_checkpoint(second, model=a.model)
    assert b.model is a.model
    assert torch.equal(
        b.model.blocks[0].attn.k_proj.weight, load_file(str(second))["blocks.0.attn.k_proj.weight"]
    )


def test_read_metadata_and_load_refuse_bad_files(run, tmp_path):
    good = checkpoint_files(run)[0]
    assert read_metadata(good)["format"] == "collapse-checkpoint"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"framework": "someone else"})
    no_meta = tmp_path / "no_meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_meta))
    cases = {
        truncated: "truncated",
        junk: "not a readable safetensors file",
        foreign: "not a collapse checkpoint",
        no_meta: "not a collapse checkpoint",
        rewrite(
            good, tmp_path / "v2.safetensors", format_version="2"
        ): "unsupported checkpoint format_version '2'",
        rewrite(good, tmp_path / "lacks.safetensors", drop=("run_name",)): "lacks run_name",
        tmp_path / "absent.safetensors": "no such checkpoint file",
    }
    for path, message in cases.items():
        with pytest.raises(SpectraError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_load_checkpoint_refuses_bad_metadata_values_and_mismatched_tensors(run, tmp_path):
    good = checkpoint_files(run)[0]
    meta = read_metadata(good)
    cfg, run_cfg = json.loads(meta["model_config"]), json.loads(meta["run_config"])
    wider = {**cfg, "d_ff": 96}  # said in both places, so that the header agrees with itself
    cases = {
        rewrite(good, tmp_path / "a.safetensors", model_config="{not json"): "model_config is not valid JSON",
        rewrite(good, tmp_path / "b.safetensors", model_config=json.dumps({**cfg, "colour": 1})): "colour",
        rewrite(
            good,
            tmp_path / "c.safetensors",
            model_config=json.dumps(wider),
            run_config=json.dumps({**run_cfg, "model": wider}),
        ): "do not fit",
        rewrite(good, tmp_path / "d.safetensors", step="ten"): "step='ten' is not an integer",
        # the model recorded twice, differently: which one the weights were trained under is unknown
        rewrite(
            good, tmp_path / "e.safetensors", model_config=json.dumps({**cfg, "rope_theta": 500000.0})
        ): r"the metadata contradicts itself: model_config.rope_theta = 500000.0 but run_config.model.rope_theta = 10000.0",
    }
    for path, message in cases.items():
        with pytest.raises(SpectraError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_load_eval_batch(run, tmp_path):
    data_dir = run.parent / "data" / "tiny-data"
    ids = eval_ids(run)
    sha = eval_batch_sha256(ids)
    assert torch.equal(load_eval_batch(data_dir, expected_sha256=sha), ids)
    # another integer dtype holds the same batch and hashes the same (the hash is over int64 values)
    small = tmp_path / "int32.safetensors"
    save_file({"input_ids": ids.to(torch.int32)}, str(small))
    loaded = load_eval_batch(small, expected_sha256=sha)
    assert loaded.dtype == torch.int64 and torch.equal(loaded, ids)

    other = tmp_path / "other.safetensors"
    save_file({"input_ids": ids.flip(0).contiguous()}, str(other))
    with pytest.raises(SpectraError, match="differs from the one the checkpoints record") as info:
        load_eval_batch(other, expected_sha256=sha)
    assert str(other) in str(info.value)
    assert torch.equal(load_eval_batch(other, expected_sha256=sha, force=True), ids.flip(0))


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"tokens": torch.zeros(2, 3, dtype=torch.int64)}, "no 'input_ids' tensor"),
        ({"input_ids": torch.zeros(2, 3)}, "2-D integer tensor"),
        ({"input_ids": torch.zeros(2, 3, 4, dtype=torch.int64)}, "2-D integer tensor"),
        ({"input_ids": -torch.ones(2, 3, dtype=torch.int64)}, "negative"),
    ],
)
def test_load_eval_batch_refuses_bad_batches(tmp_path, tensors, message):
    path = tmp_path / "eval_batch.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(SpectraError, match=message):
        load_eval_batch(tmp_path)


def test_load_eval_batch_missing_file(tmp_path):
    with pytest.raises(SpectraError, match="no such eval batch file"):
        load_eval_batch(tmp_path)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SpectraError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SpectraError, match="CUDA is not available"):
            resolve_device("cuda")
