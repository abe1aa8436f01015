"""One prepared check of the GPU path (issue 9): correctness tests, throughput, extraction, torchrun.

    bash benchmarks/gpu_check.sh [OUTPUT.json]          # the entry point; it calls this script
    python benchmarks/gpu_check.py --out gpu_check.json [--budget-s 470]

The parts, in order, each in its own subprocess with its own time limit, all within ``--budget-s``
(default 470 s, under eight minutes; a part that would not fit is skipped and says so):

1. ``device``: torch and CUDA versions, the device's name, memory and capability, ``nvidia-smi``.
2. ``peak``: the measured rate of a large matmul (``bench_train.measure_peak_tflops``: bfloat16
   8192^3 on CUDA), the denominator of every MFU below.
3. ``attention``: ``bench_attention.py``: forward + backward of one layer's attention at the 88M shapes
   (batch 32 x 2048) under each ``train.sdpa_backend`` setting, or the reason a kernel cannot run.
4. ``gpu_tests``: ``pytest -m gpu`` (fused AdamW, the compiled batched Muon against torch.optim.Muon,
   the attention kernels' results against math, the bf16 compiled run, no host-device sync between
   log steps, NCCL under torchrun).
5. ``train``: ``bench_train.py --variants adamw,muon-torch,muon-batched`` on the ``paper-88m`` preset
   (compiled, bf16, chunked loss, the ``auto`` attention kernels) for QK-norm ``learned`` and ``none``
   at batch 32 and 16 x 2048: tokens/s, MFU against the measured peak, peak memory; one compilation
   per (QK-norm, batch) shared by the three optimizer set-ups.
6. ``extract``: ``collapse-spectra extract --device cuda`` on a ``paper-88m`` checkpoint (the wall time
   of the command, start-up and checkpoint read included) and ``bench_extract.py`` (in one process:
   a bare forward pass of the eval batch against the extraction of the checkpoint).
7. ``torchrun``: a 1-process ``torchrun`` run of the ``tiny`` preset on CUDA with the NCCL backend.

Every figure goes to one JSON file, rewritten atomically after each part, so an interrupted check
keeps what it measured. On a machine without CUDA the same script runs end to end: the parts that
need CUDA print a line saying they are skipped, and the same plumbing runs at CPU scale (the ``tiny``
preset, a few steps; ``gloo`` instead of NCCL), marked ``"scale": "cpu"`` in the JSON; those numbers
are a smoke test, not benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
FORMAT = "collapse-gpu-check"
FORMAT_VERSION = 1


class Check:
    """The results so far, the time budget, and how a part is run and recorded."""

    def __init__(self, out: Path, budget_s: float, cuda: bool):
        self.out, self.cuda = out, cuda
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.results: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "budget_s": budget_s,
            "cuda": cuda,
            "parts": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, part: str, result: dict[str, Any]) -> None:
        self.results["parts"][part] = result
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.out)
        status = result.get("status", "ok")
        note = f": {result['reason']}" if result.get("reason") else ""
        print(f"== {part}: {status}{note} ({self.results['elapsed_s']:.0f} s elapsed)", flush=True)

    def time_for(self, wanted: float, needed: float) -> float | None:
        """Seconds a step may take (at most ``wanted``), or None when fewer than ``needed`` are left."""
        left = self.left()
        return None if left < needed else min(wanted, left)

    def limit(self, part: str, wanted: float, needed: float) -> float | None:
        """:meth:`time_for` for a whole part; a part that does not fit is recorded as skipped."""
        limit = self.time_for(wanted, needed)
        if limit is None:
            reason = f"time budget: {self.left():.0f} s left, {needed:.0f} s needed"
            self.record(part, {"status": "skipped", "reason": reason})
        return limit

    def run(
        self, cmd: list[str], timeout: float, cwd: Path = REPO, env: dict | None = None
    ) -> dict[str, Any]:
        """Run ``cmd``; return its exit status, wall time and output (the last 4,000 characters)."""
        print("   $ " + " ".join(cmd), flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {
                "status": "timeout",
                "reason": f"over {timeout:.0f} s",
                "wall_s": timeout,
                "stdout": out,  # the JSON lines of what finished before the limit
                "output": out[-4000:],
            }
        wall = time.monotonic() - start
        status = "ok" if proc.returncode == 0 else "failed"
        return {
            "status": status,
            "returncode": proc.returncode,
            "wall_s": round(wall, 2),
            "stdout": proc.stdout,
            "output": (proc.stdout + proc.stderr)[-4000:],
        }


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    """Drop the full stdout (parsed already); keep the tail of the output only when something failed."""
    result = {k: v for k, v in result.items() if k != "stdout"}
    if result.get("status") == "ok":
        result.pop("output", None)
    return result


# ----------------------------------------------------------------------------------------------------
# the parts


def device_part(check: Check) -> None:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if check.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "name,driver_version,memory.total,power.limit,clocks.max.sm"
            r = subprocess.run(
                [smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True
            )
            info["nvidia_smi"] = r.stdout.strip()
        print(
            f"   {props.name}, {info['memory_gib']} GiB, capability {info['capability']}, torch {torch.__version__}"
        )
    else:
        from trainer.provenance import cpu_name

        info["name"] = cpu_name()
        print(f"   no CUDA device (torch {torch.__version__}): the CUDA-only parts below are skipped")
    check.record("device", {"status": "ok", **info})


def peak_part(check: Check) -> float | None:
    from bench_train import measure_peak_tflops  # beside this script, which is on sys.path[0]

    device = torch.device("cuda" if check.cuda else "cpu")
    peak = measure_peak_tflops(device)
    print(f"   {peak['dtype']} {peak['size']}^3 matmul: {peak['peak_tflops']:.3g} TFLOP/s")
    check.record("peak", {"status": "ok", **peak})
    return peak["peak_tflops"]


def attention_part(check: Check) -> None:
    limit = check.limit("attention", wanted=90, needed=15)
    if limit is None:
        return
    if check.cuda:
        shape = ["--preset", "paper-88m", "--device", "cuda", "--batch-size", "32", "--seq-len", "2048"]
        scale = "gpu"
    else:
        print(
            "   cuDNN and memory-efficient attention need CUDA: they report it; the rest at CPU scale (tiny)"
        )
        shape = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "256"]
        scale = "cpu"
    result = check.run([sys.executable, str(BENCH / "bench_attention.py"), *shape, "--json"], timeout=limit)
    rows = _json_lines(result.get("stdout", ""))
    settings = rows[0]["settings"] if rows else {}
    for name, row in settings.items():
        print(f"   {name:>19}: " + (f"{row['ms']:.2f} ms" if "ms" in row else f"cannot run ({row['error']})"))
    check.record("attention", {**_strip(result), "scale": scale, **(rows[0] if rows else {})})


def gpu_tests_part(check: Check) -> None:
    limit = check.limit("gpu_tests", wanted=180, needed=30)
    if limit is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            "tests",
        ]
        result = check.run(cmd, timeout=limit)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        failures = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                if case.find("failure") is not None or case.find("error") is not None:
                    counts["failed"] += 1
                    failures.append(name)
                elif case.find("skipped") is not None:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
    if not check.cuda and result["status"] == "ok":
        result["reason"] = f"{counts['skipped']} CUDA tests skipped by pytest: no CUDA device"
    check.record("gpu_tests", _strip({**result, **counts, "failures": failures}))


def train_part(check: Check, peak: float | None, args: argparse.Namespace) -> None:
    if check.cuda:
        preset, seq_len, batches, steps, warmup = "paper-88m", 2048, args.batch_sizes, args.steps, args.warmup
        scale, sets = "gpu", []
    else:
        print(
            "   paper-88m at 16 and 32 x 2048 needs CUDA: skipped; the same runs at CPU scale (tiny, 2 x 64)"
        )
        preset, seq_len, batches, steps, warmup = "tiny", 64, [2], 2, 1
        scale, sets = "cpu", ["train.compile=false"]
    runs: list[dict] = []
    problems: list[dict] = []
    for batch, qk in [(b, qk) for b in batches for qk in ("learned", "none")]:
        label = f"{preset} qk_norm={qk} batch {batch} x {seq_len}"
        limit = check.time_for(wanted=args.part_timeout, needed=60 if check.cuda else 5)
        if limit is None:
            problems.append(
                {"run": label, "status": "skipped", "reason": f"time budget: {check.left():.0f} s left"}
            )
            print(f"   {label}: skipped, time budget", flush=True)
            continue
        cmd = [
            sys.executable,
            str(BENCH / "bench_train.py"),
            *("--preset", preset, "--device", "cuda" if check.cuda else "cpu"),
            *("--batch-size", str(batch), "--seq-len", str(seq_len)),
            *("--steps", str(steps), "--warmup", str(warmup)),
            *("--variants", "adamw,muon-torch,muon-batched", "--json"),
            *("--set", f"model.qk_norm={qk}"),
            *(arg for s in sets for arg in ("--set", s)),
            *(["--peak-tflops", str(peak)] if peak else []),
        ]
        result = check.run(cmd, timeout=limit)
        rows = _json_lines(result.get("stdout", ""))
        runs += [{"scale": scale, "process_wall_s": result.get("wall_s"), **row} for row in rows]
        for row in rows:
            mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
            print(
                f"   {label} {row['variant']:>12}: {row['tokens_per_s']:>10,.0f} tokens/s{mfu}, "
                f"peak memory {row['peak_memory_bytes'] / 2**30:.1f} GiB",
                flush=True,
            )
        if result["status"] != "ok":
            problems.append({"run": label, **_strip(result)})
    status = "ok" if runs and not problems else ("failed" if not runs else "partial")
    check.record("train", {"status": status, "scale": scale, "runs": runs, "problems": problems})


def _write_checkpoint(preset: str, where: Path, seqs: int, seq_len: int) -> tuple[Path, Path]:
    """A randomly initialised checkpoint of ``preset`` and a random eval batch beside it."""
    from safetensors.torch import save_file

    from spectra.extract.load import eval_batch_sha256
    from trainer.checkpoint import save_checkpoint
    from trainer.config import load_config
    from trainer.model import LLM

    cfg = load_config(preset)
    seq_len = min(seq_len, cfg.model.context_length)
    ids = torch.randint(0, cfg.model.vocab_size, (seqs, seq_len), generator=torch.Generator().manual_seed(0))
    data = where / "data"
    data.mkdir(parents=True)
    batch = data / "eval_batch.safetensors"
    save_file({"input_ids": ids}, str(batch))
    torch.manual_seed(0)
    ckpt = where / "run" / "checkpoints" / "tokens_000000000000.safetensors"
    save_checkpoint(
        ckpt,
        LLM(cfg.model),
        {
            "model_config": cfg.to_dict()["model"],
            "run_config": cfg.to_dict(),
            "run_name": f"gpu-check-{preset}",
            "step": 0,
            "tokens": 0,
            "eval_batch_sha256": eval_batch_sha256(ids),
            "data_dir": str(data),
            "train_loss": float("nan"),
            "val_loss": float("nan"),
            "seed": 0,
            "versions": {"torch": torch.__version__},
        },
    )
    return ckpt, batch


def _console_script(name: str, module: str) -> list[str]:
    """The installed command next to this interpreter, or ``python -m module``."""
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


def extract_part(check: Check) -> None:
    limit = check.limit("extract", wanted=150, needed=20)
    if limit is None:
        return
    device = "cuda" if check.cuda else "cpu"
    preset, scale = ("paper-88m", "gpu") if check.cuda else ("tiny", "cpu")
    if not check.cuda:
        print(
            "   collapse-spectra extract --device cuda needs CUDA: skipped; the same at CPU scale (tiny, cpu)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, batch = _write_checkpoint(preset, Path(tmp), seqs=8, seq_len=512)
        cube = Path(tmp) / "spectra.nc"
        cmd = [
            *_console_script("collapse-spectra", "cli.spectra"),
            "extract",
            str(ckpt),
            "--batch",
            str(batch),
            "--out",
            str(cube),
            "--device",
            device,
            "--no-progress",
        ]
        cli = _strip(check.run(cmd, timeout=limit))
        cli["cube_written"] = cube.exists()
    limit = check.time_for(wanted=150, needed=20) or 1  # a too-short limit shows as a timeout below
    bench_cmd = [
        sys.executable,
        str(BENCH / "bench_extract.py"),
        "--preset",
        preset,
        "--device",
        device,
        "--seqs",
        "8",
        "--seq-len",
        "512",
        "--repeats",
        "3" if check.cuda else "1",
        "--json",
    ]
    bench = check.run(bench_cmd, timeout=limit)
    rows = _json_lines(bench.get("stdout", ""))
    in_process = rows[0] if rows else {}
    if in_process:
        print(
            f"   {preset}: command {cli.get('wall_s')} s; in process forward {in_process['forward_s']:.3f} s, "
            f"extraction {in_process['extract_s']:.3f} s ({in_process['ratio']:.2f}x)"
        )
    ok = cli["status"] == "ok" and cli["cube_written"] and bench["status"] == "ok"
    check.record(
        "extract",
        {
            "status": "ok" if ok else "failed",
            "scale": scale,
            "preset": preset,
            "command": cli,
            "in_process": in_process,
            "bench": _strip(bench),
        },
    )


def torchrun_part(check: Check) -> None:
    limit = check.limit("torchrun", wanted=120, needed=20)
    if limit is None:
        return
    backend = "nccl" if check.cuda else "gloo"
    if not check.cuda:
        print("   the NCCL smoke test needs CUDA: skipped; the same 1-process torchrun with gloo on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        words = "the cat sees a dog and the dog sees a bird by the old tree".split()
        text.write_text(
            "\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(400))
        )
        data = Path(tmp) / "data"
        prep = check.run(
            [
                *_console_script("collapse-train", "cli.train"),
                "prepare-data",
                "--out",
                str(data),
                "--source",
                str(text),
                "--vocab-size",
                "300",
                "--eval-seqs",
                "2",
                "--eval-seq-len",
                "64",
                "--no-progress",
            ],
            timeout=limit,
        )
        if prep["status"] != "ok":
            check.record("torchrun", {"status": "failed", "backend": backend, "prepare": _strip(prep)})
            return
        from trainer.data.dataset import TokenDataset

        vocab = TokenDataset.open(data).vocab_size
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            "-m",
            "cli.train",
            "run",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            "--tokens",
            "5120",
            *(
                "--set",
                f"model.vocab_size={vocab}",
                "--set",
                "train.batch_size=4",
                "--set",
                "train.seq_len=64",
            ),
            *("--set", f"train.device={'cuda' if check.cuda else 'cpu'}", "--set", "train.val_tokens=256"),
        ]
        result = _strip(check.run(cmd, timeout=max(min(limit - prep["wall_s"], check.left()), 1)))
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    ok = result["status"] == "ok" and run.get("status") == "completed" and run.get("world_size") == 1
    check.record(
        "torchrun",
        {
            "status": "ok" if ok else "failed",
            "backend": backend,
            "run_status": run.get("status"),
            "world_size": run.get("world_size"),
            "device": run.get("device"),
            "tokens_per_s": (run.get("segments") or [{}])[-1].get("tokens_per_s"),
            **result,
        },
    )


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    p.add_argument(
        "--out", type=Path, default=default_out, help=f"JSON file to write (default: {default_out})"
    )
    p.add_argument("--budget-s", type=float, default=470.0, help="time for the whole check (default: 470)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 16], help="train part, CUDA (default: 32 16)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per run, CUDA (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run, CUDA (default: 3)")
    p.add_argument("--part-timeout", type=float, default=150.0, help="limit per bench process (default: 150)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["gpu_tests", "train", "extract", "torchrun"],
        help="parts to skip",
    )
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s, cuda=torch.cuda.is_available())
    print(f"gpu_check: writing {args.out}", flush=True)
    device_part(check)
    peak = peak_part(check)
    for part, run in (
        ("attention", lambda: attention_part(check)),
        ("gpu_tests", lambda: gpu_tests_part(check)),
        ("train", lambda: train_part(check, peak, args)),
        ("extract", lambda: extract_part(check)),
        ("torchrun", lambda: torchrun_part(check)),
    ):
        if part in args.skip:
            check.record(part, {"status": "skipped", "reason": "--skip"})
            continue
        try:
            run()
        except Exception as e:  # recorded and reported, then the other parts still run
            check.record(
                part,
                {
                    "status": "failed",
                    "reason": f"{type(e).__name__}: {e}",
                    "output": traceback.format_exc()[-4000:],
                },
            )
    failed = [k for k, v in check.results["parts"].items() if v.get("status") in ("failed", "timeout")]
    print(f"gpu_check: {'all parts ran' if not failed else 'problems in ' + ', '.join(failed)}; {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
