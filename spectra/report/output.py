"""Where a report goes: a directory that is the report's own, replaced whole and atomically.

A report is built complete in a hidden staging directory beside the target (``.<name>.<random>.tmp``), then
swapped into place (:func:`spectra.fileio.replace_directory`), so a report killed at any moment leaves either
the previous report or the complete new one, never a mix of old and new figures. ``report-files.json``
lists what the report wrote; it is how a later report knows what is its own:

- a directory without that manifest, and not empty, is not a report directory: refused before anything is
  computed, so a report never mixes with (or replaces) files it did not write;
- in a report directory, files the manifest does not list (a user's notes, say) are carried over into the
  new report directory (hard links: no copy, no moment at which they exist nowhere); one whose name the new
  report would use is never replaced: the report is refused and names it;
- one ``collapse-spectra report`` at a time writes a directory (a lock beside it), and the staging
  directories of killed reports are removed by the next one;
- a full disk is one error naming the report's file that could not be written, by its place in the report
  directory (:func:`full_disk_in_staging`); the staging directory is removed and the previous report stays.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from spectra.errors import SpectraError
from spectra.figures.toolkit import save_figure
from spectra.fileio import (
    DiskFullError,
    check_writable,
    disk_is_full,
    naming_a_full_disk,
    replace_directory,
)
from spectra.report.document import Block, FigureBlock, NotApplicable

MANIFEST = "report-files.json"
MANIFEST_FORMAT = "collapse-report"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
OWN_DEBRIS = (
    "figures/.*.tmp",
    "tables/.*.tmp",
    ".report.html.*.tmp",
    ".report.md.*.tmp",
    f".{MANIFEST}.*.tmp",
)
"""Temporaries that reports of earlier versions wrote inside the report directory (never a user's file)."""


@dataclass
class ReportWriter:
    """Writes the report's files into the staging directory and remembers them (for the manifest and HTML)."""

    staging: Path
    written: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def figure(self, blocks: list[Block], stem: str, caption: str, what: str, draw) -> None:
        """Draw with ``draw()`` and add the figure, or add why it is not applicable (a SpectraError's message)."""
        try:
            fig = draw()
        except SpectraError as e:
            blocks.append(NotApplicable(what, str(e)))
            return
        paths = save_figure(fig, self.staging / "figures" / f"{stem}.png")
        self.written += [str(p.relative_to(self.staging)) for p in paths]
        self.images[stem] = paths[0].read_bytes()
        blocks.append(FigureBlock(stem, caption))

    def csv(self, name: str, frame: pd.DataFrame) -> str:
        """Write ``tables/<name>`` and return ``name`` (for the table's CSV link)."""
        path = self.staging / "tables" / name
        with naming_a_full_disk(path, self.staging):
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(path, index=False)
        self.written.append(str(path.relative_to(self.staging)))
        return name

    def text(self, name: str, content: str) -> Path:
        path = self.staging / name
        with naming_a_full_disk(path):
            path.write_text(content, encoding="utf-8")
        self.written.append(name)
        return path

    def manifest(self) -> None:
        files = sorted(set(self.written) | {MANIFEST})
        self.text(MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")


def file_stem(text: str, default: str = "run") -> str:
    """``text`` made safe as a file name stem under ``figures/`` or ``tables/`` (``default`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or default


def read_manifest(out: Path) -> list[str] | None:
    """The files a previous report listed in ``out``, or None when ``out`` holds no manifest."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise SpectraError(
            f"{path}: not a report manifest ({e}); remove it or choose another output directory"
        ) from e
    return [f for f in files if isinstance(f, str)]


def check_target(out: Path) -> list[str] | None:
    """Refuse, before anything is computed, an output that is not a new, empty or report directory.

    Returns the previous report's manifest (None for a new or empty directory).
    """
    if out.exists() and not out.is_dir():
        raise SpectraError(f"{out}: exists and is not a directory")
    check_writable(out, "report directory", directory=True)  # it is built and swapped in beside it
    if not out.exists():
        return None
    previous = read_manifest(out)
    if previous is None and any(out.iterdir()):
        raise SpectraError(
            f"{out}: not a report directory (no {MANIFEST}) and not empty; the report would mix with files "
            "it did not write: choose a new or empty directory"
        )
    return previous


def new_staging(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` to build the report in."""
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    with naming_a_full_disk(out):
        staging.mkdir(parents=True)
    return staging


def full_disk_in_staging(error: BaseException, staging: Path, out: Path) -> DiskFullError | None:
    """A full disk while building the report ``out`` in ``staging``, naming the file by its place in ``out``.

    None for any other error. Call it before the staging directory is removed (the file system is asked
    while the partial files still take their space).
    """
    if isinstance(error, DiskFullError):
        inside = error.path.is_relative_to(staging)
        return DiskFullError(out / error.path.relative_to(staging) if inside else error.path)
    if isinstance(error, Exception) and disk_is_full(error, staging):
        return DiskFullError(out)
    return None


def _own_debris(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in OWN_DEBRIS)


def _carry_over(out: Path, staging: Path, previous: list[str], new_files: set[str]) -> None:
    """Hard-link every file of ``out`` that no report wrote into ``staging``; refuse a name clash."""
    own = set(previous)
    for root, dirs, names in os.walk(out):
        rel_root = Path(root).relative_to(out)
        for d in dirs:
            (staging / rel_root / d).mkdir(parents=True, exist_ok=True)  # a user's (maybe empty) directory
        for name in names:
            rel = str(rel_root / name) if str(rel_root) != "." else name
            if rel in own or _own_debris(rel):
                continue
            if rel in new_files:
                raise SpectraError(
                    f"{out / rel} was not written by a report (it is not in {out / MANIFEST}): refusing to "
                    "replace it; move it away or choose another output directory"
                )
            source, target = out / rel, staging / rel
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            else:
                os.link(source, target)


def commit(staging: Path, out: Path, previous: list[str] | None) -> None:
    """Swap the complete report in ``staging`` into place at ``out`` (see the module docstring)."""
    new_files = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
    try:
        if out.exists():
            _carry_over(out, staging, previous or [], new_files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, out)
