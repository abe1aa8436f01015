"""What watching costs: extraction time per checkpoint against the training time between checkpoints (not a test).

    collapse-train prepare-data --out data/bible-mix                      # once
    python benchmarks/bench_watch.py --data data/bible-mix                # tiny on the CPU, ~42 checkpoints
    python benchmarks/bench_watch.py --cube-writes-only --preset paper-88m  # the cube's rewrite at 88M shapes
    python benchmarks/bench_watch.py --data data/edu-mix --preset paper-88m --device cuda:0 --watch-device cuda:1

Two parts:

- **live**: ``collapse-train run PRESET`` in a child process (``train.milestones=plan+log``, 48 log points: the
  dense trajectory of docs/dynamics.md) while :func:`spectra.watch.loop.watch` follows it in this process. Per
  checkpoint: when it landed (its file's time), the training time since the previous one, the watch's extraction
  time (its progress line) and the lag until it was in the cube; and how many times, and how long, the cube was
  written.
- **cube writes**: a cube of PRESET's shapes (random spectra) with ``n`` steps, then one more step added as an
  extraction adds it (read the cube, combine, write it atomically): the cost of one write at ``n`` checkpoints.
  A write rewrites the whole file, so a watch that wrote after every checkpoint would cost the sum over ``n``.

Both halves run with ``--threads`` torch threads each (1 by default: the two processes share the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PROGRESS = re.compile(
    r"^(?P<run>\S+)  tokens (?P<tokens>[\d,]+)  mean key PR (?P<pr>\S+)  (?P<seconds>[\d.]+) s$"
)
"""A progress line of the watch (docs/watching.md)."""


def cube_write_costs(preset: str, sizes: Sequence[int], repeats: int = 1) -> list[dict]:
    """Time adding one step to a cube of ``n`` steps of ``preset``'s shapes, for each ``n`` in ``sizes``."""
    from spectra.cube import CENTERINGS, SITES, combine_steps, open_cube, step_dataset, write_cube
    from trainer.config import load_config

    cfg = load_config(preset).model
    L, H, Hkv, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    rng = np.random.default_rng(0)

    def one_step(step: int):
        def spectra(heads: int) -> np.ndarray:  # descending, as singular values are
            return -np.sort(-rng.random((heads, len(SITES), len(CENTERINGS), D)))

        per_layer = {
            i: {
                "q_sv": spectra(H),
                "k_sv": spectra(Hkv),
                "q_energy": rng.random((H, len(SITES), D)),
                "k_energy": rng.random((Hkv, len(SITES), D)),
            }
            for i in range(L)
        }
        return step_dataset(
            per_layer, wq_sv=rng.random((L, H, D)), wk_sv=rng.random((L, Hkv, D)), q_gamma=rng.random((L, D)),
            k_gamma=rng.random((L, D)), step=step, tokens=step * 1000, train_loss=3.0, val_loss=3.0,
            attrs={"run_name": preset, "format": "collapse-spectra-cube", "format_version": "1"},
        )  # fmt: skip

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"cube-{n}.nc"
            write_cube(combine_steps(None, [one_step(s) for s in range(n)], "benchmark"), path)
            new = one_step(n)
            read_s, write_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                existing = open_cube(path)
                t1 = time.perf_counter()
                write_cube(combine_steps(existing, [new], "benchmark"), Path(tmp) / "out.nc")
                read_s.append(t1 - t0)
                write_s.append(time.perf_counter() - t1)
            rows.append(
                {
                    "steps": n,
                    "read_s": min(read_s),
                    "write_s": min(write_s),
                    "file_mb": path.stat().st_size / 1e6,
                }
            )
    return rows


def measure_watch(
    data: Path,
    preset: str,
    overrides: Sequence[str],
    device: str,
    watch_device: str,
    interval: float,
    threads: int,
    workdir: Path,
) -> dict:
    """Train ``preset`` in a child process while this process watches it; per-checkpoint figures and totals."""
    import torch

    import spectra.extract.run as extract_run
    from spectra.watch.loop import watch

    torch.set_num_threads(threads)
    run = workdir / "run"
    command = [sys.executable, "-m", "cli.train", "run", preset, "--data", str(data), "--out", str(run)]
    command += ["--device", device, "--no-progress", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    writes: list[float] = []
    write_cube = extract_run.write_cube

    def timed_write(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return write_cube(*args, **kwargs)
        finally:
            writes.append(time.perf_counter() - t0)

    lines: list[tuple[float, str]] = []
    extract_run.write_cube = timed_write
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        watch(
            run, device=watch_device, interval=interval, echo=lambda line: lines.append((time.time(), line))
        )
    finally:
        extract_run.write_cube = write_cube
        _, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"training failed ({child.returncode}): {err.strip().splitlines()[-1:]}")
    return _per_checkpoint(run, lines, writes)


def _per_checkpoint(run: Path, lines: list[tuple[float, str]], writes: list[float]) -> dict:
    landed = {
        int(p.name[len("tokens_") : -len(".safetensors")]): p.stat().st_mtime
        for p in (run / "checkpoints").glob("tokens_*.safetensors")
    }
    rows, previous = [], None
    for when, line in lines:
        m = PROGRESS.match(line)
        if not m:
            continue
        tokens = int(m["tokens"].replace(",", ""))
        rows.append(
            {
                "tokens": tokens,
                "train_s_since_previous": None if previous is None else landed[tokens] - landed[previous],
                "extract_s": float(m["seconds"]),
                "lag_s": when - landed[tokens],
            }
        )
        previous = tokens
    record = json.loads((run / "run.json").read_text())
    return {
        "checkpoints": rows,
        "cube_writes": len(writes),
        "cube_write_s": sum(writes),
        "train_wall_s": record["wall_time_s"],
        "tokens_per_s": record["segments"][-1]["tokens_per_s"],
    }


def _summary(live: dict) -> str:
    rows = live["checkpoints"]
    gaps = [r["train_s_since_previous"] for r in rows if r["train_s_since_previous"] is not None]
    extract = [r["extract_s"] for r in rows]
    lag = [r["lag_s"] for r in rows]
    return "\n".join(
        [
            f"{len(rows)} checkpoints; training {live['train_wall_s']:.1f} s ({live['tokens_per_s']:,.0f} tokens/s "
            f"overall, watched)",
            f"training between checkpoints: median {statistics.median(gaps):.2f} s, min {min(gaps):.2f} s, "
            f"max {max(gaps):.2f} s",
            f"extraction per checkpoint:    median {statistics.median(extract):.2f} s, max {max(extract):.2f} s, "
            f"total {sum(extract):.1f} s",
            f"cube written {live['cube_writes']} times, {live['cube_write_s']:.1f} s in all",
            f"lag from checkpoint to cube:  median {statistics.median(lag):.2f} s, max {max(lag):.2f} s",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared dataset directory (the live part)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    parser.add_argument("--device", default="cpu", help="the training's device")
    parser.add_argument("--watch-device", default="cpu", help="the watch's device")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between the watch's looks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--cube-sizes", default="1,10,25,50", help="steps of the cubes the write is timed on")
    parser.add_argument("--cube-writes-only", action="store_true", help="only the cube-write part")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    args = parser.parse_args(argv)
    result: dict = {"preset": args.preset}
    if not args.cube_writes_only:
        if args.data is None:
            parser.error("--data is needed for the live part (or --cube-writes-only)")
        overrides = ["train.milestones=plan+log", "train.n_log_milestones=48", *args.set]
        with tempfile.TemporaryDirectory() as tmp:
            result["live"] = measure_watch(
                args.data,
                args.preset,
                overrides,
                args.device,
                args.watch_device,
                args.interval,
                args.threads,
                Path(tmp),
            )
        if not args.json:
            print(f"live: {args.preset} trained on {args.device}, watched on {args.watch_device}, {args.threads} "
                  f"thread(s) each, a look every {args.interval:g} s; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} CPUs")  # fmt: skip
            print(_summary(result["live"]))
    sizes = [int(n) for n in args.cube_sizes.split(",")]
    result["cube_writes"] = cube_write_costs(args.preset, sizes)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"cube writes at {args.preset}'s shapes (one step added to a cube of n steps):")
    for row in result["cube_writes"]:
        print(
            f"  n = {row['steps']:>3}: read {row['read_s']:.3f} s, write {row['write_s']:.3f} s, file {row['file_mb']:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
