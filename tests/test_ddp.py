"""Data parallelism on the CPU: two gloo processes under torchrun equal one process with twice the batch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import list_checkpoints
from trainer.config import load_config
from trainer.data import TokenDataset, prepare_data
from trainer.train import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)

WORDS = (
    "a small river ran past the old stone house where people kept bread and fire through every night".split()
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    rng = random.Random(2)
    paragraphs = (
        " ".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(5)
        )
        for _ in range(1000)
    )
    (root / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    return Path(
        prepare_data(
            root / "data",
            [str(root / "corpus.txt")],
            vocab_size=300,
            eval_seqs=2,
            eval_seq_len=32,
            progress=False,
        )
    )


def overrides(vocab: int, batch_size: int) -> list[str]:
    return [
        f"model.vocab_size={vocab}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.n_kv_heads=1",
        "model.d_ff=64",
        "model.context_length=32",
        "train.tokens=1280",  # 5 steps of 2 x 4 x 32 (world size 2) or 1 x 8 x 32 tokens
        f"train.batch_size={batch_size}",
        "train.seq_len=32",
        "train.grad_accum=1",
        "train.val_tokens=256",
        "train.log_every=1",
        "train.milestones='list'",
        "train.milestone_tokens=[512]",
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_dir):
    vocab = TokenDataset.open(data_dir).vocab_size
    ddp_out = tmp_path / "ddp"
    args = [f"--set={o}" for o in overrides(vocab, batch_size=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cli.train",
            "run",
            "tiny",
            "--data",
            str(data_dir),
            "--out",
            str(ddp_out),
            "--no-progress",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    single_out = tmp_path / "single"
    train(
        load_config("tiny", [*overrides(vocab, batch_size=8), "name='ddp'"]),
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
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)

    run = json.loads((ddp_out / "run.json").read_text())
    assert run["world_size"] == 2 and run["tokens_per_step"] == 256 and run["status"] == "completed"
    ddp_ckpts, single_ckpts = (
        list_checkpoints(ddp_out / "checkpoints"),
        list_checkpoints(single_out / "checkpoints"),
    )
    assert [t for t, _ in ddp_ckpts] == [t for t, _ in single_ckpts] == [0, 512, 1280]
    a, b = load_file(str(ddp_ckpts[-1][1])), load_file(str(single_ckpts[-1][1]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_on_every_visible_gpu(tmp_path, data_dir):
    """torchrun with the NCCL backend, one process per GPU (one process on a single-GPU machine)."""
    vocab = TokenDataset.open(data_dir).vocab_size
    n = torch.cuda.device_count()
    out = tmp_path / "nccl"
    sets = [
        *overrides(vocab, batch_size=4),
        f"train.tokens={5 * 4 * 32 * n}",
        "train.device='cuda'",
    ]  # 5 steps
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "cli.train",
            "run",
            "tiny",
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--no-progress",
            *(f"--set={o}" for o in sets),
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == n and run["device"]["type"] == "cuda"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5]
