"""Studies: the study file, the run plan, the learning-rate choice, the study directory, the runner.

Most runner tests train in this process through :func:`inprocess_launch` (the worker's own code, with
no process start-up), so that a whole study of tiny runs takes a second or two; the tests of the
child-process path (resume after a kill, a failing run, SLURM through submitit's local cluster)
launch real workers.
"""

from __future__ import annotations

import csv
import doctest
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from study_helpers import (
    HANG_GUARD_S,
    inprocess,
    inprocess_launch,
    tiny_study_text,
    tree_bytes,
    write_tiny_study,
)

import trainer.config
import trainer.study.directory
import trainer.study.executors
import trainer.study.slurm_queue
import trainer.study.spec
import trainer.train as train_mod
from cli.train import main as train_main
from trainer.config import ConfigError, load_config
from trainer.fileio import live_holder
from trainer.model import LLM
from trainer.rundir import lock_run_dir, read_run_state
from trainer.study.directory import check_study_dir, lock_holder, study_lock
from trainer.study.executors import (
    EXIT_LOCKED,
    LocalExecutor,
    RunnerInterrupted,
    RunOutcome,
    RunTask,
    SlurmExecutor,
    SlurmOptions,
    classify,
    worker_command,
)
from trainer.study.runner import StudyIncompleteError, plan_text, run_study, status_text
from trainer.study.spec import (
    SweepConfig,
    SweepResult,
    config_changes,
    configuration_config,
    load_study,
    main_runs,
    select_lr,
    study_names,
    sweep_grid,
    sweep_runs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def study_file(tmp_path, tiny_data_dir, tiny_vocab) -> Path:
    return write_tiny_study(tmp_path / "tiny-study.toml", tiny_data_dir, tiny_vocab)


# ----------------------------------------------------------------------------------------------------
# the study file


def test_shipped_studies_load_and_the_plan_matrix_is_the_plans():
    assert {"plan-25m", "plan-300m", "demo", "seed-muon", "seed-bf16"} <= set(study_names())
    plan = load_study("plan-25m")
    assert plan.base == "paper-88m" and plan.tokens == 25_000_000 and plan.seeds == (0,)
    cells = {c.label: (c.qk_norm, c.optimizer, c.data) for c in plan.configurations}
    assert cells == {
        "A1": ("learned", "muon", "standard"),
        "A2": ("none", "muon", "standard"),
        "B1": ("learned", "adamw", "standard"),
        "B2": ("none", "adamw", "standard"),
        "C1": ("learned", "muon", "simple"),
        "C2": ("learned", "muon", "complex"),
    }
    runs = [r for c in plan.configurations for r in main_runs(plan, c)]
    assert [r.name for r in runs] == ["A1-s0", "A2-s0", "B1-s0", "B2-s0", "C1-s0", "C2-s0"]
    cfg = runs[3].config(plan)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.tokens) == (512, 22, 25_000_000)
    assert (cfg.model.qk_norm, cfg.optim.name, cfg.name) == ("none", "adamw", "B2-s0")

    big = load_study("plan-300m")
    assert len(big.configurations) == 4 and big.seeds == (42, 43) and big.tokens == 300_000_000
    sweeps = [r for c in big.configurations for r in sweep_runs(big, c)]
    assert len(sweeps) == 20  # "20 short runs"
    assert {r.config(big).train.val_tokens for r in sweeps} == {5_000_000}

    demo = load_study("demo")
    assert demo.labels == ["A1", "A2", "B1", "B2", "C1", "C2"] and len(demo.seeds) == 2
    assert [Path(getattr(demo.datasets, k)).name for k in ("standard", "simple", "complex")] == [
        "bible-mix",
        "bible-bbe",
        "bible-kjv",
    ]
    assert all(c.sweep.enabled for c in demo.configurations)


def test_dry_run_of_the_plan_lists_its_runs_without_any_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no datasets here: a dry run needs none
    result = CliRunner().invoke(train_main, ["study", "plan-25m.toml", "--dry-run"])  # the shipped file
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "base paper-88m" in result.output and "6 main run(s)" in result.output
    assert f"standard {tmp_path}/data/edu-mix  (missing" in result.output
    a2 = next(line for line in lines if line.strip().startswith("runs/A2-s0"))
    assert 'model.qk_norm="none"' in a2 and "optim.name" not in a2 and "start" in a2
    c1 = next(line for line in lines if line.strip().startswith("runs/C1-s0"))
    assert "data=simple" in c1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": "[1]"}, "unknown config key(s): seed"),
        ({"seeds": '"0"'}, "seeds: expected a list"),
        ({"seeds": "[1, 1]"}, "seeds: expected distinct"),
        ({"seeds": "[]"}, "at least one seed"),
        ({"tokens": "-5"}, "tokens must be non-negative"),
        ({"set": '["optim.lrr=1"]'}, "set: unknown config key: optim.lrr"),
        ({"set": '["model.qk_norm=none"]'}, "set: model.qk_norm cannot be set here: use the configuration's"),
        ({"set": '["train.seed=3"]'}, "train.seed cannot be set here"),
        ({"set": '["model.n_heads=3"]'}, "set: model.n_heads=3 is not a multiple of model.n_kv_heads=2"),
        ({"base": '"no-such-preset"'}, "neither a preset"),
    ],
)
def test_study_file_errors_name_the_key(tmp_path, tiny_data_dir, tiny_vocab, change, message):
    path = tmp_path / "s.toml"
    path.write_text(tiny_study_text(tiny_vocab, **change).replace("DATA", str(tiny_data_dir)))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('qk_norm = "learned"', 'qk_norm = "learnd"', "configurations[0].qk_norm: 'learnd' is not one of"),
        ('qk_norm = "learned"\n', "", "missing config key(s): configurations[0].qk_norm"),
        ('label = "B"', 'label = "A"', "configurations[1].label: 'A' is used by two configurations"),
        ('label = "B"', 'label = "B/2"', "configurations[1].label: 'B/2' must start"),
        ('optimizer = "adamw"', 'optimizer = "sgd"', "configurations[1].optimizer: 'sgd' is not one of"),
        (
            'optimizer = "adamw"',
            'optimizer = "adamw"\ncolour = 1',
            "unknown config key(s): configurations[1].colour",
        ),
        ('optimizer = "adamw"', 'optimizer = "adamw"\ndata = "simple"', "datasets.simple: not given"),
        ("tokens = 640", "tokens = 640\nvalues = [0.01]", "sweep: give multipliers or values, not both"),
        ("multipliers = [0.5, 2.0]", "multipliers = [0.5, -2.0]", "sweep.multipliers: expected positive"),
        ("multipliers = [0.5, 2.0]", "multipliers = [2, 2.0]", "sweep.multipliers: [2.0, 2.0] repeats"),
        ("seed = 7", 'seed = 7\nset = ["optim.lr=1"]', "sweep.set: optim.lr cannot be set here"),
        ("seed = 7", 'seed = 7\nrule = "best"', "unknown config key(s): sweep.rule"),
        ("seed = 7", 'seed = 7\nselect = "best"', "sweep.select: 'best' is not one of"),
        (
            "sweep = { multipliers = [] }",
            'sweep = { multipliers = "x" }',
            "configurations[1].sweep.multipliers",
        ),
        ('standard = "DATA"', 'standard = "DATA"\nextra = "x"', "unknown config key(s): datasets.extra"),
    ],
)
def test_study_file_errors_in_tables(tmp_path, tiny_data_dir, tiny_vocab, old, new, message):
    text = tiny_study_text(tiny_vocab)
    assert old in text
    path = tmp_path / "s.toml"
    path.write_text(text.replace(old, new, 1).replace("DATA", str(tiny_data_dir)))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert message in str(err.value)


def test_frozen_qk_norm_and_per_configuration_overrides(tmp_path, tiny_vocab):
    text = tiny_study_text(tiny_vocab).replace(
        'qk_norm = "none"', 'qk_norm = "frozen"\nset = ["optim.lr=0.01"]'
    )
    path = tmp_path / "s.toml"
    path.write_text(text.replace("DATA", "data/tiny"))
    study = load_study(path)
    b = study.configuration("B")
    cfg = configuration_config(study, b)
    assert (cfg.model.qk_norm, cfg.optim.name, cfg.optim.lr) == ("frozen", "adamw", 0.01)
    assert [r.config(study).optim.lr for r in main_runs(study, b)] == [0.01, 0.01]  # no sweep: its own rate


def test_paths_resolve_against_the_study_file_or_the_working_directory(tmp_path, tiny_vocab, monkeypatch):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "base.toml").write_text('preset = "tiny"\n[optim]\nlr = 0.005\n')
    path = folder / "s.toml"
    text = tiny_study_text(tiny_vocab, base='"base.toml"', data_root='"../datasets"')
    path.write_text(text.replace("DATA", "tiny"))
    monkeypatch.chdir(tmp_path)
    study = load_study("studies/s.toml")
    assert study.base == str(folder / "base.toml") and study.data_root == str(tmp_path / "datasets")
    assert study.datasets.standard == str(tmp_path / "datasets" / "tiny")
    assert configuration_config(study, study.configuration("B")).optim.lr == 0.005  # the base file's
    # --data-root is a command-line path: relative to the working directory
    elsewhere = load_study(path, data_root="mine")
    assert elsewhere.datasets.standard == str(tmp_path / "mine" / "tiny")
    # a shipped study's relative paths are under the working directory
    assert load_study("demo").datasets.simple == str(tmp_path / "data" / "bible-bbe")
    absolute = load_study(path.with_name("s.toml"))
    assert absolute == study


def test_run_plan_configurations_x_seeds_and_the_sweep_grid(study_file, tiny_data_dir):
    study = load_study(study_file)
    a, b = study.configurations
    assert study.name == "tiny-study"  # the file's stem
    assert (a.sweep.tokens, a.sweep.seed, b.sweep.tokens, b.sweep.enabled) == (640, 7, 640, False)  # merged
    study_file.write_text(study_file.read_text().replace("tokens = 640\n", ""))
    assert load_study(study_file).configurations[0].sweep.tokens == 1280  # default: the study's tokens
    sweep = sweep_runs(study, a)
    assert [r.name for r in sweep] == ["A-x0.5", "A-x2"] and sweep_runs(study, b) == []
    assert [r.run_dir for r in sweep] == ["sweep/A-x0.5", "sweep/A-x2"]
    assert sweep[0].log == "logs/sweep/A-x0.5.log"
    cfg = sweep[1].config(study)
    base = configuration_config(study, a)
    assert (cfg.train.tokens, cfg.train.seed, cfg.name) == (640, 7, "A-x2")
    assert (cfg.optim.muon_lr, cfg.optim.lr) == (2 * base.optim.muon_lr, 2 * base.optim.lr)  # moved together
    pending = main_runs(study, a)
    assert [r.name for r in pending] == ["A-s0", "A-s1"] and all(r.lrs is None for r in pending)
    with pytest.raises(ConfigError, match="chosen by the sweep"):
        pending[0].config(study)
    for seed, run in zip((0, 1), main_runs(study, b)):
        cfg = run.config(study)
        assert (cfg.train.seed, cfg.train.tokens, cfg.model.qk_norm, cfg.optim.name) == (
            seed,
            1280,
            "none",
            "adamw",
        )
        assert run.data_dir == str(tiny_data_dir) and run.run_dir == f"runs/B-s{seed}"
    # the overrides go through load_config, so the config is exactly `collapse-train run`'s
    assert run.config(study) == load_config("tiny", list(run.overrides))
    assert config_changes(load_config("tiny"), cfg)[:2] == ["model.context_length=32", "model.d_ff=64"]


def test_sweep_grid_under_muon_and_adamw():
    muon = load_config("tiny")  # muon_lr 0.02, lr 0.003
    assert sweep_grid(muon, SweepConfig(multipliers=(0.5,), muon_adamw_lr="fixed")) == [
        (0.5, {"muon_lr": 0.01, "lr": 0.003})
    ]
    ((m, lrs),) = sweep_grid(muon, SweepConfig(values=(0.04,)))
    assert m == 2.0 and lrs == {"muon_lr": 0.04, "lr": 0.006}
    adamw = load_config("tiny", ["optim.name=adamw"])
    assert sweep_grid(adamw, SweepConfig(values=(0.001, 0.006))) == [
        (0.001 / 0.003, {"lr": 0.001}),
        (2.0, {"lr": 0.006}),
    ]


# ----------------------------------------------------------------------------------------------------
# choosing the learning rate


def result(name, m, status="completed", loss=None, error=None):
    return SweepResult(name, m, {"lr": m * 1e-3}, status, loss, error)


def test_selection_takes_the_lowest_final_validation_loss_and_excludes_divergence():
    choice = select_lr(
        "A",
        [
            result("A-x1", 1, loss=4.5),
            result("A-x2", 2, loss=4.1),
            result("A-x4", 4, "diverged", None, "non-finite loss at step 7"),
            result("A-x8", 8, loss=math.nan),
        ],
    )
    assert (choice.status, choice.run, choice.multiplier, choice.lrs, choice.val_loss) == (
        "chosen",
        "A-x2",
        2,
        {"lr": 2e-3},
        4.1,
    )
    reasons = {r.run: r.reason for r in choice.rows}
    assert reasons["A-x4"] == "excluded: diverged (non-finite loss at step 7)"
    assert reasons["A-x8"] == "excluded: non-finite final validation loss"
    assert reasons["A-x1"].startswith("higher final validation loss than A-x2")
    assert [r.chosen for r in choice.rows] == [False, True, False, False]


def test_selection_ties_go_to_the_lower_learning_rate():
    rows = [result("A-x4", 4, loss=4.1), result("A-x2", 2, loss=4.1), result("A-x1", 1, loss=4.3)]
    assert select_lr("A", rows).run == "A-x2"  # an exact tie, whatever the order of the runs
    choice = select_lr("A", rows, tie_tolerance=0.25)
    assert choice.run == "A-x1" and "tied with A-x2, A-x4 within 0.25" in choice.reason
    assert {r.run: r.reason.split(" (")[0] for r in choice.rows}["A-x4"] == "tied with A-x1"


def test_selection_waits_for_unfinished_runs_and_refuses_when_all_diverged():
    pending = select_lr("A", [result("A-x1", 1, loss=4.0), result("A-x2", 2, "failed")])
    assert pending.status == "pending" and pending.lrs is None and "A-x2 (failed)" in pending.reason
    dead = select_lr("A", [result("A-x1", 1, "diverged"), result("A-x2", 2, loss=math.inf)])
    assert dead.status == "all_diverged" and dead.lrs is None
    assert dead.reason == "every sweep run of configuration A diverged"


# ----------------------------------------------------------------------------------------------------
# the runner, in process


def test_a_study_runs_into_its_directory_and_a_rerun_touches_nothing(study_file, tmp_path):
    out = tmp_path / "study"
    lines: list[str] = []
    summary = run_study(study_file, out, executor=inprocess(), echo=lines.append)
    assert summary.complete and summary.counts == {"done": 6}
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["format"] == "collapse-study" and manifest["format_version"] == 1
    assert [(r["name"], r["phase"], r["run_dir"]) for r in manifest["runs"]] == [
        ("A-x0.5", "sweep", "sweep/A-x0.5"),
        ("A-x2", "sweep", "sweep/A-x2"),
        ("A-s0", "main", "runs/A-s0"),
        ("A-s1", "main", "runs/A-s1"),
        ("B-s0", "main", "runs/B-s0"),
        ("B-s1", "main", "runs/B-s1"),
    ]
    chosen = summary.choices["A"]
    entry = next(r for r in manifest["runs"] if r["name"] == "A-s1")
    assert entry["lrs"] == chosen.lrs and entry["multiplier"] == chosen.multiplier and entry["seed"] == 1
    assert entry["log"] == "logs/runs/A-s1.log" and (out / entry["log"]).is_file()
    assert (entry["qk_norm"], entry["optimizer"], entry["data_class"]) == ("learned", "muon", "standard")
    for r in manifest["runs"]:  # ordinary run directories, at the planned config
        run = out / r["run_dir"]
        assert json.loads((run / "run.json").read_text())["status"] == "completed"
        saved = tomllib.loads((run / "config.toml").read_text())
        assert saved["train"]["seed"] == r["seed"] and saved["name"] == r["name"]
        if r["lrs"] and "muon_lr" in r["lrs"]:
            assert saved["optim"]["muon_lr"] == r["lrs"]["muon_lr"]
    resolved = tomllib.loads((out / "study.toml").read_text())
    assert resolved["configurations"][1]["sweep"]["tokens"] == 640 and resolved["datasets"]["simple"] == ""

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["format"] == "collapse-sweep" and sweep["configurations"]["A"]["run"] == chosen.run
    assert "B" not in sweep["configurations"]  # no sweep, no table
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["run"] for row in table] == ["A-x0.5", "A-x2"]
    assert [row["chosen"] for row in table].count("true") == 1
    for row in table:
        val = json.loads((out / "sweep" / row["run"] / "metrics.jsonl").read_text().splitlines()[-1])[
            "val_loss"
        ]
        assert float(row["final_val_loss"]) == val  # the loss at the last step, as documented
    assert any(line.startswith("sweep A: chose ") for line in lines)
    assert sum("] start " in line for line in lines) == 6 and sum("] done " in line for line in lines) == 6

    before = tree_bytes(out / "runs") | tree_bytes(out / "sweep")
    lines.clear()
    run_study(study_file, out, executor=inprocess(), echo=lines.append)
    assert tree_bytes(out / "runs") | tree_bytes(out / "sweep") == before
    assert not any("] start " in line for line in lines)
    assert "sweep: 2 run(s): 2 finished (skipped), 0 to start, 0 to resume" in lines


def test_only_runs_the_named_configurations(study_file, tmp_path):
    out = tmp_path / "study"
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["B-s0", "B-s1"]
    assert not (out / "sweep").exists()
    with pytest.raises(ConfigError, match="--only: no configuration C"):
        run_study(study_file, out, only=["B,C"], executor=inprocess(), echo=lambda line: None)


def test_a_diverged_sweep_run_is_excluded_and_said(study_file, tmp_path, monkeypatch):
    """A-x2 really diverges (its forward pass returns NaN at the third step); A-x0.5 is chosen."""
    real_train, forward = train_mod.train, LLM.forward

    def train(cfg, *args, **kwargs):
        if cfg.name != "A-x2":
            return real_train(cfg, *args, **kwargs)
        calls = {"n": 0}

        def poisoned(self, idx, targets=None):
            out = forward(self, idx, targets)
            calls["n"] += self.training and targets is not None
            return out * math.nan if calls["n"] == 3 else out

        with monkeypatch.context() as m:
            m.setattr(LLM, "forward", poisoned)
            return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train", train)
    out = tmp_path / "study"
    lines: list[str] = []
    summary = run_study(study_file, out, only=["A"], executor=inprocess(), echo=lines.append)
    assert read_run_state(out / "sweep" / "A-x2").status == "diverged"
    assert summary.choices["A"].run == "A-x0.5" and summary.counts == {"done": 3, "diverged": 1}
    assert any("] diverged  sweep/A-x2" in line and "non-finite loss at step 3" in line for line in lines)
    table = {r["run"]: r for r in json.loads((out / "sweep.json").read_text())["table"]}
    assert table["A-x2"]["status"] == "diverged" and table["A-x2"]["reason"].startswith(
        "excluded: diverged ("
    )
    assert table["A-x2"]["final_val_loss"] is None and table["A-x0.5"]["chosen"]
    # not retried, and not trained again on a re-run
    assert (out / "logs/sweep/A-x2.log").read_text().count("=== attempt") == 1
    run_study(study_file, out, only=["A"], executor=inprocess(), echo=lines.append)
    assert (out / "logs/sweep/A-x2.log").read_text().count("=== attempt") == 1


def test_a_configuration_whose_every_sweep_run_diverged_is_an_error_naming_it(
    study_file, tmp_path, monkeypatch
):
    forward = LLM.forward
    monkeypatch.setattr(
        LLM, "forward", lambda self, idx, targets=None: forward(self, idx, targets) * math.nan
    )
    out = tmp_path / "study"
    lines: list[str] = []
    with pytest.raises(StudyIncompleteError, match="configuration A: every sweep run diverged"):
        run_study(study_file, out, only=["A"], executor=inprocess(), echo=lines.append)
    assert not (out / "runs").exists()  # no main run without a learning rate
    assert json.loads((out / "sweep.json").read_text())["configurations"]["A"]["status"] == "all_diverged"


def test_a_study_directory_of_another_study_is_refused_naming_the_change(study_file, tmp_path, tiny_vocab):
    out = tmp_path / "study"
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)
    before = tree_bytes(out)
    changed = tmp_path / "changed.toml"
    changed.write_text(
        study_file.read_text()
        .replace("seeds = [0, 1]", "seeds = [0, 2]")
        .replace('qk_norm = "none"', 'qk_norm = "frozen"')
    )
    with pytest.raises(Exception) as err:
        run_study(changed, out, executor=inprocess(), echo=lambda line: None)
    msg = str(err.value)
    assert "was made from a different study" in msg
    assert "configurations.B.qk_norm: 'none' (saved) != 'frozen' (now)" in msg
    assert "seeds: [0, 1] (saved) != [0, 2] (now)" in msg
    for command in ("--status", "--dry-run"):
        result = CliRunner().invoke(train_main, ["study", str(changed), "--out", str(out), command])
        assert result.exit_code == 1 and "was made from a different study" in result.output
    assert tree_bytes(out) == before
    # a directory that is not a study directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a study directory"):
        run_study(study_file, other, executor=inprocess(), echo=lambda line: None)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_finished_run_trained_with_another_config_is_refused(study_file, tmp_path):
    out = tmp_path / "study"
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)
    config = out / "runs" / "B-s0" / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.003", "lr = 0.004", 1))
    with pytest.raises(Exception, match=r"runs/B-s0 was trained with another config.*optim.lr: 0.004"):
        run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)


def test_one_study_process_per_directory(study_file, tmp_path):
    out = tmp_path / "study"
    with study_lock(out):
        assert lock_holder(out) == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(
            Exception, match=rf"study directory {out} is in use by process pid {os.getpid()} on"
        ):
            run_study(study_file, out, executor=inprocess(), echo=lambda line: None)
    assert lock_holder(out) is None
    assert not (out / "study.lock").exists()  # removed when its holder is done, like every lock (recovery.md)


def test_a_run_held_by_another_process_is_running_elsewhere_not_failed(study_file, tmp_path):
    def locked(task, env=None, **kwargs):
        if task.name == "B-s1":
            return RunOutcome(task.name, "locked", EXIT_LOCKED, "locked by pid 123")
        return inprocess_launch(task, env, **kwargs)

    out = tmp_path / "study"
    lines: list[str] = []
    executor = LocalExecutor(1, gpus=[], cpus=1, launch=locked)
    with pytest.raises(StudyIncompleteError, match="1 run\\(s\\) running elsewhere"):
        run_study(study_file, out, only=["B"], executor=executor, echo=lines.append)
    assert any("elsewhere runs/B-s1  another process holds it: locked by pid 123" in line for line in lines)
    assert not any("retrying" in line for line in lines)  # not a failure
    assert "summary: 2 run(s): 1 done, 0 diverged, 1 running elsewhere, 0 failed, 0 to do" in lines[-2]


def test_worker_exit_codes_classify_the_outcome(tmp_path):
    task = RunTask("r", "runs/r", "{}", "data", str(tmp_path / "r"), str(tmp_path / "r.log"))
    Path(task.log).write_text("=== attempt 1 ===\nstarting r\nerror: the run directory is locked by pid 9\n")
    assert classify(task, EXIT_LOCKED).status == "locked"
    assert classify(task, 1).message == "the run directory is locked by pid 9"
    assert classify(task, -9).message.startswith("killed by signal SIGKILL")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text('{"status": "completed"}')
    assert classify(task, -15).status == "completed"  # killed after it had finished


# ----------------------------------------------------------------------------------------------------
# executors: the --jobs cap, GPUs, threads


def fake_jobs(record: list, seconds: float = 0.15, together: int = 0):
    """A stand-in launch that records (name, start, end, env, threads) and sleeps.

    Tasks r0 .. r<together - 1> also wait until all of them are running (a barrier, at most 60 s), so their
    recorded spans overlap whatever the machine's speed or load: overlap from the sleeps alone would be a race.
    """
    lock = threading.Lock()
    barrier = threading.Barrier(together) if together else None

    def launch(task, env=None, *, threads=None, on_start=None, nproc=1):
        start = time.monotonic()
        if barrier is not None and int(task.name.removeprefix("r")) < together:
            barrier.wait(timeout=60)  # BrokenBarrierError if the executor never runs them side by side
        time.sleep(seconds)
        with lock:
            record.append((task.name, start, time.monotonic(), env, threads))
        return RunOutcome(task.name, "completed", 0)

    return launch


def max_overlap(record) -> int:
    events = sorted([(s, 1) for _, s, _, _, _ in record] + [(e, -1) for _, _, e, _, _ in record])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def tasks(n: int) -> list[RunTask]:
    return [RunTask(f"r{i}", f"runs/r{i}", "{}", "d", f"/nowhere/r{i}", "/nowhere/log") for i in range(n)]


def test_the_jobs_cap_holds_and_the_cores_are_split():
    record: list = []
    events: list = []
    ex = LocalExecutor(jobs=2, gpus=[], cpus=6, launch=fake_jobs(record, together=2))
    outcomes = ex.run(tasks(7), events.append)
    assert [o.name for o in outcomes] == [f"r{i}" for i in range(7)]  # in task order
    assert max_overlap(record) == 2  # the cap, and it is used (r0 and r1 met at the barrier)
    assert {(env["OMP_NUM_THREADS"], threads) for *_, env, threads in record} == {("3", 3)}
    starts = [e.time for e in events if e.kind == "start"]
    ends = sorted(e.time for e in events if e.kind == "end")
    assert all(sum(s <= t for s in starts) - sum(e <= t for e in ends) <= 2 for t in starts)


def test_one_run_per_gpu():
    record: list = []
    ex = LocalExecutor(jobs=8, gpus=["0", "3"], cpus=16, launch=fake_jobs(record, together=2))
    assert ex.jobs == 2 and ex.threads_per_job == 8
    ex.run(tasks(6), lambda event: None)
    assert max_overlap(record) == 2
    for gpu in ("0", "3"):  # the runs on one GPU never overlap
        spans = sorted((s, e) for _, s, e, env, _ in record if env["CUDA_VISIBLE_DEVICES"] == gpu)
        assert spans and all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert LocalExecutor(gpus=["0", "1", "2"]).jobs == 3 and LocalExecutor(gpus=[]).jobs == 1


# ----------------------------------------------------------------------------------------------------
# child processes: a failing run, a killed study, SLURM through submitit's local cluster


def test_a_failing_run_is_retried_once_and_does_not_stop_the_others(study_file, tmp_path):
    """B-s0 fails when it starts training (a checkpoint past its budget, which no config check sees)."""
    text = (
        study_file.read_text()
        .replace("multipliers = [0.5, 2.0]", "multipliers = []")
        .replace(
            "sweep = { multipliers = [] }",
            'sweep = { multipliers = [] }\nset = ["train.milestones=list", "train.milestone_tokens=[99999]"]',
        )
    )
    study_file.write_text(text.replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "study"
    lines: list[str] = []
    with pytest.raises(StudyIncompleteError, match="1 run\\(s\\) failed"):
        run_study(study_file, out, executor=inprocess(), echo=lines.append)
    assert read_run_state(out / "runs" / "A-s0").status == "completed"
    log = out / "logs" / "runs" / "B-s0.log"
    assert log.read_text().count("=== ") == 2  # the attempt and its one retry
    assert any("failed    runs/B-s0  attempt 1: train.milestone_tokens [99999] exceed" in x for x in lines)
    assert any("failed    runs/B-s0  attempt 2" in x and "giving up" in x for x in lines)
    assert any(x.strip().startswith("failed: runs/B-s0:") and str(log) in x for x in lines)


KILLER = r"""
import os, signal, sys
import trainer.rundir as rundir
log = rundir.MetricsLogger.log
def log_then_die(self, record):
    log(self, record)
    if record.get("kind") == "train" and record["step"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
rundir.MetricsLogger.log = log_then_die
from trainer.study.worker import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_study_killed_mid_way_resumes_and_leaves_finished_runs_byte_for_byte(study_file, tmp_path):
    """B-s0's child process is SIGKILLed after its 6th step (as an out-of-memory kill would): the runner
    goes on with B-s1, then dies itself when it retries B-s0. The next invocation resumes B-s0 and
    touches nothing else."""

    def b_s0_killed_then_the_study(task, env=None, *, threads=None, on_start=None, nproc=1):
        if task.name != "B-s0":
            return inprocess_launch(task)
        if task.attempt == 2:
            raise KeyboardInterrupt  # the study dies as it retries
        with open(task.log, "a") as log:
            log.write(f"=== attempt {task.attempt} of {task.name} ===\n")
            log.flush()
            command = [sys.executable, "-c", KILLER, "6", *worker_command(task)[3:]]
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        return classify(task, rc)

    out = tmp_path / "study"
    lines: list[str] = []
    executor = LocalExecutor(1, gpus=[], launch=b_s0_killed_then_the_study)
    with pytest.raises(
        RunnerInterrupted, match="interrupted by SIGINT; the runs in progress were told to stop"
    ):
        run_study(study_file, out, executor=executor, echo=lines.append)
    assert any(
        "failed    runs/B-s0  attempt 1: killed by signal SIGKILL" in x and "retrying" in x for x in lines
    )
    runs = [*(out / "sweep").iterdir(), *(out / "runs").iterdir()]
    assert {p.name: read_run_state(p).status for p in runs} == {
        "A-x0.5": "completed",
        "A-x2": "completed",
        "A-s0": "completed",
        "A-s1": "completed",
        "B-s0": "running",  # SIGKILL: no chance to record anything
        "B-s1": "completed",  # the crash of B-s0 did not stop it
    }
    assert lock_holder(out) is None  # the kernel released the study's lock
    status = status_text(study_file, out)
    assert "6 run(s): 5 done, 0 diverged, 0 running, 1 stopped, 0 failed, 0 to do" in status
    finished = [p for p in runs if p.name != "B-s0"]
    before = {p: tree_bytes(p) for p in finished}

    lines.clear()
    summary = run_study(study_file, out, executor=inprocess(), echo=lines.append)
    assert summary.complete
    assert {p: tree_bytes(p) for p in finished} == before  # not a byte, not an mtime changed
    record = json.loads((out / "runs/B-s0/run.json").read_text())
    assert record["status"] == "completed"
    assert [s["status"] for s in record["segments"]] == ["killed", "completed"]  # marked by the resume
    assert record["segments"][1]["start_step"] == 5  # the resume state of the plan checkpoint at step 5
    assert any("start     runs/B-s0" in x and "resume" in x for x in lines)
    assert "main: 4 run(s): 3 finished (skipped), 0 to start, 1 to resume" in lines


def start_study_process(study_file: Path, out: Path) -> subprocess.Popen:
    """``collapse-train study`` of B's two runs, two at a time, in a process of its own; the runs are long
    (4M tokens: 31,250 steps of the 24k-parameter model, minutes) so that they are still training whenever
    the test stops the study, which waits for a ``--status`` process first; their first checkpoint (the
    plan's 0.5/25 of the budget, 625 steps) comes within seconds, which is when the test sees them train.
    400k tokens could end before the signal on a loaded 2-core machine."""
    study_file.write_text(study_file.read_text().replace("tokens = 1280", "tokens = 4000000"))
    command = [sys.executable, "-m", "cli.train", "study", str(study_file), "--out", str(out), "--only", "B"]
    return subprocess.Popen(
        [*command, "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_until_training(proc: subprocess.Popen, out: Path) -> list[int]:
    """The pids of the workers of B-s0 and B-s1 (their run directories' lock holders), once both have logged a
    step: their stop handlers are then in place."""
    runs = [out / "runs" / "B-s0", out / "runs" / "B-s1"]
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        holders = [live_holder(run / ".lock") for run in runs]
        if all(holders) and all(read_run_state(run).tokens > 0 for run in runs):
            return [h["pid"] for h in holders]
        time.sleep(0.2)
    pytest.fail(f"the runs did not start training in {HANG_GUARD_S} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_the_study_and_its_runs_alike(study_file, tmp_path, signum):
    """Real processes: a runner and two workers. --status sees the live workers; SIGTERM (``kill``, a batch
    system) stops the study as Ctrl-C does: one line, exit status 130, each run told to stop and said to be
    stopped (not "retrying"), nothing left running."""
    out = tmp_path / "study"
    proc = start_study_process(study_file, out)
    pids = wait_until_training(proc, out)
    status = status_text(study_file, out)
    assert "2 running, 0 stopped" in status and all(f"(pid {pid} on " in status for pid in pids)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    name = signal.Signals(signum).name
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == [
        f"Error: interrupted by {name}; the runs in progress were told to stop (each writes a resume state and "
        "records where it stopped): run the study again to resume them"
    ]
    stopped = [line for line in stdout.splitlines() if "] stopped   runs/B-s" in line]
    assert len(stopped) == 2 and all("the next invocation resumes it" in line for line in stopped)
    assert "retrying" not in stdout and "failed" not in stdout
    assert not any(alive(pid) for pid in pids)  # the runner waited for them
    assert {read_run_state(out / "runs" / r).status for r in ("B-s0", "B-s1")} == {"interrupted"}
    assert "0 running, 2 stopped, 0 failed" in status_text(study_file, out)


@pytest.mark.slow
def test_a_killed_study_takes_its_runs_with_it(study_file, tmp_path):
    """SIGKILL leaves the runner no chance to forward anything: each worker notices its parent's death
    (``PR_SET_PDEATHSIG``) and stops as on SIGTERM, instead of training on unsupervised."""
    out = tmp_path / "study"
    proc = start_study_process(study_file, out)
    pids = wait_until_training(proc, out)
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + HANG_GUARD_S
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)
    runs = [out / "runs" / r for r in ("B-s0", "B-s1")]
    assert [read_run_state(run).status for run in runs] == ["interrupted", "interrupted"]  # not trained on
    # "stopped by SIGTERM after step N" (the usual); "interrupted by SIGTERM during step N" where the signal
    # came twice (gVisor sends the death signal for each thread of the parent that dies)
    assert all(" by SIGTERM " in read_run_state(run).error for run in runs)


@pytest.mark.slow
def test_slurm_executor_through_submitit_local_cluster(study_file, tmp_path):
    pytest.importorskip("submitit")
    study_file.write_text(study_file.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "study"
    executor = SlurmExecutor(out / "slurm", SlurmOptions(gpus_per_job=0, poll_s=0.2), cluster="local")
    lines: list[str] = []
    run_study(study_file, out, only=["B"], executor=executor, echo=lines.append)
    assert read_run_state(out / "runs" / "B-s0").status == "completed"
    assert any("] queued    runs/B-s0  SLURM job " in x for x in lines)
    assert any("] done      runs/B-s0" in x for x in lines)
    assert (out / "logs/runs/B-s0.log").read_text().startswith("=== ")


# ----------------------------------------------------------------------------------------------------
# --dry-run and --status


def test_dry_run_marks_what_a_run_would_do(study_file, tmp_path):
    out = tmp_path / "study"
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)
    (out / "runs" / "B-s1" / "run.json").write_text(
        (out / "runs" / "B-s1" / "run.json").read_text().replace('"completed"', '"running"')
    )
    text = plan_text(study_file, out)
    rows = {
        line.split()[0]: line
        for line in text.splitlines()
        if line.startswith("  sweep/") or line.startswith("  runs/")
    }
    assert list(rows) == ["sweep/A-x0.5", "sweep/A-x2", "runs/A-s0", "runs/A-s1", "runs/B-s0", "runs/B-s1"]
    assert "skip (completed)" in rows["runs/B-s0"] and " resume " in rows["runs/B-s1"]
    assert (
        " start " in rows["runs/A-s0"] and "optim.lr/optim.muon_lr: chosen by the sweep" in rows["runs/A-s0"]
    )
    assert "optim.muon_lr=0.04" in rows["sweep/A-x2"] and "train.seed=7" in rows["sweep/A-x2"]
    assert 'model.qk_norm="none"' in rows["runs/B-s1"] and "train.seed=1" in rows["runs/B-s1"]
    assert plan_text(study_file, only=["B"]).count("\n  runs/") == 2


def test_status_prints_the_summary_without_starting_anything(study_file, tmp_path):
    out = tmp_path / "study"
    result = CliRunner().invoke(train_main, ["study", str(study_file), "--out", str(out), "--status"])
    assert result.exit_code == 0 and "holds no study yet" in result.output and not out.exists()
    run_study(study_file, out, only=["B"], executor=inprocess(), echo=lambda line: None)
    before = tree_bytes(out)
    result = CliRunner().invoke(train_main, ["study", str(study_file), "--out", str(out), "--status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "no study process is working on it" in lines[0]
    assert "6 run(s): 2 done, 0 diverged, 0 running, 0 stopped, 0 failed, 4 to do" in lines[1]
    assert "tokens 2.56k of 6.40k" in lines[1]  # 2 x 1280 trained of 2 x 640 (sweep) + 4 x 1280 (main)
    b0 = next(line for line in lines if " B-s0 " in line)
    assert b0.split()[:3] == ["main", "B-s0", "done"] and "lr=0.003" in b0
    a0 = next(line for line in lines if " A-s0 " in line)
    assert "to do" in a0 and "chosen by the sweep" in a0
    assert any("sweep A: pending" in line for line in lines)
    assert tree_bytes(out) == before
    record = out / "runs" / "B-s1" / "run.json"
    record.write_text(record.read_text().replace('"completed"', '"running"'))
    with study_lock(out):  # a study process works on the directory, but no process trains B-s1: stopped
        assert "1 done, 0 diverged, 0 running, 1 stopped" in status_text(study_file, out)
    with lock_run_dir(out / "runs" / "B-s1"):  # a live process holds the run: running, whoever started it
        text = status_text(study_file, out)
        assert (
            "no study process is working on it" in text and "1 done, 0 diverged, 1 running, 0 stopped" in text
        )
        b1 = next(line for line in text.splitlines() if " B-s1 " in line)
        assert b1.split()[2] == "running" and b1.endswith(f"(pid {os.getpid()} on {os.uname().nodename})")
    assert "1 done, 0 diverged, 0 running, 1 stopped" in status_text(study_file, out)
    record.write_text(record.read_text().replace('"running"', '"interrupted"'))  # stopped by a signal
    assert "1 done, 0 diverged, 0 running, 1 stopped, 0 failed" in status_text(study_file, out)


def test_study_command_usage_errors(study_file):
    result = CliRunner().invoke(train_main, ["study", str(study_file)])
    assert result.exit_code == 2 and "--out is required" in result.output
    result = CliRunner().invoke(train_main, ["study", str(study_file), "--dry-run", "--status"])
    assert result.exit_code == 2 and "exclusive" in result.output
    result = CliRunner().invoke(train_main, ["study", "no-such-study", "--dry-run"])
    assert result.exit_code == 1 and "neither a shipped study" in result.output
    for option in ("--jobs", "--cpus-per-job", "--time"):  # a usage error, as extract's --jobs 0 is
        result = CliRunner().invoke(train_main, ["study", str(study_file), "--out", "x", option, "0"])
        assert (
            result.exit_code == 2
            and f"Invalid value for '{option}': 0 is not in the range x>=1" in result.output
        )
    result = CliRunner().invoke(train_main, ["study", str(study_file), "--out", "x", "--gpus-per-job", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output


def test_check_study_dir_accepts_an_empty_directory(tmp_path, study_file):
    (tmp_path / "empty").mkdir()
    assert check_study_dir(tmp_path / "empty", load_study(study_file)) is False


@pytest.mark.parametrize(
    "module",
    [
        trainer.study.spec,
        trainer.study.directory,
        trainer.study.executors,
        trainer.study.slurm_queue,
        trainer.config,
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted and not result.failed


def test_a_configuration_may_have_its_own_main_run_tokens(tmp_path, tiny_data_dir, tiny_vocab):
    path = write_tiny_study(tmp_path / "s.toml", tiny_data_dir, tiny_vocab)
    text = path.read_text().replace(
        'label = "B"\n', 'label = "B"\ntokens = 640\nset = ["train.val_tokens=128"]\n'
    )
    path.write_text(text)
    study = load_study(path)
    by_label = {c.label: c for c in study.configurations}
    assert study.tokens == 1280 and by_label["A"].tokens == 1280
    assert by_label["B"].tokens == 640  # its own, for its main runs only
    runs = main_runs(study, by_label["B"])
    assert [r.tokens for r in runs] == [640] * 2
    overrides = dict(o.split("=", 1) for o in runs[0].overrides)
    assert overrides["train.tokens"] == "640" and overrides["train.val_tokens"] == "128"


def test_the_seed_studies_split_float32_grid_from_the_dtype_block():
    grid, block = load_study("seed-muon"), load_study("seed-bf16")
    assert grid.tokens == 307_200 and len(grid.seeds) == 4 and len(grid.configurations) == 8
    assert block.tokens == 307_200 and len(block.seeds) == 4
    dtypes = {
        c.label: dict(o.split("=", 1) for o in c.set).get("train.weights_dtype") for c in block.configurations
    }
    assert dtypes == {
        "B16-MF": "bfloat16",
        "B16-AW": "bfloat16",
        "B16-AW-LR": "bfloat16",
        "F32-MF": None,
        "F32-AW": None,
    }
    unswept = [c.label for c in block.configurations if not c.sweep.enabled]
    assert unswept == ["B16-AW-LR"]  # the learning-rate control trains at the source's rate
