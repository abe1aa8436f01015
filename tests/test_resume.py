"""Resume state: pickle-free round trips, bit-identical continuation after SIGKILL, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_tiny_dataset, read_jsonl, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import trainer.checkpoint as checkpoint_mod
from trainer.checkpoint import list_checkpoints
from trainer.config import RunConfig, load_config
from trainer.errors import TrainerError
from trainer.fileio import write_safetensors
from trainer.model import LLM
from trainer.optim import Optimizers
from trainer.resume import (
    ResumeError,
    capture_rng,
    flatten_state,
    list_resume_states,
    load_resume_state,
    restore_rng,
    save_resume_state,
    unflatten_state,
)
from trainer.train import train

REPO = Path(__file__).resolve().parent.parent

# Not only for speed: the killed subprocess runs with OMP_NUM_THREADS=1, and float sums agree bit for bit
# only with the same thread count in this process.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def overrides(tiny_vocab) -> list[str]:
    return tiny_overrides(
        tiny_vocab,
        optim={
            "schedule": "cosine",  # the learning rate changes every step, so a wrong step would show
            "warmup_frac": 0.2,
        },
        tokens=1536,  # 12 steps of 128 tokens
        log_every=1,
        resume_every=4,
        milestones="list",
        milestone_tokens=[640],  # checkpoints at steps 0, 5, 12
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data_dir, overrides, one_thread) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _final_weights(run: Path) -> dict[str, bytes]:
    """The last checkpoint's tensors as bytes (comparable with ==)."""
    _, path = list_checkpoints(run / "checkpoints")[-1]
    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}


SEED_RECIPE = (  # seed-tiny's choices on the small test model, trained as the source documents' train_llm.py does
    "optim.muon_qkvo=fused",
    "optim.muon_coefficients=polar_express_seed",
    "train.weights_dtype=bfloat16",
    "model.rope_layout=interleaved",
    "model.norm_eps=dtype",
    "model.embed_scale=sqrt_d_model",
    "model.init_scheme=unscaled",
    "model.qk_norm=frozen_k",
)


@pytest.fixture(scope="module", params=["batched", "torch", "fused-bf16"])
def impl_overrides(request, overrides) -> list[str]:
    """The resume run under each Muon implementation (``optim.muon_impl``), and the batched one stacking the
    attention projections with pure bfloat16 weights (bfloat16 checkpoints, optimizer states and resume state)."""
    if request.param == "fused-bf16":
        return [*overrides, "optim.muon_impl=batched", *SEED_RECIPE]
    return [*overrides, f"optim.muon_impl={request.param}"]


@pytest.fixture(scope="module")
def uninterrupted_impl(tmp_path_factory, tiny_data_dir, impl_overrides, one_thread) -> Path:
    out = tmp_path_factory.mktemp("ref-impl") / "run"
    train(load_config("tiny", impl_overrides), tiny_data_dir, out, progress=False)
    return out


def small_config(name: str = "muon", impl: str = "batched") -> RunConfig:
    sets = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1", f"optim.name={name}"]
    return load_config("tiny", [*sets, f"optim.muon_impl={impl}"])


def small_model_and_optim(name: str = "muon", impl: str = "batched") -> tuple[LLM, Optimizers]:
    cfg = small_config(name, impl)
    torch.manual_seed(0)
    model = LLM(cfg.model)
    opt = Optimizers(model, cfg.optim, total_steps=10, device_type="cpu")
    return model, opt


def take_step(model: LLM, opt: Optimizers, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (2, 9), generator=g)
    opt.set_lr(step)
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    opt.zero_grad()


# ----------------------------------------------------------------------------------------------------
# pickle-free state


def test_flatten_round_trip_of_nested_state():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).view(2, 3).t()}},
        "param_groups": [
            {"betas": (0.9, 0.95), "params": [0, 1], "name": "adamw", "lr": 1e-3, "fused": None}
        ],
    }
    skeleton, tensors = flatten_state(state)
    skeleton = json.loads(json.dumps(skeleton))  # it must survive JSON
    back = unflatten_state(skeleton, tensors)
    assert list(back["state"]) == [0]  # int keys stay ints
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"] == state["param_groups"]
    with pytest.raises(TypeError, match="pickle"):
        flatten_state({"x": object()})


@pytest.mark.parametrize(("name", "impl"), [("muon", "batched"), ("muon", "torch"), ("adamw", "batched")])
def test_optimizer_state_round_trip_continues_identically(tmp_path, name, impl):
    model, opt = small_model_and_optim(name, impl)
    for s in range(3):
        take_step(model, opt, s)
    cfg = small_config(name, impl)
    save_resume_state(
        tmp_path, step=3, tokens=48, cfg=cfg, world_size=1, model=model, optimizers=opt, metrics={"k": [1.5]}
    )
    state = load_resume_state(tmp_path, cfg, world_size=1)
    assert state.step == 3 and state.tokens == 48 and state.metrics == {"k": [1.5]}

    model2, opt2 = small_model_and_optim(name, impl)
    state.restore(model2, opt2)
    for s in range(3, 6):
        take_step(model, opt, s)
        take_step(model2, opt2, s)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_rng_round_trip():
    tensors, states = capture_rng()
    states = json.loads(json.dumps(states))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002 - the global state
    restore_rng(tensors, states)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])  # noqa: NPY002
    assert random.random() == expected[2]


def test_only_complete_states_are_listed_and_older_ones_are_pruned(tmp_path):
    model, opt = small_model_and_optim()
    cfg = load_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1"])
    stale = tmp_path / "resume" / ".tmp-step_00000009-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    for step in (2, 4):
        save_resume_state(
            tmp_path, step=step, tokens=step, cfg=cfg, world_size=1, model=model, optimizers=opt, metrics={}
        )
    assert [s for s, _ in list_resume_states(tmp_path)] == [4]
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["step_00000004"]
    manifest = json.loads((tmp_path / "resume" / "step_00000004" / "manifest.json").read_text())
    assert manifest["format"] == "collapse-resume" and manifest["step"] == 4 and manifest["world_size"] == 1


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    model, opt = small_model_and_optim()
    cfg = load_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1"])
    save_resume_state(
        tmp_path, step=1, tokens=1, cfg=cfg, world_size=1, model=model, optimizers=opt, metrics={}
    )
    other = load_config(
        "tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "optim.lr=0.1"]
    )
    with pytest.raises(ResumeError, match=r"optim\.lr: 0\.003 \(saved\) != 0\.1 \(now\)"):
        load_resume_state(tmp_path, other, world_size=1)
    with pytest.raises(ResumeError, match="2 process"):
        load_resume_state(_with_world_size(tmp_path, 2), cfg, world_size=1)


def _drop_keys(data: Any, names: set[str]) -> Any:
    if isinstance(data, dict):
        return {k: _drop_keys(v, names) for k, v in data.items() if k not in names}
    if isinstance(data, list):
        return [_drop_keys(v, names) for v in data]
    return data


def test_a_state_saved_before_a_field_existed_resumes_with_the_fields_default(tmp_path):
    """A field added since (here muon_ns_dtype, weights_dtype, and BatchedMuon's ns_dtype) counts as its default."""
    model, opt = small_model_and_optim()
    cfg = small_config("muon", "batched")
    take_step(model, opt, 0)
    save_resume_state(
        tmp_path, step=1, tokens=1, cfg=cfg, world_size=1, model=model, optimizers=opt, metrics={}
    )
    manifest = tmp_path / "resume" / "step_00000001" / "manifest.json"
    old = _drop_keys(json.loads(manifest.read_text()), {"muon_ns_dtype", "weights_dtype", "ns_dtype"})
    old["config_sha256"] = "0" * 64  # the hash of the older, shorter config
    manifest.write_text(json.dumps(old))

    state = load_resume_state(tmp_path, cfg, world_size=1)
    fresh_model, fresh_opt = small_model_and_optim()
    state.restore(fresh_model, fresh_opt)
    take_step(fresh_model, fresh_opt, 1)  # the restored groups have every key the step reads
    take_step(model, opt, 1)
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    other = load_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.n_layers=1",
                                 "train.weights_dtype=float64"])  # fmt: skip
    with pytest.raises(ResumeError, match=r"train\.weights_dtype: 'float32' \(saved\) != 'float64'"):
        load_resume_state(tmp_path, other, world_size=1)


def _with_world_size(run_dir: Path, n: int) -> Path:
    manifest = run_dir / "resume" / "step_00000001" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["world_size"] = n
    manifest.write_text(json.dumps(data))
    return run_dir


def test_resume_of_a_missing_directory_is_a_clear_error(tmp_path, tiny_data_dir, overrides):
    with pytest.raises(ResumeError, match="does not exist"):
        train(load_config("tiny", overrides), tiny_data_dir, tmp_path / "absent", resume=True, progress=False)
    assert not (tmp_path / "absent").exists()


def test_resume_of_an_empty_directory_starts_at_step_0(tmp_path, tiny_data_dir, overrides, uninterrupted):
    (tmp_path / "run").mkdir()
    notes = []
    result = train(
        load_config("tiny", overrides),
        tiny_data_dir,
        tmp_path / "run",
        resume=True,
        progress=False,
        echo=notes.append,
    )
    assert result.status == "completed" and notes == [f"no run in {tmp_path / 'run'} yet: starting at step 0"]
    assert _final_weights(tmp_path / "run") == _final_weights(uninterrupted)


def test_resume_refuses_a_directory_that_holds_no_run(tmp_path, tiny_data_dir, overrides):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(TrainerError, match="holds no run made by collapse-train.*notes.txt"):
        train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------
# byte-reproducible files: a checksum verifies a replication


def test_two_identical_runs_write_byte_identical_checkpoints_and_states(
    tmp_path, tiny_data_dir, overrides, uninterrupted
):
    out = tmp_path / uninterrupted.name  # the run name is the directory's, and it is in the metadata
    train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
    written = sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
    assert written == sorted(p.relative_to(uninterrupted) for p in uninterrupted.rglob("*.safetensors"))
    assert {p.parts[0] for p in written} == {"checkpoints", "resume"}
    for rel in written:
        assert sha256(out / rel) == sha256(uninterrupted / rel), rel


def test_write_safetensors_sorts_the_metadata_and_reads_back_like_save_file(tmp_path):
    # values with every character JSON escapes, and non-ASCII: the rewritten header keeps its length
    metadata = {f"key_{i:02d}": f'v{i} "q" \\ \n \t \x01 é ∑' for i in range(20)}
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    reference = tmp_path / "library.safetensors"
    save_file(tensors, str(reference), metadata=metadata)
    digests = set()
    for i in range(3):
        path = tmp_path / f"ours{i}.safetensors"
        write_safetensors(path, tensors, metadata)
        digests.add(sha256(path))
        with safe_open(str(path), "pt") as ours, safe_open(str(reference), "pt") as lib:
            assert ours.metadata() == lib.metadata() == metadata
            assert sorted(ours.keys()) == sorted(lib.keys())
            for k in lib.keys():
                assert torch.equal(ours.get_tensor(k), lib.get_tensor(k))
        assert path.stat().st_size == reference.stat().st_size
    assert len(digests) == 1
    write_safetensors(tmp_path / "plain.safetensors", tensors)  # no metadata: nothing to sort
    assert load_file(str(tmp_path / "plain.safetensors")).keys() == tensors.keys()


def test_a_prepared_dataset_has_a_byte_identical_eval_batch(tmp_path, tiny_data_dir):
    again = make_tiny_dataset(tmp_path, vocab_size=300, eval_seqs=2, eval_seq_len=32)
    name = "eval_batch.safetensors"
    assert sha256(again / name) == sha256(tiny_data_dir / name)


# ----------------------------------------------------------------------------------------------------
# kill and resume: bit-identical final weights

LAUNCHER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import trainer.resume as resume_mod
    import trainer.rundir as rundir_mod
    import trainer.train as train_mod
    from trainer.config import RunConfig, load_config

    data_dir, out, kill_at, *overrides = sys.argv[1:]
    kind, where = kill_at.split(":")
    if kind == "after-log":  # SIGKILL right after the metrics line of step N is flushed
        log = rundir_mod.MetricsLogger.log
        def log_then_die(self, record):
            log(self, record)
            if record.get("kind") == "train" and record["step"] == int(where):
                os.kill(os.getpid(), signal.SIGKILL)
        rundir_mod.MetricsLogger.log = log_then_die
    elif kind == "mid-resume-write":  # SIGKILL after the first file of the N-th resume state
        save = resume_mod.write_safetensors
        count = {"states": 0}
        def save_then_die(path, tensors, *args, **kwargs):
            save(path, tensors, *args, **kwargs)
            if str(path).endswith("model.safetensors"):
                count["states"] += 1
                if count["states"] == int(where):
                    os.kill(os.getpid(), signal.SIGKILL)
        resume_mod.write_safetensors = save_then_die
    train_mod.train(load_config("tiny", overrides), data_dir, out, progress=False)
    """
)


def run_until_killed(tmp_path: Path, data_dir: Path, out: Path, kill_at: str, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(data_dir), str(out), kill_at, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize(
    ("kill_at", "resumed_from"),
    [
        ("after-log:6", 5),  # states at 0, 4, 5 (checkpoint); lines for step 6 must be dropped
        ("mid-resume-write:3", 4),  # the state of step 5 is half-written: resume from 4
    ],
)
def test_kill_then_resume_is_bit_identical(
    tmp_path, tiny_data_dir, impl_overrides, uninterrupted_impl, kill_at, resumed_from
):
    overrides, uninterrupted = impl_overrides, uninterrupted_impl
    out = tmp_path / "run"
    run_until_killed(tmp_path, tiny_data_dir, out, kill_at, overrides)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # SIGKILL: no chance to record
    assert list_resume_states(out)[-1][0] == resumed_from

    train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)

    ref_ckpts, ckpts = list_checkpoints(uninterrupted / "checkpoints"), list_checkpoints(out / "checkpoints")
    assert [t for t, _ in ckpts] == [t for t, _ in ref_ckpts] == [0, 640, 1536]
    for (_, ref_path), (_, path) in zip(ref_ckpts, ckpts):
        ref, got = load_file(str(ref_path)), load_file(str(path))
        assert ref.keys() == got.keys()
        dtype = torch.bfloat16 if "train.weights_dtype=bfloat16" in overrides else torch.float32
        for k in ref:
            assert torch.equal(ref[k], got[k]), f"{path.name}: {k}"
            assert got[k].dtype == dtype, f"{path.name}: {k}"  # checkpoints keep the weights' own dtype
        with safe_open(str(ref_path), "pt") as a, safe_open(str(path), "pt") as b:
            assert a.metadata() == b.metadata()  # losses, step, tokens: the same numbers
        assert sha256(path) == sha256(ref_path), path.name  # so a checksum verifies the replication
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [p.name for _, p in ckpts]

    def losses(run: Path) -> list[tuple]:
        lines = read_jsonl(run / "metrics.jsonl")
        return [
            (r["kind"], r["step"], r.get("train_loss"), r.get("val_loss"), r.get("grad_norm")) for r in lines
        ]

    assert losses(out) == losses(uninterrupted)  # no duplicated or missing lines, same values
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert [(s["start_step"], s["status"]) for s in run["segments"]] == [
        (0, "killed"),  # SIGKILL left it "running"; the resumed process, holding the lock, knows better
        (resumed_from, "completed"),
    ]
    assert [p.name for p in (out / "resume").iterdir()] == ["step_00000012"]


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_data_dir, overrides, uninterrupted):
    import shutil

    out = tmp_path / "done"
    shutil.copytree(uninterrupted, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    notes = []
    result = train(
        load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False, echo=notes.append
    )
    assert result.status == "already completed"
    assert notes == [f"{out} already completed at step 12: nothing to do"]
    # every file byte for byte, run.json included (no segment appended), and nothing added
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------
# a failure inside a checkpoint write never leaves a final-named partial file


def test_checkpoint_write_failure_leaves_only_complete_files(tmp_path, tiny_data_dir, overrides, monkeypatch):
    # a failure in the middle of a write, of any cause; test_recovery_train fills a real file system
    real_write = checkpoint_mod.write_safetensors
    calls = {"n": 0}

    def half_then_fail(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then the write fails
            real_write(path, tensors, metadata)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise OSError(errno.EIO, "Input/output error", path)
        real_write(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_mod, "write_safetensors", half_then_fail)
    out = tmp_path / "failed-write"
    with pytest.raises(OSError, match="Input/output error"):
        train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["tokens_000000000000.safetensors"]  # no partial file, final-named or temporary
    for _, path in list_checkpoints(out / "checkpoints"):
        assert load_file(str(path))  # complete and readable
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "Input/output error" in run["error"]


def test_resume_removes_temporary_checkpoint_files_of_a_killed_writer(tmp_path, tiny_data_dir, overrides):
    out = tmp_path / "run"
    run_until_killed(tmp_path, tiny_data_dir, out, "after-log:2", overrides)
    partial = out / "checkpoints" / ".tokens_000000000640.safetensors.abc123.tmp"
    partial.write_bytes(b"\0" * 100)  # what a SIGKILL inside atomic_write leaves behind
    train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)
    assert not partial.exists()
    assert [t for t, _ in list_checkpoints(out / "checkpoints")] == [0, 640, 1536]
