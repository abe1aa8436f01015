"""The benchmark scripts run and report what they measured (speed is printed, never asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import bf16_newton_schulz_difference, tiny_overrides

from trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """A benchmark script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_muon, bench_train = load_script("bench_muon"), load_script("bench_train")
bench_attention, bench_watch = load_script("bench_attention"), load_script("bench_watch")

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_bench_muon_times_both_implementations_on_the_trainers_matrices():
    assert len(bench_muon.hidden_shapes("paper-88m")) == 132  # docs/model.md: 132 matrices under Muon
    r = bench_muon.benchmark("tiny", CPU, warmup=0, repeats=1, compile_ns=False)
    assert r["matrices"] == 24 and r["shape_groups"] == 4 and r["parameters"] == 4 * 180_224
    assert r["torch_ms"] > 0 and r["batched_ms"] > 0
    # the same update up to bfloat16 rounding: one step (warmup 0, repeats 1) from the same weights and Gaussian
    # gradients, so the weights differ by the two orthogonalised updates' difference times the step's learning rate,
    # at most bf16_newton_schulz_difference() of the largest change, plus a float32 rounding of weights below 0.2
    bound = bf16_newton_schulz_difference() * r["max_weight_change"] + 2 * 2**-24 * 0.2
    assert 0 < r["max_weight_change"] and r["max_weight_difference"] <= bound


def test_bench_train_variants_share_one_model_and_report_each():
    overrides = ["model.vocab_size=256", "train.batch_size=2", "train.seq_len=32"]
    rows = bench_train.benchmark_variants(
        "tiny", overrides, ["adamw", "muon-torch", "muon-batched"], CPU, steps=2, warmup=1,
        compile_model=False, peak_tflops=1.0,
    )  # fmt: skip
    assert [(r["variant"], r["optimizer"], r["muon_impl"]) for r in rows] == [
        ("adamw", "adamw", None),
        ("muon-torch", "muon", "torch"),
        ("muon-batched", "muon", "batched"),
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["mfu"] == pytest.approx(
            r["tokens_per_s"] * r["flops_per_token"] / 1e12
        )
    # every set-up starts from the same weights and batches: the first loss (before any update) is the same
    assert rows[0]["loss_first"] == rows[1]["loss_first"] == rows[2]["loss_first"]


def test_bench_train_measures_a_peak():
    peak = bench_train.measure_peak_tflops(CPU, size=128, repeats=2)
    assert peak["dtype"] == "float32" and peak["size"] == 128 and peak["peak_tflops"] > 0


def test_bench_train_refuses_a_cuda_only_kernel_on_the_cpu(capsys):
    assert bench_train.main(["--device", "cpu", "--set", "train.sdpa_backend=cudnn"]) == 1
    assert "is a CUDA kernel" in capsys.readouterr().err
    assert load_config("tiny").train.sdpa_backend == "auto"


def test_bench_attention_times_what_runs_and_says_why_the_rest_cannot():
    r = bench_attention.benchmark("tiny", CPU, batch=1, seq_len=32, warmup=0, repeats=1)
    rows = r["settings"]
    plain = {"cudnn", "flash", "efficient", "math", "auto", "default"}
    assert set(rows) == plain | {"cudnn+expand_kv", "flash+expand_kv", "efficient+expand_kv"}  # tiny has GQA
    assert "CUDA kernel" in rows["cudnn"]["error"] and "CUDA kernel" in rows["efficient"]["error"]
    # float32 rounding only: each output and gradient entry is a chain of at most 4 accumulations (scores, softmax
    # sum, values; their gradients) over at most T + D = 64 terms, each erring by at most 64 * 2**-24 of the summed
    # magnitudes; with N(0, 1) inputs those are within a few (3) times the tensor's largest entry, so two kernels
    # differ by at most 2 * 4 * 64 * 2**-24 * 3 = 9e-5 of it. A wrong mask or GQA head mapping changes entries by O(1).
    bound = 2 * 4 * 64 * 2**-24 * 3
    for name in ("flash", "math", "auto", "default", "flash+expand_kv"):
        assert rows[name]["ms"] > 0 and rows[name]["max_rel_diff_from_math"] < bound


def test_bench_watch_times_a_watched_run_and_the_cube_writes(tmp_path, tiny_data_dir, tiny_vocab):
    overrides = tiny_overrides(tiny_vocab, tokens=640, milestones="log", n_log_milestones=3)  # 5 steps
    live = bench_watch.measure_watch(tiny_data_dir, "tiny", overrides, "cpu", "cpu", 0.05, 1, tmp_path)
    tokens = [r["tokens"] for r in live["checkpoints"]]
    written = sorted(int(p.name[7:19]) for p in (tmp_path / "run" / "checkpoints").glob("tokens_*"))
    assert tokens == written and live["cube_writes"] >= 1 and live["train_wall_s"] > 0
    assert live["checkpoints"][0]["train_s_since_previous"] is None
    assert all(r["extract_s"] >= 0 and r["train_s_since_previous"] >= 0 for r in live["checkpoints"][1:])
    rows = bench_watch.cube_write_costs("tiny", [1, 3])
    assert [r["steps"] for r in rows] == [1, 3] and rows[1]["file_mb"] > rows[0]["file_mb"]
    assert all(r["read_s"] > 0 and r["write_s"] > 0 for r in rows)


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh without CUDA: every part runs at CPU scale or says it is skipped (about 2 min)."""
    out = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--skip", "gpu_tests"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "needs CUDA: skipped" in proc.stdout and "the NCCL smoke test needs CUDA: skipped" in proc.stdout
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert result["cuda"] is False and parts["gpu_tests"]["status"] == "skipped"
    assert parts["peak"]["peak_tflops"] > 0
    assert parts["attention"]["status"] == "ok" and "ms" in parts["attention"]["settings"]["auto"]
    train = parts["train"]
    assert train["status"] == "ok" and train["scale"] == "cpu"
    assert sorted((r["qk_norm"], r["variant"]) for r in train["runs"]) == sorted(
        (qk, v) for qk in ("learned", "none") for v in ("adamw", "muon-torch", "muon-batched")
    )
    assert parts["extract"]["status"] == "ok" and parts["extract"]["command"]["cube_written"]
    assert parts["extract"]["in_process"]["ratio"] > 0
    assert parts["torchrun"]["status"] == "ok" and parts["torchrun"]["backend"] == "gloo"


def test_bench_open_cubes_measures_both_readers_and_they_print_the_same_table(tmp_path):
    pytest.importorskip("dask")
    bench = load_script("bench_open_cubes")
    cubes = bench.build_cubes(tmp_path / "runs", 3, steps=2, layers=1, heads=2, kv_heads=1, head_dim=4)
    rows = bench.benchmark(cubes, "pr_sv", tmp_path)
    assert [r["mode"] for r in rows] == ["imports", "eager", "dask"]
    assert all(r["exit_code"] == 0 and r["peak_rss_mib"] > 0 and r["seconds"] > 0 for r in rows)
    # 3 runs x 2 steps x (1 layer + "all") rows, and the same bytes from the lazy and the eager reader
    assert [(r["same_table"], r["table_rows"]) for r in rows[1:]] == [(True, 12), (True, 12)]
