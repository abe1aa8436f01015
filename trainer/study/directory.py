"""The study directory: a file contract written by ``collapse-train study`` and read by anyone.

Layout (docs/studies.md is the reference; spectra reads it by its format, never through this module)::

    STUDY_DIR/
        study.toml            the study as resolved: every default filled in, dataset paths absolute
        study.json            manifest: format "collapse-study", version, the study's sha256, one entry per run
        sweep.json            each configuration's learning-rate choice and the whole sweep table
        sweep.csv             the same table, one row per sweep run
        study.lock            held (fcntl.flock) by the one collapse-train study process working here,
                              removed when it ends
        sweep/<run>/          the sweep's run directories (ordinary run directories)
        runs/<run>/           the main runs, one per configuration and seed
        logs/sweep/<run>.log  each run's output (every attempt appended, with a header line)
        logs/runs/<run>.log
        slurm/                submitit's job files, with the slurm executor only

Every file but the logs is written atomically (:func:`trainer.fileio.atomic_write_text`). A
study directory belongs to one study: opening it with a study whose resolved form differs is
refused, with the differing keys named (:func:`study_differences`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainer.config import config_differences, differences_from_saved
from trainer.errors import TrainerError
from trainer.fileio import ExclusiveLock, atomic_write_text, describe_holder, live_holder
from trainer.provenance import utc_now
from trainer.rundir import CONFIG_FILE, RunState, read_config, read_run_state
from trainer.study.spec import PlannedRun, Study, SweepChoice, SweepResult

FORMAT = "collapse-study"
FORMAT_VERSION = 1
SWEEP_FORMAT = "collapse-sweep"
SWEEP_FORMAT_VERSION = 1
STUDY_TOML = "study.toml"
STUDY_JSON = "study.json"
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
LOCK_FILE = "study.lock"
SLURM_DIR = "slurm"
SWEEP_CSV_COLUMNS = (
    "label",
    "run",
    "multiplier",
    "muon_lr",
    "lr",
    "final_val_loss",
    "status",
    "chosen",
    "reason",
)
SELECTION_RULE = (
    "lowest validation loss at the last step of the sweep run (metrics.jsonl, kind=val, step=run.json "
    "final_step); diverged runs and non-finite losses excluded; losses within tie_tolerance of the lowest "
    "are tied and the lowest learning rate among them wins"
)


def study_sha256(study: Study) -> str:
    """sha256 of the resolved study's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(study.to_dict(), sort_keys=True).encode()).hexdigest()


def study_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved studies, configurations matched by label.

    A configuration saved without ``tokens`` (before configurations had their own) has the study's.

    >>> a = {"seeds": [0], "tokens": 8, "configurations": [{"label": "A", "qk_norm": "none"}]}
    >>> b = {"seeds": [0, 1], "tokens": 8, "configurations": [
    ...     {"label": "A", "qk_norm": "learned", "tokens": 8}, {"label": "B", "tokens": 8}]}
    >>> study_differences(a, b)  # doctest: +NORMALIZE_WHITESPACE
    ["configurations.A.qk_norm: 'none' (saved) != 'learned' (now)",
     "configurations.B: '<absent>' (saved) != {'tokens': 8, 'label': 'B'} (now)", 'seeds: [0] (saved) != [0, 1] (now)']
    """

    def keyed(study: dict[str, Any]) -> dict[str, Any]:
        configurations = study.get("configurations", [])
        by_label = {
            c.get("label", f"[{i}]"): {
                "tokens": study.get("tokens"),
                **c,
            }  # saved before per-configuration tokens
            for i, c in enumerate(configurations)
            if isinstance(c, dict)
        }
        return {**study, "configurations": by_label}

    return config_differences(keyed(saved), keyed(current))


def check_study_dir(out: Path, study: Study) -> bool:
    """Whether ``out`` already holds ``study``; refuse it if it holds another study or something else.

    Raises
    ------
    TrainerError
        ``out`` is not a directory; or is a non-empty directory without ``study.toml``; or its
        ``study.toml`` differs from ``study`` (every differing key is named); or its ``study.json``
        is of another format or a newer version.
    """
    if out.exists() and not out.is_dir():
        raise TrainerError(f"study directory {out} exists and is not a directory")
    toml_path = out / STUDY_TOML
    if not toml_path.exists():
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
        if others:
            raise TrainerError(
                f"{out} is not empty and holds no {STUDY_TOML}: it is not a study directory; choose another --out"
            )
        return False
    try:
        saved = tomllib.loads(toml_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainerError(
            f"{toml_path}: unreadable ({e}); it is not a study directory made by this tool"
        ) from None
    diffs = study_differences(saved, study.to_dict())
    if diffs:
        raise TrainerError(
            f"{out} was made from a different study ({STUDY_TOML} there differs): "
            + "; ".join(diffs)
            + "; use another --out, or the study file it was made from"
        )
    manifest = _read_json(out / STUDY_JSON)
    if manifest is not None and (
        manifest.get("format") != FORMAT
        or not isinstance(manifest.get("format_version"), int)
        or manifest["format_version"] > FORMAT_VERSION
    ):
        raise TrainerError(
            f"{out / STUDY_JSON}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION} or older"
        )
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise TrainerError(f"{path}: unreadable ({e})") from None


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out/study.lock`` exclusively (:class:`trainer.fileio.ExclusiveLock`) while the block runs.

    Like every lock of this package: the file names its holder (pid, host, start time, command line)
    for the message a second process gets, is removed when the block ends, and is released by the
    kernel when the process dies however it dies, so a file left by a killed runner is no stale lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(out / LOCK_FILE, f"study directory {out}"):
        yield


def lock_holder(out: Path) -> str | None:
    """Who holds ``out/study.lock`` (pid and host), or None when no study process works on ``out``."""
    holder = live_holder(out / LOCK_FILE)
    return None if holder is None else describe_holder(holder)


def sweep_result(out: Path, run: PlannedRun, state: RunState | None = None) -> SweepResult:
    """What the sweep run ``run`` of the study in ``out`` ended with, for :func:`trainer.study.spec.select_lr`."""
    state = state or read_run_state(out / run.run_dir)
    status = {"missing": "missing", "new": "running", "interrupted": "failed"}.get(state.status, state.status)
    return SweepResult(run.name, run.multiplier, run.lrs, status, state.final_val_loss, state.error)


def completed_config_differences(out: Path, run: PlannedRun, study: Study) -> list[str]:
    """Differences between a finished run's ``config.toml`` and the config the study plans for it.

    The study file cannot see a change of the base preset or file, or of this package's defaults;
    a finished run trained with other settings must not be counted as this study's run.
    """
    try:
        saved = read_config(out / run.run_dir)
    except TrainerError as e:
        return [str(e)]
    if saved is None:
        return [f"{out / run.run_dir / CONFIG_FILE}: missing"]
    return differences_from_saved(saved, run.config(study))


def write_study_toml(out: Path, study: Study, source: str) -> None:
    """Write ``study.toml`` (once: an existing one was checked equal by :func:`check_study_dir`)."""
    path = out / STUDY_TOML
    if path.exists():
        return
    header = f"# collapse-train study: the study resolved from {source} on {utc_now()}\n"
    atomic_write_text(path, header + study.to_toml())


def run_entry(run: PlannedRun, study: Study) -> dict[str, Any]:
    """The ``study.json`` entry of one run."""
    c = study.configuration(run.label)
    return {
        "name": run.name,
        "phase": run.phase,
        "label": run.label,
        "description": c.description,
        "qk_norm": c.qk_norm,
        "optimizer": c.optimizer,
        "data_class": run.data_class,
        "data_dir": run.data_dir,
        "seed": run.seed,
        "tokens": run.tokens,
        "lrs": run.lrs,
        "multiplier": run.multiplier,
        "run_dir": run.run_dir,
        "log": run.log,
    }


def choice_entry(choice: SweepChoice) -> dict[str, Any]:
    return {
        "status": choice.status,
        "reason": choice.reason,
        "run": choice.run,
        "multiplier": choice.multiplier,
        "lrs": choice.lrs,
        "val_loss": choice.val_loss,
    }


def _write_json_if_changed(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` unless the file already says the same apart from its ``updated`` time, so that a
    re-run with nothing new leaves the study's files (and what depends on their times) as they were."""
    previous = _read_json(path)
    if previous is not None:
        same = {k: v for k, v in previous.items() if k != "updated"} == {
            k: v for k, v in json.loads(json.dumps(document)).items() if k != "updated"
        }
        if same:
            return
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def _write_text_if_changed(path: Path, text: str) -> None:
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)


def write_study_json(
    out: Path, study: Study, runs: Sequence[PlannedRun], choices: dict[str, SweepChoice]
) -> dict[str, Any]:
    """Write ``study.json``: the manifest of every run of the study (``runs`` in plan order)."""
    previous = _read_json(out / STUDY_JSON) or {}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": study.name,
        "description": study.description,
        "study_sha256": study_sha256(study),
        "study_file": STUDY_TOML,
        "base": study.base,
        "seeds": list(study.seeds),
        "tokens": study.tokens,
        "created": previous.get("created") or utc_now(),
        "updated": utc_now(),
        "configurations": [
            {
                "label": c.label,
                "description": c.description,
                "qk_norm": c.qk_norm,
                "optimizer": c.optimizer,
                "data_class": c.data,
                "data_dir": study.data_dir(c),
                "sweep": c.sweep.enabled,
                "choice": choice_entry(choices[c.label]) if c.label in choices else None,
            }
            for c in study.configurations
        ],
        "runs": [run_entry(r, study) for r in runs],
    }
    _write_json_if_changed(out / STUDY_JSON, manifest)
    return manifest


def write_sweep_files(out: Path, study: Study, choices: dict[str, SweepChoice]) -> None:
    """Write ``sweep.json`` (choices and table) and ``sweep.csv`` (the table) for the swept configurations."""
    swept = [c for c in study.configurations if c.sweep.enabled and c.label in choices]
    rows = [row for c in swept for row in choices[c.label].rows]
    document = {
        "format": SWEEP_FORMAT,
        "format_version": SWEEP_FORMAT_VERSION,
        "study": study.name,
        "study_sha256": study_sha256(study),
        "rule": SELECTION_RULE,
        "updated": utc_now(),
        "configurations": {
            c.label: {
                **choice_entry(choices[c.label]),
                "tie_tolerance": c.sweep.tie_tolerance,
                "muon_adamw_lr": c.sweep.muon_adamw_lr,
            }
            for c in swept
        },
        "table": [
            {
                "label": r.label,
                "run": r.run,
                "run_dir": f"sweep/{r.run}",
                "multiplier": r.multiplier,
                "lrs": r.lrs,
                "final_val_loss": r.final_val_loss,
                "status": r.status,
                "chosen": r.chosen,
                "reason": r.reason,
            }
            for r in rows
        ],
    }
    _write_json_if_changed(out / SWEEP_JSON, document)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SWEEP_CSV_COLUMNS)
    for r in rows:
        writer.writerow(
            [
                r.label,
                r.run,
                repr(r.multiplier),
                repr(r.lrs["muon_lr"]) if "muon_lr" in r.lrs else "",
                repr(r.lrs["lr"]),
                "" if r.final_val_loss is None else repr(r.final_val_loss),
                r.status,
                "true" if r.chosen else "false",
                r.reason,
            ]
        )
    _write_text_if_changed(out / SWEEP_CSV, buffer.getvalue())
