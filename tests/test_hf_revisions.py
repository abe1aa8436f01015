"""Sources, revisions, steps and tokens of public models; the hub path through huggingface_hub's own
offline cache, so that it is the same call as on a machine with hub access."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

from spectra.cube import open_cube  # noqa: E402
from spectra.errors import SpectraError  # noqa: E402
from spectra.hf.extract import extract_public  # noqa: E402
from spectra.hf.revisions import (  # noqa: E402
    PYTHIA_TOKENS_PER_STEP,
    is_public_source,
    parse_source,
    plan_revisions,
    step_of,
    tokens_for,
    tokens_in_name,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("label", "step", "tokens"),
    [
        ("step0", 0, None),
        ("step143000", 143000, None),
        ("stage1-step1000-tokens5B", 1000, 5 * 10**9),
        ("stage1-step928646-tokens3896B", 928646, 3896 * 10**9),
        ("stage2-ingredient1-step11931-tokens50B", 11931, 50 * 10**9),
        ("main", None, None),
        ("prestep5", None, None),  # "step" must start a word
    ],
)
def test_step_and_tokens_from_revision_names(label, step, tokens):
    assert step_of(label) == step
    assert tokens_in_name(label) == tokens


def test_tokens_rules_in_order():
    assert tokens_for("EleutherAI/pythia-1.4b-deduped", "step10", 10, None)[0] == 10 * PYTHIA_TOKENS_PER_STEP
    assert tokens_for("allenai/OLMo-2-0425-1B", "stage1-step10-tokens21B", 10, None)[0] == 21 * 10**9
    assert tokens_for("EleutherAI/pythia-160m", "step10", 10, 100)[0] == 1000  # explicit wins
    value, rule = tokens_for("HuggingFaceTB/SmolLM2-135M", "step10", 10, None)
    assert math.isnan(value) and "--tokens-per-step" in rule


def test_sources(hf_revisions, tmp_path):
    root = hf_revisions("llama")
    assert parse_source("hf:EleutherAI/pythia-160m").kind == "hub"
    assert parse_source(root).kind == "revisions-dir" and parse_source(root / "step0").kind == "model-dir"
    assert is_public_source(root) and is_public_source("hf:a/b") and not is_public_source(tmp_path)
    with pytest.raises(SpectraError, match="not a model directory"):
        parse_source(tmp_path)
    with pytest.raises(SpectraError, match="not a hub model name"):
        parse_source("hf:")


def test_plan_revisions(hf_revisions):
    root = hf_revisions("llama")
    assert [(r.label, r.step) for r in plan_revisions(parse_source(root))] == [
        ("step0", 0),
        ("step1000", 1000),
    ]
    picked = plan_revisions(parse_source(root), ["step1000"], tokens_per_step=10)
    assert [(r.label, r.step, r.tokens) for r in picked] == [("step1000", 1000, 10_000)]
    one = plan_revisions(parse_source(root / "step1000"))
    assert [(r.label, r.step) for r in one] == [(".", 1000)]  # the directory's own name gives the step
    hub = plan_revisions(parse_source("hf:Qwen/Qwen3-0.6B"), ["main:32000"])
    assert [(r.label, r.step) for r in hub] == [("main", 32000)] and math.isnan(hub[0].tokens)
    with pytest.raises(SpectraError, match="its name has no step"):
        plan_revisions(parse_source("hf:Qwen/Qwen3-0.6B"))
    with pytest.raises(SpectraError, match="both stand for step 1000"):
        plan_revisions(parse_source("hf:a/b"), ["step1000", "other:1000"])
    with pytest.raises(SpectraError, match="no such revision directory"):
        plan_revisions(parse_source(root), ["step5"])
    with pytest.raises(SpectraError, match="its revision is '.'"):
        plan_revisions(parse_source(root / "step0"), ["step0"])
    with pytest.raises(SpectraError, match="must be the step"):
        plan_revisions(parse_source(root), ["step0:x"])


# ----------------------------------------------------------------------------------------------------
# the hub, offline: huggingface_hub reads revisions from its cache exactly as after a download


def _fake_hub_cache(cache, repo, revisions):
    """A huggingface_hub cache holding ``revisions`` ({name: source directory}) of ``repo``, one commit each."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    commits = {}
    for i, (name, directory) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        shutil.copytree(directory, base / "snapshots" / commit)
        (base / "refs" / name).write_text(commit)
        commits[name] = commit
    return commits


@pytest.fixture
def offline_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline_hub")
def test_hub_revisions_are_the_same_call_as_local_directories(hf_revisions, hf_data_dir, tmp_path):
    root = hf_revisions("gpt_neox")
    cache = tmp_path / "hub"
    commits = _fake_hub_cache(
        cache, "org/pythia-tiny", {"step0": root / "step0", "step1000": root / "step1000"}
    )
    hub = extract_public(
        "hf:org/pythia-tiny",
        batch=hf_data_dir,
        out=tmp_path / "hub.nc",
        revisions=["step0", "step1000"],
        cache_dir=cache,
        progress=False,
    )
    local = extract_public(root, batch=hf_data_dir, out=tmp_path / "local.nc", progress=False)
    assert hub.added == local.added == (0, 1000)
    a, b = open_cube(tmp_path / "hub.nc"), open_cube(tmp_path / "local.nc")
    for var in ("q_sv", "k_sv", "wq_sv", "wk_sv", "k_energy"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    recorded = {r["revision"]: r["commit"] for r in json.loads(a.attrs["revisions"])}
    assert recorded == commits
    assert a.attrs["model_id"] == "org/pythia-tiny" and a.attrs["model_source"] == "hf:org/pythia-tiny"
    assert a.tokens.values.tolist() == [0, 1000 * PYTHIA_TOKENS_PER_STEP]  # Pythia's rule, by the hub name


@pytest.mark.usefixtures("offline_hub")
def test_hub_revision_without_safetensors_is_refused(hf_revisions, hf_data_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(hf_revisions("llama") / "step0", pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "org/old", {"step0": pickled})
    with pytest.raises(
        SpectraError, match="has no safetensors weights .* pickle weights .* are never loaded"
    ):
        extract_public(
            "hf:org/old", batch=hf_data_dir, out=tmp_path / "c.nc", revisions=["step0"], cache_dir=cache
        )
    with pytest.raises(SpectraError, match="no config.json on the hub or, offline, in the local cache"):
        extract_public(
            "hf:org/old", batch=hf_data_dir, out=tmp_path / "c.nc", revisions=["step9"], cache_dir=cache
        )
