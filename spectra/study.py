"""Read a study directory (docs/studies.md) by its file format: which runs it holds, their configuration
labels and seeds, and the learning-rate sweep's table and choices.

The study directory is a file contract between the trainer (``collapse-train study`` writes it) and
spectra: this module reads ``study.json`` and ``sweep.json`` on its own and never imports the trainer's
study code. No torch, so a notebook reads studies on any machine.

Examples
--------
>>> from spectra.study import read_study
>>> study = read_study("studies/demo")                                   # doctest: +SKIP
>>> study.runs(phase="main")[["name", "label", "seed", "run_dir"]]       # doctest: +SKIP
>>> study.sweep_table()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from spectra.errors import SpectraError
from spectra.fileio import live_holder

STUDY_FORMAT = "collapse-study"
STUDY_FORMAT_VERSION = 1
SWEEP_FORMAT = "collapse-sweep"
SWEEP_FORMAT_VERSION = 1
MANIFEST = "study.json"
SWEEP_FILE = "sweep.json"
STUDY_LOCK = "study.lock"
"""Held by the one ``collapse-train study`` process working on a study directory (docs/studies.md)."""
PHASES = ("main", "sweep")

PathLike = str | os.PathLike[str]


def is_study_dir(path: PathLike) -> bool:
    """Whether ``path`` is a directory holding a study manifest (``study.json``)."""
    return (Path(path) / MANIFEST).is_file()


def _read_json(path: Path, fmt: str, newest: int) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpectraError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise SpectraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else None
        raise SpectraError(f"{path}: not a {fmt} file (format = {got!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= newest:
        raise SpectraError(
            f"{path}: {fmt} format_version {version!r} is not readable here (it reads 1 to {newest})"
        )
    return data


def study_process(path: PathLike) -> dict[str, Any] | None:
    """The live ``collapse-train study`` process working on the study directory ``path`` (its lock's holder:
    pid, host, ...), or None when none is; looking takes no lock (:func:`spectra.fileio.live_holder`)."""
    return live_holder(Path(path) / STUDY_LOCK)


@dataclass(frozen=True)
class Study:
    """A study directory as its files describe it."""

    path: Path
    """The study directory."""
    manifest: dict[str, Any]
    """``study.json``."""
    sweep: dict[str, Any] | None
    """``sweep.json``, or None before the sweep phase has written it (or for a study without sweeps)."""

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name))

    def configurations(self) -> pd.DataFrame:
        """One row per configuration, in the study file's order: ``label``, ``description``, ``qk_norm``,
        ``optimizer``, ``data_class``, ``data_dir``, ``sweep`` (has one), and its choice's ``status``,
        ``multiplier``, ``lrs``, ``val_loss``, ``reason``, ``run``."""
        rows = []
        for c in self.manifest.get("configurations", []):
            choice = c.get("choice") or {}
            rows.append(
                {
                    **{
                        k: c.get(k)
                        for k in ("label", "description", "qk_norm", "optimizer", "data_class", "data_dir")
                    },
                    "sweep": bool(c.get("sweep")),
                    "status": choice.get("status"),
                    "multiplier": choice.get("multiplier"),
                    "lrs": choice.get("lrs"),
                    "val_loss": choice.get("val_loss"),
                    "reason": choice.get("reason", ""),
                    "run": choice.get("run"),
                }
            )
        return pd.DataFrame(rows)

    def runs(self, phase: str | None = None) -> pd.DataFrame:
        """One row per run of ``study.json`` (``phase``: ``main``, ``sweep`` or None for both), with the
        absolute ``path`` of its run directory."""
        if phase is not None and phase not in PHASES:
            raise SpectraError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        rows = [dict(r) for r in self.manifest.get("runs", []) if phase is None or r.get("phase") == phase]
        for r in rows:
            if not isinstance(r.get("run_dir"), str):
                raise SpectraError(f"{self.path / MANIFEST}: run {r.get('name')!r} has no run_dir")
            r["path"] = str((self.path / r["run_dir"]).resolve())
        return pd.DataFrame(rows)

    def run_dirs(self, phase: str = "main") -> list[Path]:
        """The run directories of one phase, in the manifest's order."""
        table = self.runs(phase)
        return [Path(p) for p in table["path"]] if len(table) else []

    def sweep_table(self) -> pd.DataFrame:
        """The sweep's whole table (``sweep.json``): ``label``, ``run``, ``multiplier``, ``muon_lr``, ``lr``,
        ``final_val_loss``, ``status``, ``chosen``, ``reason``; empty when the study has no sweep yet."""
        if self.sweep is None:
            return pd.DataFrame(
                columns=[
                    "label",
                    "run",
                    "multiplier",
                    "muon_lr",
                    "lr",
                    "final_val_loss",
                    "status",
                    "chosen",
                    "reason",
                ]
            )
        rows = []
        for r in self.sweep.get("table", []):
            lrs = r.get("lrs") or {}
            loss = r.get("final_val_loss")
            rows.append(
                {
                    "label": r.get("label"),
                    "run": r.get("run"),
                    "multiplier": r.get("multiplier"),
                    "muon_lr": lrs.get("muon_lr", math.nan),
                    "lr": lrs.get("lr", math.nan),
                    "final_val_loss": math.nan if loss is None else float(loss),
                    "status": r.get("status"),
                    "chosen": bool(r.get("chosen")),
                    "reason": r.get("reason", ""),
                }
            )
        return pd.DataFrame(rows)

    def run_labels(self) -> dict[str, dict[str, Any]]:
        """Absolute run directory -> its ``label``, ``data_class``, ``phase``, ``seed`` and ``description``."""
        table = self.runs()
        keys = ("label", "data_class", "phase", "seed", "description")
        return (
            {row["path"]: {k: row.get(k) for k in keys} for _, row in table.iterrows()} if len(table) else {}
        )


def read_study(path: PathLike) -> Study:
    """Read a study directory's ``study.json`` (and ``sweep.json`` when present), checked by format.

    Raises
    ------
    SpectraError
        No ``study.json``, a file of another format or a newer format version, a run without a directory.
    """
    path = Path(path)
    if not is_study_dir(path):
        raise SpectraError(
            f"{path}: not a study directory (no {MANIFEST}; `collapse-train study` writes one)"
        )
    manifest = _read_json(path / MANIFEST, STUDY_FORMAT, STUDY_FORMAT_VERSION)
    sweep_path = path / SWEEP_FILE
    sweep = _read_json(sweep_path, SWEEP_FORMAT, SWEEP_FORMAT_VERSION) if sweep_path.is_file() else None
    study = Study(path=path, manifest=manifest, sweep=sweep)
    study.runs()  # every run entry has a directory
    return study
