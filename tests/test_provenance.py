"""The one provenance record: versions, git revision, hardware; the same fallback everywhere."""

from __future__ import annotations

import doctest
import sys

import torch

import trainer.provenance as provenance


def test_versions_name_the_core_distributions_and_absent_ones_alike():
    versions = provenance.software_versions("xarray", "no-such-distribution-anywhere")
    assert list(versions)[:5] == ["python", "collapse", "torch", "numpy", "safetensors"]
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["no-such-distribution-anywhere"] == provenance.NOT_INSTALLED == "not installed"


def test_the_record_holds_versions_git_time_and_the_device_when_given():
    record = provenance.provenance_record(device=torch.device("cpu"))
    assert set(record) == {"versions", "git", "created", "device"}
    assert record["device"]["type"] == "cpu" and record["device"]["torch_threads"] == torch.get_num_threads()
    assert record["created"].endswith("+00:00")


def test_reading_versions_imports_nothing_heavy():
    """The torch-free report records provenance too: versions come from metadata, not from imports."""
    import subprocess

    code = "import sys, trainer.provenance as p; p.software_versions('xarray'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_docstring_examples():
    assert doctest.testmod(provenance).failed == 0
