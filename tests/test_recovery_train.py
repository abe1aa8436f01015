"""collapse-train run when things go wrong: kills at any moment, signals, locks, another dataset, debris,
file modes. Every refusal leaves the files around it byte for byte as they were."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    make_tiny_dataset,
    read_jsonl,
    small_filesystem,
    tiny_corpus,
    tiny_overrides,
    unwritable_directory,
)
from safetensors.torch import load_file

from cli.train import main as train_cli
from trainer.checkpoint import list_checkpoints
from trainer.config import load_config
from trainer.errors import RunLockedError, TrainerError, TrainingInterrupted
from trainer.fileio import ExclusiveLock, LockedError, default_mode
from trainer.resume import list_resume_states
from trainer.train import train

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures(
    "one_thread"
)  # bit-identical comparisons need the killed child's thread count


@pytest.fixture(scope="module")
def overrides(tiny_vocab) -> list[str]:
    return tiny_overrides(
        tiny_vocab, tokens=1536, log_every=1, resume_every=4, milestones="list", milestone_tokens=[640]
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data_dir, overrides) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
    return out


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def metrics_without_timing(run: Path) -> list[dict]:
    """metrics.jsonl without tokens_per_s, the one field that depends on the machine's load."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(run / "metrics.jsonl")]


def final_weights(run: Path) -> dict[str, bytes]:
    _, path = list_checkpoints(run / "checkpoints")[-1]
    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}


# A child process that trains and is stopped at an aimed moment: SIGKILL right after config.toml is written
# (the first second: run directory and config exist, no resume state yet), or SIGINT (once or twice) after
# the metrics line of a step.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import trainer.rundir as rundir_mod
    import trainer.train as train_mod
    from trainer.config import load_config
    from trainer.errors import TrainingInterrupted

    data_dir, out, moment, *overrides = sys.argv[1:]
    kind, _, where = moment.partition(":")
    if kind == "after-config":
        write = rundir_mod.atomic_write_text
        def write_then_die(path, text):
            write(path, text)
            if str(path).endswith("config.toml"):
                os.kill(os.getpid(), signal.SIGKILL)
        rundir_mod.atomic_write_text = write_then_die
    elif kind in ("sigint", "sigint-twice"):
        log = rundir_mod.MetricsLogger.log
        def log_then_signal(self, record):
            log(self, record)
            if record.get("kind") == "train" and record["step"] == int(where):
                os.kill(os.getpid(), signal.SIGINT)
                if kind == "sigint-twice":
                    os.kill(os.getpid(), signal.SIGINT)
        rundir_mod.MetricsLogger.log = log_then_signal
    try:
        train_mod.train(load_config("tiny", overrides), data_dir, out, progress=False)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    """
)


def run_child(tmp_path: Path, data_dir: Path, out: Path, moment: str, overrides: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), str(out), moment, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_a_run_killed_in_its_first_second_resumes_from_step_0(tmp_path, tiny_data_dir, overrides, reference):
    out = tmp_path / "run"
    proc = run_child(tmp_path, tiny_data_dir, out, "after-config", overrides)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "config.toml").is_file() and not list_resume_states(out)
    with pytest.raises(TrainerError, match="already exists"):  # a plain restart still refuses
        train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
    notes = []
    result = train(
        load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False, echo=notes.append
    )
    assert (
        result.status == "completed" and "killed before its first one): starting again at step 0" in notes[0]
    )
    assert final_weights(out) == final_weights(reference)
    assert metrics_without_timing(out) == metrics_without_timing(reference)
    record = json.loads((out / "run.json").read_text())
    assert [(s["start_step"], s["status"]) for s in record["segments"]] == [
        (0, "completed")
    ]  # killed before run.json


def test_sigint_stops_after_the_step_with_a_resume_state(tmp_path, tiny_data_dir, overrides, reference):
    out = tmp_path / "run"
    proc = run_child(tmp_path, tiny_data_dir, out, "sigint:7", overrides)
    assert proc.returncode == 130, proc.stderr
    assert "stopping after this step" in proc.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and record["final_step"] == 7
    assert record["error"] == (
        "stopped by SIGINT after step 7 of 12 (896 tokens); resume state written at step 7: continue with --resume"
    )
    assert list_resume_states(out)[-1][0] == 7  # not the periodic state of step 4: no step is lost
    train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)
    assert final_weights(out) == final_weights(reference)
    assert metrics_without_timing(out) == metrics_without_timing(reference)


def test_a_second_sigint_stops_at_once_and_names_the_newest_state(
    tmp_path, tiny_data_dir, overrides, reference
):
    out = tmp_path / "run"
    proc = run_child(tmp_path, tiny_data_dir, out, "sigint-twice:6", overrides)
    assert proc.returncode == 130, proc.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert "interrupted by SIGINT during step 7 of 12" in record["error"]
    assert "the newest resume state is at step 5: continue with --resume" in record["error"]
    train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)
    assert final_weights(out) == final_weights(reference)


def test_resume_on_another_dataset_is_refused_naming_both(tmp_path, tiny_data_dir, overrides, reference):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "run.json").write_text(
        json.dumps({**json.loads((out / "run.json").read_text()), "status": "interrupted"})
    )
    (tmp_path / "other").mkdir()
    other = make_tiny_dataset(tmp_path / "other", vocab_size=300, eval_seqs=2, eval_seq_len=32, seed=3)
    before = listing(out)
    with pytest.raises(TrainerError) as e:
        train(load_config("tiny", overrides), other, out, resume=True, progress=False)
    message = str(e.value)
    assert (
        f"was trained on {tiny_data_dir.resolve()}" in message
        and f"but --data is {other.resolve()}" in message
    )
    assert listing(out) == before


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, tiny_data_dir, overrides):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from trainer.fileio import ExclusiveLock\n"
            "with ExclusiveLock(sys.argv[1], 'x'):\n    print('held', flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = listing(out)
        with pytest.raises(
            RunLockedError, match=rf"run directory {out} is in use by process pid {holder.pid} on "
        ):
            train(load_config("tiny", overrides), tiny_data_dir, out, progress=False)
        assert listing(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the directory is usable at once
    assert train(load_config("tiny", overrides), tiny_data_dir, out, progress=False).status == "completed"
    assert not (out / ".lock").exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with ExclusiveLock(tmp_path / ".lock", "the thing"):
        with pytest.raises(LockedError, match="the thing is in use by process pid"):
            with ExclusiveLock(tmp_path / ".lock", "the thing"):
                pass
    with ExclusiveLock(tmp_path / ".lock", "the thing"):  # released: free again
        pass
    assert not (tmp_path / ".lock").exists()


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path, tiny_data_dir, overrides):
    out = tmp_path / "run"
    proc = run_child(tmp_path, tiny_data_dir, out, "sigint:5", overrides)
    assert proc.returncode == 130, proc.stderr
    ours = [
        ".run.json.x1.tmp",
        ".config.toml.x2.tmp",
        ".metrics.jsonl.x3.tmp",
        "checkpoints/.tokens_000000000640.safetensors.x4.tmp",
    ]
    theirs = ["notes.tmp", ".my-editor.swp", "checkpoints/README"]
    for name in ours + theirs:
        (out / name).write_text("left behind")
    (out / "resume" / ".tmp-step_00000009-abcd").mkdir()
    train(load_config("tiny", overrides), tiny_data_dir, out, resume=True, progress=False)
    assert not any((out / name).exists() for name in ours)
    assert not (out / "resume" / ".tmp-step_00000009-abcd").exists()
    assert all((out / name).read_text() == "left behind" for name in theirs)


def test_outputs_get_the_umask_mode(tmp_path, tiny_vocab):
    old = os.umask(0o027)
    try:
        data = make_tiny_dataset(tmp_path, vocab_size=300, eval_seqs=2, eval_seq_len=32)
        out = tmp_path / "run"
        cfg = load_config("tiny", tiny_overrides(tiny_vocab, tokens=256))
        train(cfg, data, out, progress=False)
        expected = default_mode()
        assert expected == 0o640
        files = [
            data / "eval_batch.safetensors",
            out / "config.toml",
            out / "run.json",
            out / "metrics.jsonl",
        ]
        files += [p for _, p in list_checkpoints(out / "checkpoints")]
        files += list(list_resume_states(out)[-1][1].iterdir())
        modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(expected)}, modes
        assert oct(list_resume_states(out)[-1][1].stat().st_mode & 0o777) == oct(default_mode(directory=True))
    finally:
        os.umask(old)


def test_interrupted_is_a_trainer_error_with_exit_status_130():
    assert issubclass(TrainingInterrupted, TrainerError) and TrainingInterrupted.exit_code == 130


def test_holder_details_survive_in_the_lock_file(tmp_path):
    with ExclusiveLock(tmp_path / ".lock", "x"):
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["since"] and "command" in info


# ----------------------------------------------------------------------------------------------------
# a full disk (a real one, a small tmpfs): one line naming the file, no temporary left, earlier files intact


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0].removeprefix("Error: ")


def test_a_full_disk_stops_a_run_with_one_line_naming_the_checkpoint(tmp_path, tiny_data_dir, overrides):
    # 64 KiB hold config.toml and run.json but not the first checkpoint (24k float32 weights, 97 KB)
    with small_filesystem(tmp_path / "disk", 64 * 1024) as disk:
        out = disk / "run"
        args = [
            "run",
            "tiny",
            "--data",
            tiny_data_dir,
            "--out",
            out,
            "--no-progress",
            *(f"--set={s}" for s in overrides),
        ]
        result = CliRunner().invoke(train_cli, [str(a) for a in args])
        checkpoint = out / "checkpoints" / "tokens_000000000000.safetensors"
        assert one_line_error(result) == f"no space left on device writing {checkpoint}"
        # no temporary checkpoint, no lock; what was written before is whole
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
            "checkpoints",
            "config.toml",
            "run.json",
        ]
        assert (out / "config.toml").read_text() == load_config("tiny", ['name="run"', *overrides]).to_toml()
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "failed" and f"writing {checkpoint}" in record["error"]


def test_a_full_disk_stops_prepare_data_with_one_line_naming_the_file(tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    with small_filesystem(tmp_path / "disk", 32 * 1024) as disk:  # the token files alone need about 40 KB
        (disk / "notes.txt").write_text("mine")
        out = disk / "tiny"
        args = ["prepare-data", "-o", out, "--source", source, "--vocab-size", "300", "--no-progress"]
        message = one_line_error(CliRunner().invoke(train_cli, [str(a) for a in args]))
        written = message.removeprefix(f"no space left on device writing {out}/")
        assert written in {"tokenizer.json", "train.bin", "val.bin", "test.bin", "eval_batch.safetensors"}, (
            message
        )
        assert sorted(p.name for p in disk.iterdir()) == ["notes.txt"]  # no build directory, no lock
        assert (disk / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------
# an unwritable place: one line naming the directory, before any work


@pytest.mark.parametrize("command", ["run", "run --resume", "prepare-data"])
def test_an_unwritable_output_directory_is_one_line_naming_it(tmp_path, tiny_data_dir, overrides, command):
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))

    def fill(directory: Path) -> None:  # a run directory made by a run that was killed before it began
        (directory / "killed").mkdir()
        (directory / "killed" / "config.toml").write_text(
            load_config("tiny", ['name="killed"', *overrides]).to_toml()
        )

    with unwritable_directory(tmp_path / "ro", fill) as ro:
        sets = [f"--set={s}" for s in overrides]
        args, where = {
            "run": (
                ["run", "tiny", "--data", tiny_data_dir, "--out", ro / "run", "--no-progress", *sets],
                ro,
            ),
            "run --resume": (
                [
                    "run",
                    "tiny",
                    "--data",
                    tiny_data_dir,
                    "--out",
                    ro / "killed",
                    "--resume",
                    "--no-progress",
                    *sets,
                ],
                ro / "killed",
            ),
            "prepare-data": (["prepare-data", "-o", ro / "data", "--source", source, "--no-progress"], ro),
        }[command]
        before = listing(ro)
        message = one_line_error(CliRunner().invoke(train_cli, [str(a) for a in args]))
        assert message.startswith("cannot write the ") and f": {where} is not writable (" in message, message
        assert listing(ro) == before
