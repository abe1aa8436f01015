"""Peak memory and time of ``collapse-spectra metrics`` over many cubes, with and without dask (not a test).

    python benchmarks/bench_open_cubes.py                      # 200 cubes: 40 steps, 12 layers, 12 + 4 heads of 16
    python benchmarks/bench_open_cubes.py --cubes 20 --steps 5 --json

Builds ``--cubes`` synthetic cubes (every variable of docs/cube.md, random spectra from ``tests/helpers.make_cube``,
the schema-complete builder the tests use, varied per cube) in a temporary directory, then runs the ``metrics`` command over all
of them in a fresh process, twice:

- ``dask``: as installed with the ``dask`` extra, ``open_cubes`` opens them lazily (``spectra.lazy``);
- ``eager``: the same process with ``dask`` made unimportable first, as without the extra: every cube is loaded.

For each it prints the wall time and the process's peak resident memory (``ru_maxrss`` of that child alone,
from ``os.wait4``), and checks that both printed the same table. A third run, ``imports``, only imports the
command (``--help``): the memory every run starts from. Figures vary with the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # tests/helpers.py: the synthetic cube of the tests, one copy of it

from helpers import make_cube, write_cube  # noqa: E402

# run in the child: hide dask for "eager" before anything imports it, then the command as the CLI runs it
_CHILD = """
import atexit, os, sys
def peak():  # this process's own high-water mark (VmHWM: of its memory since exec, not of the parent)
    with open("/proc/self/status") as f, open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
atexit.register(peak)
if sys.argv[1] == "eager":
    sys.modules["dask"] = None  # import dask fails and find_spec('dask') is None: as without the extra
from cli.spectra import main
main(sys.argv[2:], prog_name="collapse-spectra")
"""


def build_cubes(
    root: Path, n: int, steps: int, layers: int, heads: int, kv_heads: int, head_dim: int
) -> list[Path]:
    """``n`` cubes ``root/run<i>/spectra.nc``: one random template (``make_cube``, whose SVDs are the slow part),
    then per cube its spectra times independent log-normal noise (sorted again, descending) and its own seed."""
    template = make_cube(steps=tuple(range(0, 100 * steps, 100)), n_layers=layers, n_heads=heads,
                         n_kv_heads=kv_heads, head_dim=head_dim)  # fmt: skip
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        ds = template.copy(deep=True)
        for name in ("q_sv", "k_sv", "wq_sv", "wk_sv"):
            noisy = ds[name].values * rng.lognormal(0.0, 0.2, ds[name].shape)
            ds[name].values = -np.sort(-noisy, axis=-1)
        ds.attrs.update(run_name=f"run{i:03d}", seed=i)
        paths.append(write_cube(root / f"run{i:03d}" / "spectra.nc", ds))
    return paths


def run_child(mode: str, args: list[str], stdout: Path) -> dict:
    """One fresh process: its wall time (s), peak resident memory (MiB) and exit status.

    The peak is the child's ``VmHWM`` (Linux), written by the child as it exits: ``ru_maxrss`` from ``wait4``
    would report at least this process's own size, which the child's image had before its ``exec``."""
    peak_file = stdout.with_suffix(".peak")
    env = {**os.environ, "BENCH_PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    with stdout.open("wb") as out:
        done = subprocess.run([sys.executable, "-c", _CHILD, mode, *args], cwd=REPO, stdout=out, env=env)
    return {
        "mode": mode,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mib": round(int(peak_file.read_text()) / 1024, 1),  # VmHWM is in kB
        "exit_code": done.returncode,
    }


def benchmark(cubes: list[Path], metric: str, work: Path) -> list[dict]:
    """The three runs of the module docstring; each row adds whether its table equals the eager one."""
    args = ["metrics", *map(str, cubes), "--metric", metric, "--format", "csv"]
    rows = [run_child("imports", ["metrics", "--help"], work / "imports.txt")]
    for mode in ("eager", "dask"):
        rows.append(run_child(mode, args, work / f"{mode}.csv"))
    eager = (work / "eager.csv").read_bytes()
    for row in rows[1:]:
        row["same_table"] = (work / f"{row['mode']}.csv").read_bytes() == eager
        row["table_rows"] = (work / f"{row['mode']}.csv").read_text().count("\n") - 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cubes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16, help="at most 24: make_cube's tokens per SVD")
    parser.add_argument("--metric", default="pr_sv")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-open-cubes-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        cubes = build_cubes(work / "runs", a.cubes, a.steps, a.layers, a.heads, a.kv_heads, a.head_dim)
        size = sum(p.stat().st_size for p in cubes)
        setup = {
            "cubes": a.cubes, "steps": a.steps, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "metric": a.metric, "files_mib": round(size / 2**20, 1),
            "build_seconds": round(time.perf_counter() - start, 1),
        }  # fmt: skip
        rows = benchmark(cubes, a.metric, work)
    if a.json:
        print(json.dumps({"setup": setup, "runs": rows}, indent=1))
        return
    print(", ".join(f"{k}={v}" for k, v in setup.items()))
    print(f"{'run':8} {'seconds':>8} {'peak MiB':>9}  same table as eager")
    for r in rows:
        print(f"{r['mode']:8} {r['seconds']:8.2f} {r['peak_rss_mib']:9.1f}  {r.get('same_table', '')}")
        if r["exit_code"] != 0:
            print(f"  exit code {r['exit_code']}", file=sys.stderr)


if __name__ == "__main__":
    main()
