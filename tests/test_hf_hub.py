"""Hub sources offline: the listing, the cache, eviction and a real kill, through huggingface_hub's own functions.

The Hugging Face cache is a temporary directory laid out as a download leaves it (``hf_helpers.populate_hub_cache``:
blobs, snapshots of symlinks, refs), named by ``HF_HUB_CACHE``, with ``HF_HUB_OFFLINE=1``: ``snapshot_download``,
``scan_cache_dir`` and ``delete_revisions(...).execute()`` are the library's. The one function replaced is
``huggingface_hub.list_repo_refs`` (the hub's list of branches), by a test double answering with the library's
own ``GitRefs``.

Offline, nothing can be downloaded, so a revision "the sweep downloaded" is one that reached the cache after the
sweep began: a test begins the sweep (``SweepLedger.open``, as ``extract`` does first), then puts revisions into
the cache as the interrupted downloads would have, then runs ``extract``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")

from hf_helpers import fake_list_repo_refs, hub_repo_dir, populate_hub_cache  # noqa: E402

from cli.spectra import main  # noqa: E402
from spectra.cube import open_cube  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.hf.cache import SweepLedger, ledger_path, remove_partial_downloads  # noqa: E402
from spectra.hf.extract import extract_public  # noqa: E402
from spectra.hf.revisions import PYTHIA_TOKENS_PER_STEP  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = "org/pythia-tiny"
PYTHIA_160M_BRANCHES = ["main"] + [
    f"step{s}" for s in [0] + [2**i for i in range(10)] + list(range(1000, 143_001, 1000))
]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache in offline mode, for this process and its children."""
    import huggingface_hub.constants

    path = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return path


def cached_branches(cache: Path, repo: str = REPO) -> set[str]:
    """The refs of ``repo`` that the cache holds, by huggingface_hub's own scan."""
    from huggingface_hub import scan_cache_dir

    if not cache.exists():
        return set()
    return {
        ref
        for r in scan_cache_dir(cache).repos
        if r.repo_id == repo
        for rev in r.revisions
        for ref in rev.refs
    }


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------
# the listing


def test_list_revisions_of_pythia_160m(monkeypatch, cache, tmp_path):
    """The documented plan of a sweep: Pythia-160m's 155 branches, log:30, without downloading anything."""
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub,
        "list_repo_refs",
        fake_list_repo_refs({"EleutherAI/pythia-160m": PYTHIA_160M_BRANCHES}),
    )
    run = invoke("extract", "hf:EleutherAI/pythia-160m", "--revisions", "log:30", "--batch", tmp_path / "DATA",
                 "--out", tmp_path / "p.nc", "--list-revisions")  # fmt: skip
    assert run.exit_code == 0, run.output
    lines = run.output.splitlines()
    assert lines[0] == "hf:EleutherAI/pythia-160m: 155 revisions listed, 30 selected by 'log:30'"
    rows = [line.split() for line in lines[2:32]]
    assert [int(r[1]) for r in rows] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000, 5000,
                                         6000, 8000, 10000, 13000, 17000, 22000, 28000, 35000, 44000, 56000,
                                         71000, 90000, 113000, 143000]  # fmt: skip
    assert rows[-1] == ["step143000", "143000", f"{143000 * PYTHIA_TOKENS_PER_STEP:,}", "log:30", "[1]"]
    assert lines[32].startswith("[1] tokens: Pythia: step x 2,097,152 tokens")
    assert (
        lines[33]
        == "hf:EleutherAI/pythia-160m: not selected, no step in the name (add one as REV:STEP): main"
    )
    assert not cache.exists()  # nothing was downloaded


def test_listing_offline_is_one_clear_line(cache, tmp_path):
    run = invoke("extract", "hf:EleutherAI/pythia-160m", "--revisions", "log:30", "--batch", tmp_path,
                 "--out", tmp_path / "p.nc", "--list-revisions")  # fmt: skip
    assert run.exit_code == 1
    assert run.output.splitlines() == [
        "Error: hf:EleutherAI/pythia-160m: its revisions cannot be listed in offline mode (HF_HUB_OFFLINE is "
        "set); all, globs, every:N, log:K, range:A-B and --list-revisions ask the hub: name the revisions (REV or "
        "REV:STEP) instead"
    ]
    # names need no listing: offline, a cached revision is read (here there is none: one line again)
    run = invoke("extract", "hf:EleutherAI/pythia-160m", "--revisions", "step0", "--batch", tmp_path / "no-data",
                 "--out", tmp_path / "p.nc")  # fmt: skip
    assert run.exit_code == 1 and len(run.output.splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# the hub path reads the same files as a directory


def test_hub_revisions_are_the_same_call_as_local_directories(hf_revisions, hf_data_dir, cache, tmp_path):
    root = hf_revisions("gpt_neox")
    commits = populate_hub_cache(cache, REPO, {"step0": root / "step0", "step1000": root / "step1000"})
    hub = extract_public(f"hf:{REPO}", batch=hf_data_dir, out=tmp_path / "hub.nc", revisions=["step0", "step1000"],
                         progress=False)  # fmt: skip
    local = extract_public(root, batch=hf_data_dir, out=tmp_path / "local.nc", progress=False)
    assert hub.added == local.added == (0, 1000)
    a, b = open_cube(tmp_path / "hub.nc"), open_cube(tmp_path / "local.nc")
    for var in ("q_sv", "k_sv", "wq_sv", "wk_sv", "k_energy"):
        np.testing.assert_array_equal(a[var].values, b[var].values)  # NaN where both have none
    recorded = {r["revision"]: r["commit"] for r in json.loads(a.attrs["revisions"])}
    assert recorded == commits
    assert a.attrs["model_id"] == REPO and a.attrs["model_source"] == f"hf:{REPO}"
    assert a.tokens.values.tolist() == [0, 1000 * PYTHIA_TOKENS_PER_STEP]  # Pythia's rule, by the hub name
    # both revisions were in the cache before: they stay, and no record of the sweep is left
    assert cached_branches(cache) == {"step0", "step1000"} and not ledger_path(tmp_path / "hub.nc").exists()


def test_hub_revision_without_safetensors_is_refused(hf_revisions, hf_data_dir, cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in (hf_revisions("llama") / "step0").iterdir():
        (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    populate_hub_cache(cache, "org/old", {"step0": pickled})
    with pytest.raises(
        SpectraError, match="has no safetensors weights .* pickle weights .* are never loaded"
    ):
        extract_public("hf:org/old", batch=hf_data_dir, out=tmp_path / "c.nc", revisions=["step0"])
    with pytest.raises(
        SpectraError, match="'step9' is not \\(wholly\\) in the local cache .*HF_HUB_OFFLINE is set"
    ):
        extract_public("hf:org/old", batch=hf_data_dir, out=tmp_path / "c.nc", revisions=["step9"])


# ----------------------------------------------------------------------------------------------------
# eviction


def test_a_sweep_evicts_what_it_downloaded_once_in_the_cube(
    monkeypatch, hf_pythia_dir, hf_data_dir, cache, tmp_path
):
    import huggingface_hub

    import spectra.hf.cache as hf_cache

    branches = ["main", "step0", "step1", "step2", "step1000"]
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", fake_list_repo_refs({REPO: branches}))
    out = tmp_path / "sweep.nc"
    populate_hub_cache(cache, REPO, {"step0": hf_pythia_dir / "step0"})  # the user's, before the sweep
    SweepLedger.open(out, REPO, cache)  # the sweep begins ...
    commits = populate_hub_cache(cache, REPO, {b: hf_pythia_dir / b for b in ("step1", "step2", "step1000")})
    # ... and these arrive meanwhile: its own. Each must be in the cube file when it is evicted.
    real_evict, evicted = hf_cache.evict, []

    def evict_after_checking_the_cube(repo, commit, cache_dir):
        step = {commits[b]: int(b[4:]) for b in commits}[commit]
        assert step in open_cube(out).step.values, f"step {step} evicted before its spectra were written"
        evicted.append(step)
        return real_evict(repo, commit, cache_dir)

    monkeypatch.setattr(hf_cache, "evict", evict_after_checking_the_cube)
    notes = []
    result = extract_public(f"hf:{REPO}", batch=hf_data_dir, out=out, revisions="step*", progress=False,
                            on_note=notes.append)  # fmt: skip
    assert result.added == (0, 1, 2, 1000) and evicted == [1, 2, 1000]
    assert cached_branches(cache) == {"step0"}  # what the cache held before the sweep is kept
    assert not ledger_path(out).exists()  # the sweep is over and owns nothing more
    assert notes == [notes[0]] and notes[0].startswith(
        "evicted from the Hugging Face cache once measured: 3 revisions ("
    )


def test_no_evict_keeps_everything(hf_pythia_dir, hf_data_dir, cache, tmp_path):
    out = tmp_path / "keep.nc"
    SweepLedger.open(out, REPO, cache)
    populate_hub_cache(cache, REPO, {b: hf_pythia_dir / b for b in ("step0", "step1")})
    run = invoke("extract", f"hf:{REPO}", "--revisions", "step0,step1", "--batch", hf_data_dir, "--out", out,
                 "--no-evict", "--no-progress")  # fmt: skip
    assert run.exit_code == 0, run.output
    assert cached_branches(cache) == {"step0", "step1"}
    assert ledger_path(out).exists()  # left for a later evicting run of the same sweep
    local = invoke("extract", hf_pythia_dir, "--revisions", "step0", "--batch", hf_data_dir, "--out",
                   tmp_path / "local.nc", "--evict")  # fmt: skip
    assert local.exit_code == 1 and "is a local directory, which extraction never deletes" in local.output


def test_the_rerun_evicts_what_an_interrupted_sweep_left(hf_pythia_dir, hf_data_dir, cache, tmp_path):
    out = tmp_path / "sweep.nc"
    SweepLedger.open(out, REPO, cache)
    populate_hub_cache(cache, REPO, {b: hf_pythia_dir / b for b in ("step0", "step1", "step2")})
    # step0 reached the cube, step1 and step2 the cache only (killed before their eviction, or prefetched)
    first = extract_public(
        f"hf:{REPO}", batch=hf_data_dir, out=out, revisions="step0", evict=False, progress=False
    )
    assert first.added == (0,) and cached_branches(cache) == {"step0", "step1", "step2"}
    # the rerun selects step1 only: step0 (measured) and step2 (no longer selected) go at once, step1 once measured
    again = extract_public(f"hf:{REPO}", batch=hf_data_dir, out=out, revisions="step0,step1", progress=False)
    assert (again.added, again.skipped) == ((1,), (0,))
    assert cached_branches(cache) == set() and not ledger_path(out).exists()


def test_partial_downloads_of_ours_are_removed_unless_being_written(hf_pythia_dir, cache):
    from filelock import FileLock

    populate_hub_cache(cache, REPO, {"step0": hf_pythia_dir / "step0"})
    populate_hub_cache(cache, "other/model", {"main": hf_pythia_dir / "step1"})
    blobs = hub_repo_dir(cache, REPO) / "blobs"
    orphan = blobs / f"{'a' * 64}.1a2b3c4d.incomplete"  # a download killed with its process
    busy = blobs / f"{'b' * 64}.5e6f7a8b.incomplete"  # a download in progress (its lock is held)
    theirs = hub_repo_dir(cache, "other/model") / "blobs" / f"{'c' * 64}.00000000.incomplete"
    for f in (orphan, busy, theirs):
        f.write_bytes(b"partial")
    lock_dir = cache / ".locks" / hub_repo_dir(cache, REPO).name
    lock_dir.mkdir(parents=True)
    with FileLock(lock_dir / f"{'b' * 64}.lock"):
        assert remove_partial_downloads(REPO, cache) == [orphan]
    assert not orphan.exists() and busy.exists() and theirs.exists()


# ----------------------------------------------------------------------------------------------------
# a real kill


def test_a_killed_sweep_leaves_a_valid_cube_and_the_rerun_resumes(
    hf_pythia_dir, hf_data_dir, cache, tmp_path
):
    names = ["step0", "step1", "step2", "step4", "step8", "step16", "step512", "step1000", "step2000",
             "step3000"]  # fmt: skip
    out = tmp_path / "killed.nc"
    SweepLedger.open(out, REPO, cache)
    populate_hub_cache(cache, REPO, {b: hf_pythia_dir / b for b in names})
    orphan = hub_repo_dir(cache, REPO) / "blobs" / f"{'d' * 64}.0badf00d.incomplete"
    orphan.write_bytes(b"a download killed earlier")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # HF_HUB_CACHE and HF_HUB_OFFLINE=1 come from the fixture
    cmd = [sys.executable, "-m", "cli.spectra", "extract", f"hf:{REPO}", "--revisions", ",".join(names),
           "--batch", str(hf_data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # as soon as the first revision is in the cube
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stdout.read().decode()
    # a valid cube, with what was measured before the kill
    held = [int(s) for s in open_cube(out).step.values]
    assert 0 < len(held) < len(names)
    run = invoke("extract", f"hf:{REPO}", "--revisions", ",".join(names), "--batch", hf_data_dir, "--out", out,
                 "--no-progress")  # fmt: skip
    assert run.exit_code == 0, run.output
    assert f"skipped steps (already in the cube): {', '.join(map(str, held))}" in run.output
    assert [int(s) for s in open_cube(out).step.values] == [int(n[4:]) for n in names]
    assert cached_branches(cache) == set() and not ledger_path(out).exists()
    # every revision was the sweep's: the model's folder went with the last
    assert not hub_repo_dir(cache, REPO).exists()
    assert not list(tmp_path.glob(".killed.nc.*.tmp"))  # no temporary of a killed write is left
