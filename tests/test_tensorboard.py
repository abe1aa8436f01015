"""The trainer's own TensorBoard log (train.tensorboard): the metrics.jsonl numbers, once each, rank 0 only."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_jsonl, tiny_overrides

import trainer.train as train_mod
from trainer.config import load_config
from trainer.errors import TrainerError, TrainingInterrupted
from trainer.rundir import METRICS_FILE, TENSORBOARD_DIR
from trainer.tensorboard import TensorBoardLogger
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for ``log_dir`` (its own reader, orphaned points purged as it purges them)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()[SCALARS]}


def f32(x: float) -> float:
    """What TensorBoard keeps of a float: its float32 rounding."""
    return float(np.float32(x))


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars metrics.jsonl says the run's TensorBoard log holds (docs/training.md), tokens as the step."""
    out: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, tokens: int, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            out.setdefault(tag, []).append((tokens, f32(value)))

    for line in read_jsonl(run / METRICS_FILE):
        if line["kind"] == "train":
            add("loss/train", line["tokens"], line["train_loss"])
            for group, lr in line["lr"].items():
                add(f"lr/{group}", line["tokens"], lr)
            add("grad_norm", line["tokens"], line["grad_norm"])
            add("tokens_per_s", line["tokens"], line["tokens_per_s"])
        else:
            add("loss/val", line["tokens"], line["val_loss"])
    return out


def config(vocab: int, **train: object):
    # 10 steps of 128 tokens, a line per step, a resume state every 4 steps, checkpoints at the plan's points
    settings = {"tokens": 1280, "log_every": 1, "resume_every": 4, "tensorboard": True, **train}
    return load_config("tiny", tiny_overrides(vocab, **settings))


def test_the_log_holds_what_metrics_jsonl_says(tmp_path, tiny_data_dir, tiny_vocab):
    run = tmp_path / "run"
    train(config(tiny_vocab), tiny_data_dir, run, progress=False)
    want = expected(run)
    assert set(want) >= {"loss/train", "loss/val", "grad_norm", "tokens_per_s", "lr/muon", "lr/adamw_decay"}
    assert scalars(run / TENSORBOARD_DIR) == want


def test_a_resumed_run_shows_each_step_once(tmp_path, tiny_data_dir, tiny_vocab, monkeypatch):
    run = tmp_path / "run"
    read_steps = train_mod._read_steps

    def interrupted_after_step_6(r, read):
        if r.step == 7:  # steps 5 and 6 are logged past the resume state of step 4
            raise KeyboardInterrupt("SIGINT")
        return read_steps(r, read)

    monkeypatch.setattr(train_mod, "_read_steps", interrupted_after_step_6)
    with pytest.raises(TrainingInterrupted):
        train(config(tiny_vocab), tiny_data_dir, run, progress=False)
    assert max(t for t, _ in scalars(run / TENSORBOARD_DIR)["loss/train"]) == 6 * 128
    monkeypatch.setattr(train_mod, "_read_steps", read_steps)
    train(config(tiny_vocab), tiny_data_dir, run, resume=True, progress=False)
    shown = scalars(run / TENSORBOARD_DIR)
    assert [t for t, _ in shown["loss/train"]] == [128 * s for s in range(1, 11)]  # 5 and 6 once, not twice
    assert shown == expected(run)  # metrics.jsonl, truncated at step 4 and continued, agrees


def test_without_the_package_the_field_is_one_line_before_anything(
    tmp_path, tiny_data_dir, tiny_vocab, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(
        TrainerError, match=r"train.tensorboard = true needs the tensorboard package.*collapse\[tensorboard\]"
    ):
        train(config(tiny_vocab), tiny_data_dir, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_off_by_default_and_silent_on_other_ranks(tmp_path, tiny_data_dir, tiny_vocab):
    assert load_config("tiny").train.tensorboard is False
    run = tmp_path / "run"
    train(config(tiny_vocab, tokens=256, tensorboard=False), tiny_data_dir, run, progress=False)
    assert (run / METRICS_FILE).is_file() and not (run / TENSORBOARD_DIR).exists()
    quiet = TensorBoardLogger(tmp_path / "rank1", enabled=False)  # what a DDP rank other than 0 holds
    quiet.log_train(1, 128, 5.0, {"muon": 0.02}, 1.0, 100.0)
    quiet.log_val(1, 128, 5.0, None)
    quiet.close()
    assert not (tmp_path / "rank1").exists()
