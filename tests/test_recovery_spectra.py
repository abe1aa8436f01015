"""collapse-spectra when things go wrong: damaged cubes, unwritable outputs, locks, debris of killed runs,
report directories it did not make, Ctrl-C. Every refusal is one line with a non-zero exit, and the files
around it are byte for byte as they were."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_run, small_filesystem, synthetic_cube, unwritable_directory, write_cube

from cli.spectra import main
from spectra import report as rep
from spectra.cube import open_cube
from spectra.errors import SpectraError
from spectra.extract.run import extract
from spectra.fileio import ExclusiveLock
from spectra.rundir import find_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("runs"), steps=(0, 10))
    extract(run, progress=False)
    return run


@pytest.fixture()
def damaged(tmp_path, extracted) -> Path:
    """A copy of a cube with 8 KiB of random bytes written into its middle (a disk error, a partial copy)."""
    cube = tmp_path / "z.nc"
    data = bytearray((extracted / "spectra.nc").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8192] = np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    cube.write_bytes(bytes(data))
    return cube


@pytest.mark.parametrize("command", ["metrics", "report", "plot", "extract"])
def test_a_damaged_cube_is_one_line_and_left_as_it_is(tmp_path, extracted, damaged, command):
    before = damaged.read_bytes()
    args = {
        "metrics": ["metrics", damaged],
        "report": ["report", damaged, "-o", tmp_path / "rep"],
        "plot": ["plot", "trajectory", damaged, "-o", tmp_path / "t.png"],
        "extract": ["extract", extracted, "--out", damaged, "--no-progress"],
    }[command]
    assert_one_line_error(invoke(*args), f"{damaged}: not a readable NetCDF file")
    assert damaged.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "z.nc"
    ]  # no report directory, no figure, no temporary


@pytest.mark.parametrize("command", ["metrics-cube", "metrics-runs", "report", "extract"])
def test_a_cube_missing_a_variable_is_named_as_damaged_and_left_as_it_is(tmp_path, extracted, command):
    root = tmp_path / "runs"
    run = root / "a"
    shutil.copytree(extracted, run)
    shutil.copytree(
        extracted, root / "b"
    )  # a whole cube beside it: the damaged one must not turn into NaN rows
    cube = run / "spectra.nc"
    write_cube(cube, open_cube(cube).drop_vars("k_sv"))
    before = listing(root)
    args = {
        "metrics-cube": ["metrics", cube],
        "metrics-runs": ["metrics", root],
        "report": ["report", root, "-o", tmp_path / "rep", "--n-resamples", 100],
        "extract": ["extract", run, "--no-progress"],  # must not take it for complete, nor replace it
    }[command]
    assert_one_line_error(invoke(*args), f"{cube}: damaged cube: the variable k_sv is missing")
    assert listing(root) == before
    assert not (tmp_path / "rep").exists()


def test_extract_checks_its_output_before_computing(tmp_path, extracted, monkeypatch):
    import spectra.extract.run as extract_mod

    monkeypatch.setattr(extract_mod, "spectra_for_checkpoint", lambda *a, **k: pytest.fail("computed first"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke("extract", extracted, "--out", blocker / "cube.nc", "--no-progress")
    assert_one_line_error(
        result, f"cannot write the cube {blocker}/cube.nc: {blocker} is a file, not a directory"
    )
    result = invoke(
        "extract", extracted, "--out", tmp_path, "--no-progress"
    )  # click's own check: a usage error
    assert result.exit_code == 2 and f"'{tmp_path}' is a directory" in result.output


@pytest.mark.parametrize("command", ["extract", "report", "surgery", "plot", "eval", "eval-tasks"])
def test_an_unwritable_output_directory_is_one_line_naming_it(tmp_path, extracted, tiny_data_dir, command):
    def fill(directory: Path) -> None:  # a run without a cube, so that extract has something to write
        shutil.copytree(extracted, directory / "run", ignore=shutil.ignore_patterns("spectra.nc"))

    with unwritable_directory(tmp_path / "ro", fill) as ro:
        run = ro / "run"
        args, where = {
            "extract": (["extract", run, "--no-progress"], run),
            "report": (["report", extracted, "-o", ro / "report", "--n-resamples", 100], ro),
            "surgery": (["surgery", find_checkpoints(run)[-1], "--no-progress"], run),
            "plot": (["plot", "trajectory", extracted, "-o", ro / "t.png"], ro),
            "eval": (["eval", run, "--tasks", "any_task", "--no-progress"], run),
            "eval-tasks": (["eval-tasks", tiny_data_dir, "-o", ro / "tasks"], ro),
        }[command]
        before = listing(ro)
        assert_one_line_error(invoke(*args), f"{where} is not writable (")
        assert listing(ro) == before


def test_extract_into_a_locked_cube_is_refused_and_removes_only_its_own_debris(tmp_path, extracted):
    run = tmp_path / "run"
    shutil.copytree(extracted, run)
    (run / "spectra.nc").unlink()
    ours = run / ".spectra.nc.Xk1ll3d.tmp"
    theirs = run / ".surgery.nc.Xk1ll3d.tmp"
    ours.write_bytes(b"half a cube"), theirs.write_bytes(b"a running surgery's")
    with ExclusiveLock(run / "spectra.nc", "x"):
        result = invoke("extract", run, "--no-progress")
        assert_one_line_error(result, f"cube {run / 'spectra.nc'} is being written by process pid")
        assert ours.exists() and not (run / "spectra.nc").exists()
    assert invoke("extract", run, "--no-progress").exit_code == 0
    assert not ours.exists() and theirs.read_bytes() == b"a running surgery's"
    assert not (run / ".spectra.nc.lock").exists()


def test_metrics_and_report_skip_a_run_without_a_cube_and_say_so(tmp_path, extracted):
    root = tmp_path / "runs"
    shutil.copytree(extracted, root / "a")
    make_run(root, steps=(0,), name="b")  # checkpoints, never extracted
    result = CliRunner().invoke(main, ["metrics", str(root)])
    assert result.exit_code == 0, result.output
    assert (
        f"skipped {root / 'b'}: no spectra.nc (run `collapse-spectra extract {root / 'b'}`)" in result.output
    )
    result = CliRunner().invoke(main, ["metrics", str(root / "b")])
    assert_one_line_error(result, "no cubes to read", "no spectra.nc")
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(root), "-o", str(out), "--n-resamples", "100"])
    assert result.exit_code == 0, result.output
    assert f"skipped {root / 'b'}: no spectra.nc" in result.output
    assert f"Skipped {root / 'b'}: no spectra.nc" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# the report directory


@pytest.fixture(scope="module")
def cubes(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("cubes")
    return [
        write_cube(root / "a1-s0" / "spectra.nc", synthetic_cube("a1-s0")).parent,
        write_cube(root / "a2-s0" / "spectra.nc", synthetic_cube("a2-s0", qk_norm="none", rank=6.0)).parent,
    ]


def build(cubes, out, **kwargs):
    return rep.build_report(cubes, out, n_resamples=100, **kwargs)


def test_a_directory_that_is_not_a_reports_is_refused_before_anything(tmp_path, cubes):
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    before = listing(tmp_path)
    with pytest.raises(SpectraError, match=r"not a report directory \(no report-files.json\) and not empty"):
        build(cubes, out)
    assert listing(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_file_the_report_did_not_write_is_never_replaced(tmp_path, cubes):
    out = tmp_path / "report"
    build(cubes, out)
    (out / "figures" / "trajectory.png").unlink()
    (out / "figures" / "trajectory.png").write_bytes(b"my own figure")  # same name, not the report's any more
    manifest = (out / "report-files.json").read_text()
    (out / "report-files.json").write_text(manifest.replace('"figures/trajectory.png",', ""))
    before = listing(tmp_path)
    with pytest.raises(SpectraError, match=r"figures/trajectory.png was not written by a report"):
        build(cubes, out)
    assert listing(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # the staging directory is gone too


def test_a_rerun_keeps_the_users_files_and_drops_stale_figures(tmp_path, cubes):
    out = tmp_path / "report"
    build(cubes, out)
    (out / "notes.txt").write_text("mine")
    (out / "drafts").mkdir()
    (out / "figures" / "mine.png").write_bytes(b"my figure")
    build(cubes[:1], out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "drafts").is_dir()
    assert (out / "figures" / "mine.png").read_bytes() == b"my figure"
    assert not (out / "figures" / "heatmap_a2-s0.png").exists()  # the run is no longer in the report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_report_killed_midway_leaves_the_previous_one_whole(tmp_path, cubes, monkeypatch):
    import spectra.report.build as build_mod

    out = tmp_path / "report"
    build(cubes, out)
    before = listing(out)

    def killed(ctx, w):
        raise KeyboardInterrupt  # half the figures are drawn in the staging directory

    monkeypatch.setattr(build_mod, "SECTIONS", (*build_mod.SECTIONS[:7], killed))
    with pytest.raises(KeyboardInterrupt):
        build(cubes[:1], out)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_staging_directories_of_a_killed_report_are_removed_by_the_next(tmp_path, cubes):
    out = tmp_path / "report"
    stale = tmp_path / ".report.a1b2c3d4.tmp"  # what a SIGKILL during a report leaves
    (stale / "figures").mkdir(parents=True)
    (stale / "figures" / "trajectory.png").write_bytes(b"half")
    other = tmp_path / ".other.a1b2c3d4.tmp"  # another report's: maybe being built now
    other.mkdir()
    build(cubes, out)
    assert not stale.exists() and other.exists()


def test_a_report_directory_in_use_is_refused(tmp_path, cubes):
    out = tmp_path / "report"
    with ExclusiveLock(out, "x"):
        with pytest.raises(SpectraError, match=rf"report directory {out} is being written by process pid"):
            build(cubes, out)
    assert not out.exists()


def test_plot_never_replaces_a_figure_it_did_not_write(tmp_path, cubes):
    mine = tmp_path / "t.png"
    mine.write_bytes(b"\x89PNG my own picture")
    result = invoke("plot", "trajectory", *cubes, "-o", mine)
    assert_one_line_error(result, f"{mine} exists and was not written by collapse-spectra")
    assert mine.read_bytes() == b"\x89PNG my own picture" and not (tmp_path / "t.svg").exists()
    ours = tmp_path / "ours.png"
    assert invoke("plot", "trajectory", *cubes, "-o", ours).exit_code == 0
    assert invoke("plot", "waterfall", *cubes, "-o", ours).exit_code == 0  # its own figure: replaced


# ----------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_while_a_command_is_imported_is_one_line_and_exit_130(monkeypatch):
    import importlib

    real = importlib.import_module

    def interrupted(name, *args):
        if name == "cli.spectra.metrics":
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", interrupted)
    main.commands.pop("metrics", None)  # not imported yet in this process
    result = CliRunner().invoke(main, ["metrics", "x.nc"])
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == [
        "Error: interrupted (Ctrl-C); every file written so far is complete, and re-running the command "
        "continues where it can"
    ]


# ----------------------------------------------------------------------------------------------------
# a full disk (a real one, a small tmpfs): one line naming the file, no temporary left, earlier files intact

PAGE = 4096  # tmpfs allocates whole pages


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def test_a_full_disk_leaves_the_previous_cube_and_names_it(tmp_path):
    run = make_run(tmp_path, steps=(0, 10, 20))
    first = tmp_path / "first.nc"
    extract(run / "checkpoints" / "tokens_000000000000.safetensors", out=first, progress=False)
    # room for the one-step cube and two pages more: not for a temporary three-step cube beside it
    with small_filesystem(tmp_path / "disk", pages(first.stat().st_size) + 2 * PAGE) as disk:
        cube = disk / "spectra.nc"
        shutil.copyfile(first, cube)
        before = cube.read_bytes()
        result = invoke("extract", run, "--out", cube, "--no-progress")
        assert_one_line_error(result, f"no space left on device writing {cube}")
        assert cube.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["spectra.nc"]  # no temporary, no lock


def test_a_full_disk_leaves_the_previous_report_and_names_the_file(tmp_path, cubes):
    build(cubes, tmp_path / "first")
    report_bytes = sum(pages(p.stat().st_size) for p in (tmp_path / "first").rglob("*") if p.is_file())
    with small_filesystem(tmp_path / "disk", report_bytes + 16 * PAGE) as disk:  # not two reports
        out = disk / "report"
        shutil.copytree(tmp_path / "first", out)
        before = listing(out)
        result = invoke("report", *cubes, "-o", out, "--n-resamples", 100)
        assert_one_line_error(result, f"no space left on device writing {out}/")
        written = result.output.strip().split(f"writing {out}/")[1]
        assert (tmp_path / "first" / written).is_file(), written  # a file of the report, by its final name
        assert listing(out) == before
        assert sorted(p.name for p in disk.iterdir()) == ["report"]  # no staging directory, no lock


def test_a_parallel_extraction_names_a_damaged_checkpoint_and_extracts_the_rest(tmp_path):
    root = tmp_path / "runs"
    for name in ("a", "b"):
        make_run(root, steps=(0, 10, 20), name=name)
    bad = root / "a" / "checkpoints" / "tokens_000000000640.safetensors"
    bad.write_bytes(bad.read_bytes()[:-100])  # an interrupted copy
    result = invoke("extract", root, "--jobs", 2, "--no-progress")  # the error crosses from a worker process
    assert result.exit_code == 1, result.output
    assert result.output.count(str(bad)) == 2  # its run's "failed" line, and the command's error line
    failed = next(line for line in result.output.splitlines() if line.startswith("failed"))
    assert (
        "1 checkpoint(s) could not be read" in failed and "added: 0, 20" in failed and "truncated" in failed
    )
    assert open_cube(root / "a").step.values.tolist() == [0, 20]
    assert open_cube(root / "b").step.values.tolist() == [0, 10, 20]


# ----------------------------------------------------------------------------------------------------
# worker processes die with the command that started them

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
needs_proc = pytest.mark.skipif(
    not Path("/proc/self/stat").is_file(), reason="finds processes through Linux /proc"
)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None once it is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended; it only waits for a reaper


def _workers_of(pid: int) -> list[int]:
    """The multiprocessing workers whose parent is ``pid`` (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[1]) == pid:
            with contextlib.suppress(OSError):
                if b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _poll(condition, deadline_s: float) -> bool:
    """Whether ``condition()`` became true before the deadline (generous: this is not a speed test)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _kill_survivors(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@needs_proc
def test_sigkill_of_a_parallel_extraction_takes_its_workers_with_it(tmp_path):
    root = tmp_path / "runs"
    for name in ("a", "b"):  # enough checkpoints that a worker left alone would compute for minutes
        make_run(root, steps=tuple(range(0, 2000, 10)), name=name)
    parent = subprocess.Popen(
        [sys.executable, "-m", "cli.spectra", "extract", str(root), "--jobs", "2", "--no-progress", "--device", "cpu"],
        cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    try:
        assert _poll(lambda: len(_workers_of(parent.pid)) == 2, 120), "the workers never started"
        workers = _workers_of(parent.pid)
        parent.kill()
        parent.wait()
        assert _poll(lambda: not any(map(_alive, workers)), 30), "workers outlived the killed extraction"
    finally:
        parent.kill()
        _kill_survivors(workers)


@needs_proc
@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_exit_with_parent_ends_a_process_whose_parent_was_killed(mechanism):
    # the watchdog thread is what platforms without prctl get; forced here so that Linux tests it too
    child = (
        "import os, sys, time; import spectra.extract.workers as w\n"
        + ("w._kill_me_when_my_parent_dies = lambda: False\n" if mechanism == "watchdog" else "")
        + "w.exit_with_parent(int(sys.argv[1])); print(os.getpid(), flush=True); time.sleep(600)"
    )
    launcher = (  # the parent: starts the child, then waits to be killed
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())]); time.sleep(600)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher, child], cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE, text=True
    )
    pid = int(parent.stdout.readline())  # the child printed it once exit_with_parent had returned
    try:
        parent.kill()
        parent.wait()
        assert _poll(lambda: not _alive(pid), 30), f"{mechanism}: the child outlived its killed parent"
    finally:
        parent.kill()
        _kill_survivors([pid])
