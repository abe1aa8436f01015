"""The training loop and its components: milestones, metrics, validation, checkpoints, faults."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import read_jsonl, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

import trainer.step as step_mod
import trainer.train as train_mod
from trainer.checkpoint import FORMAT, FORMAT_VERSION, Checkpointer, checkpoint_name, list_checkpoints
from trainer.components import LossWindow, Validator
from trainer.config import RunConfig, TrainConfig, load_config
from trainer.data.dataset import TokenDataset, fixed_batches
from trainer.errors import DivergedError, TrainerError
from trainer.model import LLM
from trainer.rundir import MetricsLogger
from trainer.schedule import milestone_steps, tokens_per_step, total_steps_for
from trainer.step import autocast_factory
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------------------------------
# a tiny model config on conftest's session dataset (tiny_data_dir, tiny_vocab)


def run_overrides(vocab: int, **train: object) -> list[str]:
    """The tiny run of this module: 10 steps of 128 tokens, the plan's milestones, resume state every 3 steps.

    A run takes a fraction of a second; ``train`` replaces any of these settings.
    """
    return tiny_overrides(
        vocab, **{"tokens": 1280, "log_every": 2, "resume_every": 3, "milestones": "plan", **train}
    )


def tiny_config(vocab: int, **train: object) -> RunConfig:
    return load_config("tiny", run_overrides(vocab, **train))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_data_dir, tiny_vocab) -> tuple[RunConfig, Path]:
    cfg = tiny_config(tiny_vocab, tokens=1280)  # 10 steps of 128 tokens
    out = tmp_path_factory.mktemp("runs") / "tiny-run"
    assert train(cfg, tiny_data_dir, out, progress=False).path == out
    return cfg, out


# ----------------------------------------------------------------------------------------------------
# milestones (pure)


def cfg_with(**train: object) -> RunConfig:
    return RunConfig(train=TrainConfig(**train))


def test_plan_milestones_scale_the_source_plan():
    # 25M tokens in steps of 100k tokens: exactly the plan's 0, 0.5M, 1M, 2M, ..., 25M
    cfg = cfg_with(tokens=25_000_000)
    steps = milestone_steps(cfg, 100_000, 250)
    assert [s * 100_000 for s in steps] == [
        0,
        500_000,
        1_000_000,
        2_000_000,
        4_000_000,
        8_000_000,
        12_000_000,
        16_000_000,
        20_000_000,
        25_000_000,
    ]


def test_milestone_maps_to_first_step_reaching_it_and_final_is_capped():
    # 1000 tokens in steps of 64: 15 whole steps (960 tokens); 0.5/25 of 1000 = 20 tokens -> step 1;
    # 1/25 = 40 -> step 1 (duplicate removed); 2/25 = 80 -> step 2; 25/25 = 1000 -> capped at 15
    cfg = cfg_with(tokens=1000)
    steps = milestone_steps(cfg, 64, total_steps_for(cfg, 64))
    assert steps == [0, 1, 2, 3, 5, 8, 10, 13, 15]
    assert steps == sorted(set(steps))


def test_log_milestones_are_log_spaced_with_zero_and_final():
    cfg = cfg_with(tokens=10_000, milestones="log", n_log_milestones=5)
    assert milestone_steps(cfg, 1, 10_000) == [0, 1, 10, 100, 1000, 10_000]
    few = milestone_steps(cfg_with(tokens=3, milestones="log", n_log_milestones=10), 1, 3)
    assert few == [0, 1, 2, 3]


def test_plan_and_log_milestones_combine_into_a_dense_trajectory():
    cfg = cfg_with(tokens=25_000, milestones="plan+log", n_log_milestones=5)
    plan = milestone_steps(cfg_with(tokens=25_000, milestones="plan"), 100, 250)
    log = milestone_steps(cfg_with(tokens=25_000, milestones="log", n_log_milestones=5), 100, 250)
    assert milestone_steps(cfg, 100, 250) == sorted(set(plan) | set(log))
    # the tiny preset's 195 steps with 48 log points: 42 checkpoints, enough for phase detection
    tiny = load_config("tiny", ["train.milestones=plan+log", "train.n_log_milestones=48"])
    per_step = tiny.train.batch_size * tiny.train.seq_len
    steps = milestone_steps(tiny, per_step, tiny.train.tokens // per_step)
    assert len(steps) == 42 and steps[0] == 0 and steps[-1] == 195


def test_list_milestones_and_the_budget_check():
    cfg = cfg_with(tokens=1000, milestones="list", milestone_tokens=(100, 128, 129, 999))
    # 100 and 128 tokens both first reached at step 2 (128 tokens); 999 is past the 15-step run
    assert milestone_steps(cfg, 64, 15) == [0, 2, 3, 15]
    with pytest.raises(TrainerError, match="1001"):
        milestone_steps(cfg_with(tokens=1000, milestones="list", milestone_tokens=(1001,)), 64, 15)


def test_tokens_per_step_and_a_budget_below_one_step():
    cfg = cfg_with(tokens=90, batch_size=2, seq_len=8, grad_accum=3)
    assert tokens_per_step(cfg, world_size=2) == 2 * 8 * 3 * 2
    with pytest.raises(TrainerError, match="train.tokens=90"):
        total_steps_for(cfg, tokens_per_step(cfg, 2))


# ----------------------------------------------------------------------------------------------------
# small components


def test_loss_window_means_and_state_round_trip():
    w = LossWindow(3)
    assert math.isnan(w.mean())
    for x in (1.0, 2.0, 3.0, 4.0):
        w.add(x)
    assert w.mean() == 3.0  # only the last three are kept
    assert w.mean(last=2) == 3.5
    w.last_log_step = 4
    again = LossWindow.from_state(3, json.loads(json.dumps(w.state())))
    assert again.mean() == w.mean() and again.last_log_step == 4


def test_metrics_logger_truncates_and_drops_a_partial_last_line(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "train_loss": 1.0 / step})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train_lo')  # killed mid-line
    assert log.truncate_after(3) == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # a damaged line that is not the last one is not silently dropped
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainerError, match="metrics.jsonl:2"):
        log.truncate_after(5)


def test_metrics_logger_writes_strict_json(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl")
    with pytest.raises(ValueError):
        log.log({"step": 1, "train_loss": math.nan})  # the loop maps non-finite values to null first
    log.close()


def test_disabled_components_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl", enabled=False)
    log.log({"step": 1})
    ck = Checkpointer(tmp_path / "ck", [0], 10, {}, enabled=False)
    assert ck.save(torch.nn.Linear(2, 2), step=0, train_loss=math.nan, val_loss=1.0) is None
    assert list(tmp_path.iterdir()) == []


def test_autocast_factory():
    assert autocast_factory(torch.device("cpu"), "auto") is autocast_factory(torch.device("cpu"), "float32")
    with autocast_factory(torch.device("cpu"), "bfloat16")():
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
    with pytest.raises(TrainerError, match="float16"):
        autocast_factory(torch.device("cpu"), "float16")


def test_validator_is_the_token_weighted_loss_on_the_fixed_slice(tiny_data_dir, tiny_vocab):
    from trainer.distributed import DistInfo

    cfg = tiny_config(tiny_vocab)
    ds = TokenDataset.open(tiny_data_dir)
    torch.manual_seed(0)
    model = LLM(cfg.model)
    val = Validator(
        ds.split("val"),
        256,
        batch_size=4,
        seq_len=32,
        device=torch.device("cpu"),
        autocast=autocast_factory(torch.device("cpu"), "float32"),
        info=DistInfo(),
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in fixed_batches(ds.split("val"), 256, batch_size=4, seq_len=32):
            x, y = torch.as_tensor(x, dtype=torch.long), torch.as_tensor(y, dtype=torch.long)
            total += model(x, y).item() * y.numel()
            count += y.numel()
    assert count >= 256 - 32  # the slice is (about) val_tokens tokens
    assert val.validate(model) == pytest.approx(total / count, rel=1e-6)
    assert model.training  # restored after eval()
    assert val.validate(model) == val.validate(model)  # same tokens every time


# ----------------------------------------------------------------------------------------------------
# a whole run


def test_run_directory_contents(trained, tiny_data_dir):
    cfg, out = trained
    assert tomllib.loads((out / "config.toml").read_text()) == cfg.to_dict()
    assert load_config(str(out / "config.toml")) == cfg  # the resolved config rebuilds the same run
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["final_step"] == run["total_steps"] == 10
    assert run["tokens_per_step"] == 128 and run["world_size"] == 1 and run["seed"] == cfg.train.seed
    assert run["device"]["type"] == "cpu" and run["versions"]["torch"] == torch.__version__
    assert run["wall_time_s"] > 0 and run["start_time"] <= run["end_time"]
    assert run["data_dir"] == str(Path(tiny_data_dir).resolve())
    assert [s["status"] for s in run["segments"]] == ["completed"]


def test_metrics_lines(trained):
    cfg, out = trained
    lines = read_jsonl(out / "metrics.jsonl")
    train_lines = [r for r in lines if r["kind"] == "train"]
    val_lines = [r for r in lines if r["kind"] == "val"]
    assert [r["step"] for r in train_lines] == [2, 4, 6, 8, 10]  # log_every = 2
    for r in train_lines:
        assert r["tokens"] == 128 * r["step"]
        assert set(r) == {"kind", "step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s"}
        assert set(r["lr"]) == {"muon", "adamw_decay", "adamw_no_decay"}
        assert r["lr"]["muon"] == cfg.optim.muon_lr  # constant schedule
        assert math.isfinite(r["train_loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    steps = milestone_steps(cfg, 128, 10)
    assert [r["step"] for r in val_lines] == steps
    assert [r["checkpoint"] for r in val_lines] == [checkpoint_name(128 * s) for s in steps]
    # the model learns: final validation loss well below the uniform ln(V) it starts near
    assert val_lines[-1]["val_loss"] < val_lines[0]["val_loss"] - 0.3
    assert val_lines[0]["val_loss"] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.5)
    # lines are in step order: a reader can rely on it
    assert [r["step"] for r in lines] == sorted(r["step"] for r in lines)


def test_checkpoints_and_their_metadata(trained, tiny_data_dir):
    cfg, out = trained
    found = list_checkpoints(out / "checkpoints")
    steps = milestone_steps(cfg, 128, 10)
    assert [tokens for tokens, _ in found] == [128 * s for s in steps]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        p.name for _, p in found
    ]  # no temp files
    val = {r["step"]: r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "val"}
    train_lines = {
        r["step"]: r["train_loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"
    }
    ds = TokenDataset.open(tiny_data_dir)
    for tokens, path in found:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
        step = int(meta["step"])
        assert int(meta["tokens"]) == tokens == 128 * step
        assert json.loads(meta["model_config"]) == cfg.to_dict()["model"]
        assert json.loads(meta["run_config"]) == cfg.to_dict()
        assert meta["run_name"] == cfg.name
        assert meta["eval_batch_sha256"] == ds.eval_batch_sha256
        assert meta["data_dir"] == str(Path(tiny_data_dir).resolve())
        dataset = json.loads(meta["dataset"])
        assert dataset["name"] == ds.name and dataset["vocab_size"] == ds.vocab_size
        assert int(meta["seed"]) == cfg.train.seed
        assert json.loads(meta["versions"])["torch"] == torch.__version__
        assert float(meta["val_loss"]) == val[step]
        if step == 0:
            assert math.isnan(float(meta["train_loss"]))
        if step in train_lines:  # a log step: the checkpoint's window is the logged one
            assert float(meta["train_loss"]) == pytest.approx(train_lines[step], rel=1e-12)
    first, last = load_file(str(found[0][1])), load_file(str(found[-1][1]))
    torch.manual_seed(cfg.train.seed)
    init = LLM(cfg.model).state_dict()
    assert all(torch.equal(first[k], init[k]) for k in init)  # step 0 is the seeded initialisation
    assert not torch.equal(first["blocks.0.attn.k_proj.weight"], last["blocks.0.attn.k_proj.weight"])


def test_grad_accum_counts_tokens(tmp_path, tiny_data_dir, tiny_vocab):
    cfg = tiny_config(tiny_vocab, tokens=1024, grad_accum=2, milestones="list", milestone_tokens=[256])
    out = train(cfg, tiny_data_dir, tmp_path / "accum", progress=False).path
    assert [t for t, _ in list_checkpoints(out / "checkpoints")] == [0, 256, 1024]  # 256 tokens per step
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [2, 4]


# ----------------------------------------------------------------------------------------------------
# bad input and faults


def test_nonempty_run_dir_is_refused_and_untouched(tmp_path, tiny_data_dir, tiny_vocab):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainerError, match=str(out)):
        train(tiny_config(tiny_vocab), tiny_data_dir, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_an_empty_existing_run_dir_is_used(tmp_path, tiny_data_dir, tiny_vocab):
    out = tmp_path / "empty"
    out.mkdir()
    train(tiny_config(tiny_vocab, tokens=256), tiny_data_dir, out, progress=False)
    assert (out / "run.json").exists()


def test_vocab_mismatch_names_the_fix(tmp_path, tiny_data_dir, tiny_vocab):
    cfg = load_config("tiny", [*run_overrides(tiny_vocab), f"model.vocab_size={tiny_vocab + 1}"])
    with pytest.raises(TrainerError, match=f"use --set model.vocab_size={tiny_vocab}"):
        train(cfg, tiny_data_dir, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_unwritable_run_dir(tmp_path, tiny_data_dir, tiny_vocab):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrainerError, match="cannot write the run directory"):
        train(tiny_config(tiny_vocab), tiny_data_dir, blocker / "run", progress=False)


def test_missing_dataset_error_names_it(tmp_path, tiny_vocab):
    with pytest.raises(TrainerError, match="nowhere"):
        train(tiny_config(tiny_vocab), tmp_path / "nowhere", tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_at_once(tmp_path, tiny_data_dir, tiny_vocab, monkeypatch):
    """The 4th forward pass returns NaN: the run stops before the 4th update, keeps what it wrote."""
    calls = {"n": 0}
    forward = LLM.forward

    def poisoned(self, idx, targets=None):
        out = forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return out * math.nan
        return out

    monkeypatch.setattr(LLM, "forward", poisoned)
    cfg = tiny_config(tiny_vocab, milestones="list", milestone_tokens=[256], log_every=1)
    out = tmp_path / "nan"
    with pytest.raises(DivergedError) as err:
        train(cfg, tiny_data_dir, out, progress=False)
    msg = str(err.value)
    assert "non-finite loss at step 4" in msg and checkpoint_name(256) in msg
    assert [t for t, _ in list_checkpoints(out / "checkpoints")] == [0, 256]  # nothing of the bad state
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "diverged" and "non-finite" in run["error"] and run["final_step"] == 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


def test_a_deferred_check_finds_the_bad_step_before_anything_is_written(
    tmp_path, tiny_data_dir, tiny_vocab, monkeypatch
):
    """The CUDA way, run on the CPU: the 4th update's loss is NaN but is read only at step 5 (a log step); the
    error names step 4, the run ends at step 3, and no checkpoint, resume state or metrics line follows it."""
    calls = {"n": 0}
    forward = LLM.forward

    def poisoned(self, idx, targets=None):
        out = forward(self, idx, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return out * math.nan
        return out

    class DeferredStepper(train_mod.Stepper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, deferred=True)

    monkeypatch.setattr(LLM, "forward", poisoned)
    monkeypatch.setattr(train_mod, "Stepper", DeferredStepper)
    cfg = tiny_config(tiny_vocab, milestones="list", milestone_tokens=[256], log_every=5, resume_every=100)
    out = tmp_path / "nan"
    with pytest.raises(DivergedError, match=r"non-finite loss at step 4 \(after 384 tokens\)"):
        train(cfg, tiny_data_dir, out, progress=False)
    assert calls["n"] == 5  # update 5 ran before the read found update 4
    assert [t for t, _ in list_checkpoints(out / "checkpoints")] == [0, 256]
    assert [p.name for p in (out / "resume").iterdir()] == ["step_00000002"]  # the checkpoint's state
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "diverged" and run["final_step"] == 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 2]  # val lines; no train line yet


def test_non_finite_gradient_norm_also_stops(tmp_path, tiny_data_dir, tiny_vocab, monkeypatch):
    norms = iter(torch.tensor([1.0, math.inf]))  # clip_grad_norm returns a 0-d tensor
    monkeypatch.setattr(step_mod, "clip_grad_norm", lambda model, max_norm: next(norms))
    with pytest.raises(DivergedError, match="non-finite gradient norm at step 2.*grad_norm=inf"):
        train(tiny_config(tiny_vocab), tiny_data_dir, tmp_path / "inf", progress=False)


# ----------------------------------------------------------------------------------------------------
# compiled and GPU paths


def _losses(out) -> list[float]:
    out = getattr(out, "path", out)  # a TrainResult or a run directory
    return [r.get("train_loss", r.get("val_loss")) for r in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path, tiny_data_dir, tiny_vocab):
    """torch.compile (inductor on the CPU, about a minute) trains the same model: in float64 (weights, forward,
    Muon's orthogonalisation), where the compiled graph's other order of roundings (fused kernels) changes the
    numbers by about 1e-16 relative per operation, which ten smooth steps keep far below 1e-10 of the loss. In
    float32 with bfloat16 Newton-Schulz that order flips bfloat16 roundings and the runs drift apart by a
    trajectory-dependent amount (1.4e-5 of the loss in one measurement), which no rounding count bounds. A graph
    that computed something else, even a 1e-3 change of one step's update, moves the losses by far more."""
    float64 = ["train.weights_dtype='float64'", "optim.muon_ns_dtype='float64'"]
    losses = {}
    for compiled in (False, True):
        cfg = load_config(
            "tiny",
            [*run_overrides(tiny_vocab, log_every=1), *float64, f"train.compile={str(compiled).lower()}"],
        )
        losses[compiled] = _losses(train(cfg, tiny_data_dir, tmp_path / str(compiled), progress=False))
    assert losses[True] == pytest.approx(losses[False], rel=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compiled_run(tmp_path, tiny_data_dir, tiny_vocab):
    """The GPU path: bf16 autocast, torch.compile, fused AdamW; weights and checkpoints stay float32."""
    cfg = load_config(
        "tiny", [*run_overrides(tiny_vocab, log_every=1), "train.device='cuda'", "train.compile=true"]
    )
    out = train(cfg, tiny_data_dir, tmp_path / "gpu", progress=False).path
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["device"]["type"] == "cuda"
    assert run["device"]["name"] == torch.cuda.get_device_name(0)
    ckpts = list_checkpoints(out / "checkpoints")
    last = load_file(str(ckpts[-1][1]))
    assert all(t.dtype == torch.float32 for t in last.values())
    val = [r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "val"]
    assert val[-1] < val[0] - 0.3
    # bf16 autocast changes the numbers a little, not the trajectory
    eager_cpu = train(tiny_config(tiny_vocab, log_every=1), tiny_data_dir, tmp_path / "cpu", progress=False)
    assert _losses(out) == pytest.approx(_losses(eager_cpu), rel=0.05)


SIGTERM_WHILE_RECORDING = """
import os, signal, sys
from pathlib import Path
from trainer.components import signals_deferred

with signals_deferred():
    os.kill(os.getpid(), signal.SIGTERM)  # default action: end the process, but not before the block is done
    Path(sys.argv[1]).write_text("recorded")
print("unreachable")
"""


def test_a_signal_while_the_outcome_is_recorded_waits_for_the_record(tmp_path):
    """torchrun's SIGTERM to the surviving rank can land while it records a failure: the record comes first."""
    marker = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_RECORDING, str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGTERM and marker.read_text() == "recorded"
    assert "unreachable" not in proc.stdout
