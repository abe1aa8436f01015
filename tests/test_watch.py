"""collapse-spectra watch: a run measured while it trains, through extract's code and lock, with TensorBoard
scalars equal to what `metrics` prints, figures, studies, unreadable checkpoints, Ctrl-C and SIGTERM."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from click.testing import CliRunner
from helpers import checkpoint_files, make_run, tiny_overrides
from study_helpers import HANG_GUARD_S, inprocess, write_tiny_study

import spectra.extract.run as extract_run
import spectra.watch.loop as loop
from cli.spectra import main as spectra_main
from spectra.analysis.null import headline_with_null
from spectra.analysis.stats import run_summaries
from spectra.cube import CONVENTIONS, SITES, open_cube, open_cubes
from spectra.errors import SpectraError
from spectra.extract.run import extract
from spectra.figures.toolkit import is_own_figure
from spectra.fileio import ExclusiveLock, LockedError
from spectra.rundir import RUN_LOCK, RUN_RECORD, Training
from spectra.watch.figures import figure_files
from spectra.watch.follow import Followed, follow, is_over
from spectra.watch.loop import WatchStopped, watch
from spectra.watch.scalars import HEADLINE_TAG
from trainer.study.runner import run_study
from trainer.study.watcher import StudyWatch

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
FLOAT32_ROUNDING = 2.0**-24
"""TensorBoard keeps a scalar as float32: rounding a float64 to it errs by at most 2**-24 of the value."""


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard directory, through TensorBoard's own reader: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()[SCALARS]}


def metrics_csv(cube: Path, var: str, metric: str, site: str) -> pd.DataFrame:
    result = CliRunner().invoke(
        spectra_main,
        ["metrics", str(cube), "--var", var, "--metric", metric, "--site", site, "--format", "csv"],
    )
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.output))


def assert_same_cube(watched: Path, reference: Path) -> None:
    """Equal arrays and coordinates, equal attributes apart from the history of how each was made."""
    a, b = open_cube(watched), open_cube(reference)
    xr.testing.assert_identical(a.assign_attrs(history=""), b.assign_attrs(history=""))


def assert_scalars_are_metrics(cube: Path, log_dir: Path) -> None:
    """Every TensorBoard scalar of a run is what `collapse-spectra metrics` prints for its cube (float32)."""
    points = scalars(log_dir)
    tokens = open_cube(cube)["tokens"].values.tolist()
    for which, var in (("keys", "k_sv"), ("queries", "q_sv")):
        for convention in CONVENTIONS:
            for site in SITES:
                table = metrics_csv(cube, var, f"pr_{convention}", site)
                table = table[table["heads"] > 0]
                if table.empty:  # a site the model lacks: no curve
                    assert f"{which}_pr_{convention}/{site}" not in points
                    continue
                for layer, rows in table.groupby("layer", sort=False):
                    name = f"{which}_pr_{convention}" + (
                        f"/{site}" if layer == "all" else f"_by_layer/{site}/layer_{layer}"
                    )
                    want = [(int(t), float(np.float32(m))) for t, m in zip(rows["tokens"], rows["mean"])]
                    assert points[name] == want, name
                    assert [t for t, _ in want] == tokens
    # the headline fraction of the Gaussian null is the report's, at the final checkpoint: the same mean PR
    # summed in another order (summary_table vs the bootstrap's mean, each within n * 2**-53 of the exact sum
    # of n <= 8 heads) over the same null, then rounded to float32 for TensorBoard
    headline = headline_with_null(run_summaries(open_cube(cube), n_resamples=10), open_cube(cube))
    final_tokens, fraction = points["keys_pr_sv_fraction_of_null/normed"][-1]
    assert final_tokens == tokens[-1]
    want = float(headline["fraction_of_null"].iloc[0])
    assert fraction == pytest.approx(want, rel=FLOAT32_ROUNDING + 16 * 2.0**-53, abs=0)
    val = open_cube(cube)["val_loss"].values
    assert points["loss/val"] == [(t, float(np.float32(v))) for t, v in zip(tokens, val)]


# ----------------------------------------------------------------------------------------------------
# the whole thing: a run trained in a child process while watch follows it


def watch_in_thread(path: Path, **options) -> tuple[threading.Thread, list[str], threading.Event, list]:
    """``watch(path)`` in a thread (no signal handlers off the main thread); its lines, an event set when it
    says it is waiting for the path, and what it returned or raised."""
    lines: list[str] = []
    waiting = threading.Event()
    outcome: list = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting for"):
            waiting.set()

    def target() -> None:
        try:
            outcome.append(watch(path, echo=echo, **options))
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)
        finally:
            waiting.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, lines, waiting, outcome


def test_a_run_trained_in_a_child_process_is_watched_into_the_cube_extract_makes(
    tmp_path, tiny_data_dir, tiny_vocab
):
    run, tb = tmp_path / "runs" / "A1-s0", tmp_path / "tb"
    overrides = tiny_overrides(tiny_vocab, tokens=1280, milestones="log", n_log_milestones=6)  # 10 steps
    thread, lines, waiting, outcome = watch_in_thread(run, device="cpu", interval=0.05, tensorboard=tb)
    assert waiting.wait(HANG_GUARD_S) and not outcome, lines  # started before the run: it waits for it
    child = subprocess.run(
        [sys.executable, "-m", "cli.train", "run", "tiny", "--data", str(tiny_data_dir), "--out", str(run),
         "--no-progress", *[a for o in overrides for a in ("--set", o)]],
        cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the watch did not end when its run did"
    assert not isinstance(outcome[0], BaseException), outcome[0]
    checkpoints = checkpoint_files(run)
    assert outcome[0].added == {run: len(checkpoints)} and not outcome[0].unreadable
    progress = [line for line in lines if "mean key PR" in line and "tokens" in line]
    assert len(progress) == len(checkpoints)  # one line per checkpoint: run, tokens, mean key PR, seconds
    assert progress[0].startswith("A1-s0  tokens 0  mean key PR ") and progress[0].endswith(" s")
    assert any(line.startswith("A1-s0: training over (completed)") for line in lines)

    reference = tmp_path / "reference.nc"
    extract(run, out=reference, progress=False)
    assert_same_cube(run / "spectra.nc", reference)
    assert_scalars_are_metrics(run / "spectra.nc", tb / "A1-s0")

    before = scalars(tb / "A1-s0")
    files = sorted((tb / "A1-s0").iterdir())
    again = watch(run, device="cpu", interval=0.05, tensorboard=tb, echo=lambda line: None)
    assert again.added == {run: 0}
    assert scalars(tb / "A1-s0") == before and sorted((tb / "A1-s0").iterdir()) == files  # no point twice


def test_a_finished_run_is_extracted_and_its_scalars_written_once(tmp_path):
    run = make_run(tmp_path, steps=(0, 10, 20))  # checkpoints without a trainer: over from the start
    tb = tmp_path / "tb"
    extract(run, progress=False)  # a cube made before the watch: its scalars are written all the same
    lines: list[str] = []
    done = watch(run, device="cpu", tensorboard=tb, echo=lines.append)
    assert done.added == {run: 0} and not any("mean key PR" in line and "tokens" in line for line in lines)
    assert_scalars_are_metrics(run / "spectra.nc", tb / "test-run")
    assert [t for t, _ in scalars(tb / "test-run")[HEADLINE_TAG]] == [0, 640, 1280]


# ----------------------------------------------------------------------------------------------------
# a run that is trained "now": its lock held by this process, checkpoints added between two looks


@contextlib.contextmanager
def training(run: Path) -> Iterator[Callable[[str], None]]:
    """Make ``run`` look trained by a live process (run.json ``running``, its lock held by this one); yields
    ``finish(status)``, which records the status and lets go of the lock as a trainer does at its end."""
    (run / RUN_RECORD).write_text(json.dumps({"status": "running"}))
    # what a trainer's lock file records (docs/recovery.md); a holder on this host is alive while its pid is
    lock = run / RUN_LOCK
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def finish(status: str) -> None:
        (run / RUN_RECORD).write_text(json.dumps({"status": status}))
        lock.unlink()  # released, as the trainer's lock is removed when the run ends

    try:
        yield finish
    finally:
        lock.unlink(missing_ok=True)


def scripted_pauses(monkeypatch, *actions: Callable[[], None]) -> list[int]:
    """Replace the watch's sleep by ``actions``, one per pause; returns a list counting the pauses taken."""
    taken: list[int] = []

    def pause(_seconds: float) -> None:
        assert len(taken) < len(actions), "the watch looked more often than the test scripted"
        taken.append(1)
        actions[len(taken) - 1]()

    monkeypatch.setattr(loop, "_pause", pause)
    return taken


def test_an_unreadable_checkpoint_is_named_once_and_the_watch_goes_on(tmp_path, monkeypatch):
    run = make_run(tmp_path, steps=(0, 10, 20))
    later = tmp_path / "later.safetensors"
    shutil.move(checkpoint_files(run)[-1], later)  # step 20 lands during the watch
    bad = run / "checkpoints" / "tokens_000000000320.safetensors"  # step 5: damaged
    bad.write_bytes(checkpoint_files(run)[0].read_bytes()[:-100])
    lines: list[str] = []
    with training(run) as finish:
        scripted_pauses(
            monkeypatch,
            lambda: os.replace(later, run / "checkpoints" / "tokens_000000001280.safetensors"),
            lambda: finish("completed"),
        )
        done = watch(run, device="cpu", echo=lines.append)
    assert open_cube(run).step.values.tolist() == [0, 10, 20]  # extracted twice, the bad file met both times
    named = [line for line in lines if bad.name in line]
    assert len(named) == 1 and "could not be read" in named[0] and "truncated" in named[0]
    assert [p.name for p, _ in done.unreadable] == [bad.name] and done.added == {run: 3}


def test_the_command_reports_an_unreadable_checkpoint_and_exits_1(tmp_path):
    run = make_run(tmp_path, steps=(0, 10))
    bad = run / "checkpoints" / "tokens_000000000320.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(spectra_main, ["watch", str(run), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.count(f"checkpoint {bad.name} could not be read") == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: 1 problem(s)")
    assert open_cube(run).step.values.tolist() == [0, 10]


def test_a_run_of_only_a_damaged_checkpoint_is_reported_and_written_nowhere(tmp_path):
    run = make_run(tmp_path, steps=(0,))
    checkpoint_files(run)[0].write_bytes(b"junk")
    done = watch(run, device="cpu", echo=lambda line: None)
    assert len(done.unreadable) == 1 and not (run / "spectra.nc").exists()


# ----------------------------------------------------------------------------------------------------
# the same lock as extract: neither waits on the other's half-written cube


def test_the_watch_waits_for_an_extract_that_holds_the_cube(tmp_path, monkeypatch):
    run = make_run(tmp_path, steps=(0, 10))
    lock = ExclusiveLock(run / "spectra.nc", "cube")
    lock.__enter__()  # a concurrent `collapse-spectra extract` is writing this cube
    lines: list[str] = []

    def while_held() -> None:
        assert not (run / "spectra.nc").exists()  # nothing written past the lock
        lock.__exit__(None, None, None)  # the extract ends

    taken = scripted_pauses(monkeypatch, while_held)
    done = watch(run, device="cpu", echo=lines.append)
    assert taken == [1] and done.added == {run: 2}
    assert sum("is being written by" in line and "waiting for it" in line for line in lines) == 1
    reference = tmp_path / "reference.nc"
    extract(run, out=reference, progress=False)
    assert_same_cube(run / "spectra.nc", reference)


def test_an_extract_during_the_watchs_write_is_refused_and_the_cube_stays_whole(tmp_path, monkeypatch):
    run = make_run(tmp_path, steps=(0, 10, 20))
    extract(run, progress=False)
    (run / "spectra.nc").unlink()
    first = make_run(tmp_path / "first", steps=(0,))
    extract(first, progress=False)
    shutil.copy(first / "spectra.nc", run / "spectra.nc")  # the cube as a first pass left it: step 0
    before = (run / "spectra.nc").read_bytes()
    refused: list[BaseException] = []
    spectra_for_checkpoint = extract_run.spectra_for_checkpoint

    def measuring(*args, **kwargs):
        if not refused:  # the watch holds the cube's lock now: a user's extract comes
            with pytest.raises(LockedError) as e:
                extract(run, progress=False)
            refused.append(e.value)
            assert (run / "spectra.nc").read_bytes() == before
        return spectra_for_checkpoint(*args, **kwargs)

    monkeypatch.setattr(extract_run, "spectra_for_checkpoint", measuring)
    done = watch(run, device="cpu", echo=lambda line: None)
    assert refused and "is being written by" in str(refused[0]) and done.added == {run: 2}
    reference = tmp_path / "reference.nc"
    extract(run, out=reference, progress=False)
    assert_same_cube(run / "spectra.nc", reference)


# ----------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_watch_with_130_and_every_cube_whole(tmp_path, signum):
    run = make_run(tmp_path, steps=(0, 10))
    with training(run):  # a run that goes on for ever: only the signal ends the watch
        child = subprocess.Popen(
            [sys.executable, "-m", "cli.spectra", "watch", str(run), "--device", "cpu", "--interval", "0.1"],
            cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            measured = 0
            for line in child.stdout:  # the two checkpoints are in the cube when their lines are printed
                measured += "mean key PR" in line and " tokens " in line
                if measured == 2:
                    break
            child.send_signal(signum)
            _, err = child.communicate(timeout=HANG_GUARD_S)
        finally:
            child.kill()
    assert child.returncode == 130, err
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1].startswith(f"Error: watch stopped by {name}: 2 checkpoint(s) added")
    assert open_cube(run).step.values.tolist() == [0, 10]
    assert not list(run.glob(".spectra.nc.*")), "debris of the cube's write or lock"


def test_watch_stopped_is_exit_status_130():
    assert WatchStopped("x").exit_code == 130


# ----------------------------------------------------------------------------------------------------
# what is followed, and when it is over


def test_follow_tells_runs_studies_and_paths_still_to_come(tmp_path):
    assert follow(tmp_path / "later") == Followed(None, {})
    (tmp_path / "empty").mkdir()
    assert follow(tmp_path / "empty").kind is None
    run = make_run(tmp_path / "runs", steps=(0,))
    assert follow(run).kind == "run" and follow(tmp_path / "runs").runs == {run: "test-run"}
    with pytest.raises(SpectraError, match="not a file"):
        follow(checkpoint_files(run)[0])
    with pytest.raises(SpectraError, match="directory of checkpoint files"):
        follow(run / "checkpoints")


def test_a_study_is_over_when_its_process_is_gone_and_no_run_trains():
    a, b = Path("runs/a"), Path("runs/b")
    followed = Followed("study", {a: "a", b: "b"}, study_process={"pid": 1})
    done, never = Training("completed", None), Training("absent", None)
    assert not is_over(followed, {a: done, b: never})  # its process may still start b
    gone = Followed("study", {a: "a", b: "b"})
    assert is_over(gone, {a: done, b: never})  # nothing will start b now
    assert not is_over(gone, {a: done, b: Training("running", {"pid": 2})})  # a run still trains (SLURM)
    one = Followed("run", {a: "a"})
    assert not is_over(one, {a: Training("not started", None)})
    assert is_over(one, {a: Training("interrupted", None)})  # stopped: a resumed run is watched again


def test_a_directory_of_runs_is_watched_in_parallel(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, steps=(0, 10), name=name) for name in ("a", "b")]
    done = watch(root, device="cpu", jobs=2, echo=lambda line: None)
    assert done.added == {run: 2 for run in runs}
    for run in runs:
        assert open_cube(run).step.values.tolist() == [0, 10]


# ----------------------------------------------------------------------------------------------------
# --figures and the tensorboard extra


def test_figures_are_redrawn_and_a_users_file_is_never_replaced(tmp_path):
    run = make_run(tmp_path, steps=(0, 10))
    done = watch(run, device="cpu", figures=True, echo=lambda line: None)
    files = figure_files(run)
    assert [p.name for p in files] == ["trajectory.png", "trajectory.svg", "heatmap.png", "heatmap.svg"]
    assert all(is_own_figure(p) for p in files) and not done.problems

    other = make_run(tmp_path / "other", steps=(0,))
    mine = other / "figures" / "heatmap.png"
    mine.parent.mkdir()
    mine.write_bytes(b"a user's picture")
    done = watch(other, device="cpu", figures=True, echo=lambda line: None)
    assert mine.read_bytes() == b"a user's picture" and not (other / "figures" / "trajectory.png").exists()
    assert len(done.problems) == 1 and "was not written by collapse-spectra" in done.problems[0]
    assert open_cube(other).step.values.tolist() == [0]  # the cube is not held back by the figures


def test_without_tensorboard_installed_the_option_is_one_line_before_anything(tmp_path, monkeypatch):
    run = make_run(tmp_path, steps=(0,))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    result = CliRunner().invoke(spectra_main, ["watch", str(run), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 1 and "pip install 'collapse[tensorboard]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (run / "spectra.nc").exists() and not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------------------------------
# a study: collapse-train study --watch


@pytest.mark.slow
def test_a_study_with_watch_returns_with_every_main_runs_cube_complete(tmp_path, tiny_data_dir, tiny_vocab):
    study_file = write_tiny_study(tmp_path / "tiny.toml", tiny_data_dir, tiny_vocab)
    out = tmp_path / "study"
    lines: list[str] = []
    run_study(
        study_file, out, only=["B"], executor=inprocess(), watch=StudyWatch(interval=0.1), echo=lines.append
    )
    assert "watch: done; every main run's cube holds its checkpoints" in lines, lines
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert open_cube(run).step.values.tolist() == sorted(
            int(json.loads(line)["step"])
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "val"
        )
        assert scalars(out / "tensorboard" / run.name)[HEADLINE_TAG]
    assert open_cubes(out, on_skip=None).sizes["run"] == 2  # A was not run (--only B): it has no cube
