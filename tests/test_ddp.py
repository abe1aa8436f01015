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


def overrides(
    vocab: int,
    batch_size: int,
    optim: str = "muon",
    impl: str = "batched",
    ns_dtype: str = "bfloat16",
    qkvo: str = "separate",
) -> list[str]:
    return tiny_overrides(
        vocab,
        optim={"name": optim, "muon_impl": impl, "muon_ns_dtype": ns_dtype, "muon_qkvo": qkvo},
        tokens=1280,  # 5 steps of 2 x 4 x 32 (world size 2) or 1 x 8 x 32 tokens
        batch_size=batch_size,
        grad_accum=1,
        log_every=1,
        milestones="list",
        milestone_tokens=[512],
        weights_dtype="float64",
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


# Why 1e-10, for every case below. The runs are float64 end to end (weights, activations, loss, gradients,
# optimizer states). Two ranks differ from one process only in the order of floating-point sums (each rank's
# half-batch mean, then gloo's average of the two), so the gradients differ by rounding: a sum of n terms errs
# by at most about n * 2**-53 * sum|x|, i.e. 1e-14 relative here (n is at most a few thousand), and five steps
# of AdamW or Muon (smooth maps, run for five steps at small learning rates) keep that within 1e-12. A real
# data-parallel bug (a rank's gradient not averaged, a batch slice read twice, a step missing) moves weights by
# at least a learning rate times a gradient, over 1e-5: 1e-10 sits five orders below the one and two above the
# other.
#
# The bfloat16 Muon cases orthogonalise in bfloat16, as Muon does in production (torch.optim.Muon hard-codes it).
# Casting two float64 gradients that differ by 1e-14 relative to bfloat16 rounds them to the same value unless a
# rounding boundary (spaced 2**-8 relative apart) falls between them: probability about 1e-14 / 2**-8 = 3e-12
# per element, and 5 steps x 14,336 Muon elements make the chance of a single flip in this test about 2e-7.
# Without a flip the bfloat16 orthogonalisations of the two runs take identical inputs and return identical
# outputs (one thread each), so these cases pass at 1e-10 too, and a data-parallel bug in the Muon path shows
# at its full size.
RTOL = ATOL = 1e-10


@pytest.mark.parametrize(
    ("optim", "impl", "ns_dtype", "qkvo"),
    [
        ("adamw", "batched", "bfloat16", "separate"),
        ("muon", "batched", "float64", "separate"),
        ("muon", "batched", "float64", "fused"),  # the source documents' stacked [W_q; W_k; W_v; W_o]
        ("muon", "batched", "bfloat16", "separate"),
        ("muon", "torch", "bfloat16", "separate"),
    ],
)
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_data_dir, tiny_vocab, optim, impl, ns_dtype, qkvo
):
    data_dir, vocab = tiny_data_dir, tiny_vocab
    ddp_out = tmp_path / "ddp"
    sets = overrides(vocab, batch_size=4, optim=optim, impl=impl, ns_dtype=ns_dtype, qkvo=qkvo)
    torchrun(2, data_dir, ddp_out, sets, timeout=180)

    single_out = tmp_path / "single"
    train(
        load_config("tiny", [*overrides(vocab, 8, optim, impl, ns_dtype, qkvo), "name='ddp'"]),
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
                assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), (a["step"], key)

    run = json.loads((ddp_out / "run.json").read_text())
    assert run["world_size"] == 2 and run["tokens_per_step"] == 256 and run["status"] == "completed"
    ddp_ckpts, single_ckpts = (
        list_checkpoints(ddp_out / "checkpoints"),
        list_checkpoints(single_out / "checkpoints"),
    )
    assert [t for t, _ in ddp_ckpts] == [t for t, _ in single_ckpts] == [0, 512, 1280]
    a, b = load_file(str(ddp_ckpts[-1][1])), load_file(str(single_ckpts[-1][1]))
    first = load_file(str(single_ckpts[0][1]))
    for k in a:
        assert a[k].dtype == torch.float64  # checkpoints keep the weights' own dtype
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
    moved = max((b[k] - first[k]).abs().max().item() for k in b if b[k].ndim == 2)
    assert moved > 1e-4  # the runs trained: the agreement above is not that of weights that never moved


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
