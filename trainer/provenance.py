"""How a result was made: the one record of software versions, git revision and hardware.

Every writer of results (run directories, checkpoints, dataset directories, cubes, surgery files, evals,
reports) records provenance through this module, so that every file says the same thing the same way: a
distribution that is absent reads ``"not installed"`` everywhere. It imports nothing heavy: versions come
from the installed distributions' metadata (``importlib.metadata``), not from importing the packages, so the
torch-free parts of ``spectra`` (the report) can use it; :func:`device_description` imports torch only when
called. ``spectra`` may import this module (an import-linter contract says which trainer modules it may use).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

NOT_INSTALLED = "not installed"
"""What a version reads when its distribution is absent (e.g. a source tree that was never installed)."""

CORE_DISTRIBUTIONS = ("collapse", "torch", "numpy", "safetensors")
"""Distributions every record names: this package and what determines the trainer's numbers."""


def package_version(distribution: str) -> str:
    """The installed version of ``distribution``, or :data:`NOT_INSTALLED`.

    >>> package_version("no-such-distribution-anywhere")
    'not installed'
    """
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def software_versions(*extra: str) -> dict[str, str]:
    """``{"python": ..., "collapse": ..., "torch": ..., "numpy": ..., "safetensors": ..., *extra}``.

    ``extra`` names further distributions a result depends on (``xarray``, ``netCDF4``, ``transformers``,
    ``lm_eval``, ...), each read by :func:`package_version`.

    >>> sorted(software_versions("xarray"))
    ['collapse', 'numpy', 'python', 'safetensors', 'torch', 'xarray']
    """
    names = dict.fromkeys((*CORE_DISTRIBUTIONS, *extra))  # ordered, without duplicates
    return {"python": platform.python_version(), **{name: package_version(name) for name in names}}


def git_revision() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout this package lives in, or None (best effort).

    Only a checkout whose top level is this package's parent directory counts, so an installed copy
    inside some unrelated repository is not misreported.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # no git binary, or a hung filesystem
            return None

    head = git("rev-parse", "--show-toplevel", "HEAD")
    if head is None or head.returncode != 0:
        return None
    toplevel, commit = head.stdout.split()
    if Path(toplevel).resolve() != root:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"commit": commit, "dirty": dirty}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # /proc is Linux-only; the platform name above is the fallback
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def device_description(device: Any) -> dict[str, Any]:
    """Hardware a computation used: device type and name, and the CPU threads torch uses.

    ``device`` is a ``torch.device``; torch is imported here, not by the module.
    """
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "type": device.type,
        "name": name,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (how every record writes a time)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance_record(*extra: str, device: Any = None) -> dict[str, Any]:
    """``{"versions", "git", "created"}`` and, given a device, ``"device"``: one record for one result.

    >>> sorted(provenance_record())
    ['created', 'git', 'versions']
    """
    record: dict[str, Any] = {
        "versions": software_versions(*extra),
        "git": git_revision(),
        "created": utc_now(),
    }
    if device is not None:
        record["device"] = device_description(device)
    return record
