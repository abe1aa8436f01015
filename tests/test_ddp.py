"""Data parallelism on the CPU: two gloo processes under torchrun equal one process with twice the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_jsonl, tiny_overrides
from safetensors.torch import load_file

from trainer.checkpoint import list_checkpoints
from trainer.config import load_config
from trainer.train import train

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in"),
    pytest.mark.usefixtures("one_thread"),
]


def overrides(vocab: int, batch_size: int, optim: str = "muon", impl: str = "batched") -> list[str]:
    return tiny_overrides(
        vocab,
        optim={"name": optim, "muon_impl": impl},
        tokens=1280,  # 5 steps of 2 x 4 x 32 (world size 2) or 1 x 8 x 32 tokens
        batch_size=batch_size,
        grad_accum=1,
        log_every=1,
        milestones="list",
        milestone_tokens=[512],
    )


def torchrun(n_procs: int, data_dir: Path, out: Path, sets: list[str], timeout: float) -> None:
    """``collapse-train run tiny`` under torchrun with ``n_procs`` processes of one thread each."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n_procs}",
            "-m",
            "cli.train",
            "run",
            "tiny",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--no-progress",
            *(f"--set={s}" for s in sets),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


# Tolerances per optimizer, measured: two ranks reduce gradients in another order than one process, which
# changes float32 sums by about 1e-7. AdamW keeps that size (1e-7 over five steps). Muon (both
# implementations) orthogonalises in bfloat16 (torch/optim/_muon.py, trainer/muon.py), so such a difference can flip a bfloat16 rounding and
# grow to about 1e-4 in the grad norms within five steps, depending on the corpus. The AdamW case is the
# strict check of the data-parallel arithmetic; the Muon case checks that Muon under DDP follows the same
# trajectory to bfloat16 precision.
TOLERANCES = {
    "adamw": dict(metrics=1e-5, weights=dict(rtol=1e-4, atol=1e-5)),
    # a flipped bfloat16 rounding moves a weight by about lr * 2**-8 per step: 3.5e-4 measured after 5 steps
    "muon": dict(metrics=2e-3, weights=dict(rtol=0.0, atol=1e-3)),
}


@pytest.mark.parametrize(("optim", "impl"), [("adamw", "batched"), ("muon", "batched"), ("muon", "torch")])
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_data_dir, tiny_vocab, optim, impl
):
    data_dir, vocab, tol = tiny_data_dir, tiny_vocab, TOLERANCES[optim]
    ddp_out = tmp_path / "ddp"
    torchrun(2, data_dir, ddp_out, overrides(vocab, batch_size=4, optim=optim, impl=impl), timeout=180)

    single_out = tmp_path / "single"
    train(
        load_config("tiny", [*overrides(vocab, batch_size=8, optim=optim, impl=impl), "name='ddp'"]),
        data_dir,
        single_out,
        progress=False,
    )

    ddp, single = read_jsonl(ddp_out / "metrics.jsonl"), read_jsonl(single_out / "metrics.jsonl")
    # one line per step and checkpoint: rank 1 wrote nothing
    assert [(r["kind"], r["step"], r["tokens"]) for r in ddp] == [
        (r["kind"], r["step"], r["tokens"]) for r in single
    ]
    assert [r["step"] for r in ddp if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    for a, b in zip(ddp, single):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=tol["metrics"]), (a["step"], key)

    run = json.loads((ddp_out / "run.json").read_text())
    assert run["world_size"] == 2 and run["tokens_per_step"] == 256 and run["status"] == "completed"
    ddp_ckpts, single_ckpts = (
        list_checkpoints(ddp_out / "checkpoints"),
        list_checkpoints(single_out / "checkpoints"),
    )
    assert [t for t, _ in ddp_ckpts] == [t for t, _ in single_ckpts] == [0, 512, 1280]
    a, b = load_file(str(ddp_ckpts[-1][1])), load_file(str(single_ckpts[-1][1]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol["weights"], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_on_every_visible_gpu(tmp_path, tiny_data_dir, tiny_vocab):
    """torchrun with the NCCL backend, one process per GPU (one process on a single-GPU machine)."""
    n = torch.cuda.device_count()
    out = tmp_path / "nccl"
    sets = [
        *overrides(tiny_vocab, batch_size=4),
        f"train.tokens={5 * 4 * 32 * n}",
        "train.device='cuda'",
    ]  # 5 steps
    torchrun(n, tiny_data_dir, out, sets, timeout=300)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == n and run["device"]["type"] == "cuda"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5]


RANK_1_DIES_AT_THE_END = """
import os, sys
import trainer.train as train_mod

calls = {"n": 0}
barrier = train_mod.barrier


def barrier_or_die(info):
    calls["n"] += 1
    if info.rank == 1 and calls["n"] == 2:  # the barrier after the last step: rank 1 never gets there
        os._exit(3)
    barrier(info)


train_mod.barrier = barrier_or_die
from cli.train import main

main(sys.argv[1:])
"""


def test_a_run_whose_ranks_did_not_all_finish_is_not_recorded_completed(tmp_path, tiny_data_dir, tiny_vocab):
    launcher = tmp_path / "launch.py"
    launcher.write_text(RANK_1_DIES_AT_THE_END)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
         "run", "tiny", "--data", str(tiny_data_dir), "--out", str(out), "--no-progress",
         *(f"--set={s}" for s in overrides(tiny_vocab, batch_size=4, optim="adamw"))],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode != 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] in ("failed", "interrupted"), run["status"]
    assert run["final_step"] == 5  # every step was taken: only the ranks' agreement at the end is missing
