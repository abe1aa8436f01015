"""Spectra cubes of public models: one ``step`` per released revision, through ``transformers``.

``extract_public`` is the counterpart of :func:`spectra.extract.run.extract` for models we did not train:
the same cube schema (``docs/cube.md``), so ``metrics``, ``plot`` and ``report`` read it unchanged. What
a public checkpoint cannot say is recorded as such: the optimizer is ``unknown``, the seed ``-1``, the
training data ``unknown`` and the losses NaN, each with an attribute saying why.

Examples
--------
>>> from spectra.hf.extract import extract_public
>>> extract_public("hf:EleutherAI/pythia-160m", revisions=["step0", "step1000"],
...                batch="data/pythia-eval", out="pythia-160m.nc")           # doctest: +SKIP
ExtractResult(path=PosixPath('pythia-160m.nc'), added=(0, 1000), skipped=())
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from spectra.cube import combine_steps, cube_attributes, open_cube, step_dataset, write_cube
from spectra.errors import SpectraError
from spectra.extract.load import eval_batch_path, eval_batch_sha256, load_eval_batch, resolve_device
from spectra.extract.run import ExtractResult, check_enough_tokens, layer_reducer
from spectra.extract.svd import head_weight_singular_values
from spectra.fileio import ExclusiveLock, check_writable, remove_stale_temporaries
from spectra.hf.adapters import (
    Architecture,
    HeadLayout,
    architecture_for,
    head_layout,
    rotary_layout,
    site_notes,
)
from spectra.hf.cache import RevisionFetcher, SweepLedger, hub_cache_dir
from spectra.hf.capture import (
    CAPTURE_ATTENTION,
    attention_modules,
    capture_public_qk,
    check_public_batch,
    register_capture_attention,
    require_transformers,
)
from spectra.hf.revisions import (
    TOKENIZER_FILE,
    FetchedRevision,
    ModelSource,
    Revision,
    parse_source,
    plan_revisions,
)
from spectra.hf.tokenizer import check_tokenizer
from trainer.provenance import package_version, software_versions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` choices: the precision of the weights and of the forward pass (spectra are float64)."""
UNKNOWN = "unknown"
"""The ``optimizer`` of a public model's cube."""
UNKNOWN_SEED = -1
"""The ``seed`` of a public model's cube (``open_cubes`` needs an integer)."""

_FLUSH_SECONDS = 60.0  # as spectra.extract.run: a kill loses at most this much work
_CONFIG_KEYS = (  # what must agree between revisions (and with an existing cube) for spectra to share a cube
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_GAIN_VARS = ("q_gamma", "k_gamma", "q_gamma_head", "k_gamma_head")
_NOTES = {
    "optimizer_note": "a public checkpoint does not record its optimizer in a form this tool reads",
    "seed_note": "-1: the training seed of a public model is not recorded in its checkpoints",
    "data_note": "the model's own pretraining corpus, which its checkpoints do not describe; one name per model, "
    "so that the report never pools two public models as seeds of one configuration",
    "loss_note": "train_loss and val_loss are NaN: a public checkpoint carries no losses of its training run",
}


@dataclass(frozen=True)
class PublicModel:
    """A loaded revision: the model (eval mode) and what the cube records about it."""

    model: nn.Module
    arch: Architecture
    dims: HeadLayout
    fetched: FetchedRevision


def pretraining_data(model_id: str) -> str:
    """The cube's ``data`` attribute for a public model: its own pretraining corpus, named after the model.

    >>> pretraining_data("EleutherAI/pythia-160m")
    'pretraining data of EleutherAI/pythia-160m'
    """
    return f"pretraining data of {model_id}"


@contextmanager
def _quiet_transformers(progress: bool):
    """Silence transformers' load report (we check the loading info ourselves) and, without progress, its bars."""
    transformers = require_transformers()
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    if not progress:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_public_model(
    fetched: FetchedRevision,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    *,
    progress: bool = False,
) -> PublicModel:
    """Load one revision's base model (no LM head) from its safetensors weights, in ``dtype`` on ``device``.

    ``AutoModel.from_pretrained`` with ``use_safetensors=True``, no remote code, and the recording
    attention function of :mod:`spectra.hf.capture`. The weights are read on the CPU and then moved, so
    at most one copy of them exists per device.

    Raises
    ------
    SpectraError
        An unsupported architecture, an unknown dtype, weights missing from or not fitting the files.
    """
    require_transformers()
    from transformers import AutoConfig, AutoModel

    if dtype not in DTYPES:
        raise SpectraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    directory = fetched.directory
    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise SpectraError(f"{directory}: cannot read its config.json ({e})") from None
    arch = architecture_for(config.model_type)
    register_capture_attention()
    with _quiet_transformers(progress):
        try:
            model, info = AutoModel.from_pretrained(
                directory,
                config=config,
                use_safetensors=True,
                local_files_only=True,
                dtype=DTYPES[dtype],
                attn_implementation=CAPTURE_ATTENTION,
                output_loading_info=True,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise SpectraError(f"{directory}: transformers cannot load the model ({e})") from None
    for key in ("missing_keys", "mismatched_keys"):
        if info.get(key):
            names = sorted(str(k) for k in info[key])
            raise SpectraError(
                f"{directory}: {len(names)} weights {key.split('_')[0]} in the safetensors files "
                f"(e.g. {', '.join(names[:3])}); they would be random, not the checkpoint's"
            )
    model = model.to(dev).eval()
    return PublicModel(model=model, arch=arch, dims=head_layout(config), fetched=fetched)


def architecture_key(config: Any) -> dict[str, Any]:
    """The config fields that must agree for two revisions' spectra to share a cube, and the rotary layout."""
    key = {k: getattr(config, k, None) for k in _CONFIG_KEYS}
    key["rotary"] = rotary_layout(architecture_for(config.model_type), config).as_attrs()
    return json.loads(json.dumps(key))  # plain JSON types, comparable with what a cube's attribute holds


def _config_json(config: Any) -> str:
    data = {
        k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
    return json.dumps(data, sort_keys=True, default=str)


def _projection_weights(
    attn: nn.Module, arch: Architecture, dims: HeadLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_q ``(H*D, d_model)`` and W_k ``(Hkv*D, d_model)`` of one layer, heads in row blocks."""
    if arch.qkv_proj is None:
        return getattr(attn, arch.q_proj).weight, getattr(attn, arch.k_proj).weight
    w = getattr(attn, arch.qkv_proj).weight  # (H * 3D, d_model), rows per head: [q_h, k_h, v_h]
    per_head = w.view(dims.n_heads, 3, dims.head_dim, w.shape[-1])
    return per_head[:, 0].reshape(-1, w.shape[-1]), per_head[:, 1].reshape(-1, w.shape[-1])


def _gains(norm: nn.Module | None, arch: Architecture, heads: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-layer gain (D,), per-head gain (heads, D)) of one QK-norm: NaN where the family has none of that kind."""
    shared, per_head = np.full(d, np.nan), np.full((heads, d), np.nan)
    if norm is None:
        return shared, per_head
    gain = (arch.gain_offset + norm.weight.detach().to(torch.float64)).cpu().numpy()
    if arch.qk_norm == "head":
        return gain, np.broadcast_to(gain, (heads, d)).copy()
    return shared, gain.reshape(heads, d)  # full width: one gain per head and coordinate


def _gain_notes(arch: Architecture) -> dict[str, str]:
    """A ``note`` attribute for the gain variables whose meaning for this family needs one."""
    if arch.qk_norm == "none":
        return dict.fromkeys(_GAIN_VARS, f"NaN: the {arch.family} family has no QK-norm")
    notes = {}
    if arch.qk_norm == "full":
        shared = (
            f"NaN: the {arch.family} QK-norm spans the whole projection, so its gain differs between heads and "
            "no gain is shared by the heads of a layer; see q_gamma_head / k_gamma_head"
        )
        notes.update(q_gamma=shared, k_gamma=shared)
    else:
        repeated = "the gain shared by the heads of the layer, repeated for every head"
        notes.update(q_gamma_head=repeated, k_gamma_head=repeated)
    if arch.gain_offset:
        effective = f"the effective gain {arch.gain_offset:g} + weight, by which this family's RMSNorm scales"
        notes = {name: f"{notes[name]}; {effective}" if name in notes else effective for name in _GAIN_VARS}
    return notes


def _has_bias(attn: nn.Module, arch: Architecture) -> bool:
    proj = getattr(attn, arch.qkv_proj or arch.q_proj)
    return getattr(proj, "bias", None) is not None


def spectra_for_public_model(
    loaded: PublicModel, input_ids: torch.Tensor, *, drop_first: int = 0, attrs: dict[str, Any] | None = None
) -> xr.Dataset:
    """The cube's variables for one revision, as a Dataset with a ``step`` dimension of length 1.

    As :func:`spectra.extract.run.spectra_for_checkpoint`: one forward pass (in the model's dtype) records
    every site (:func:`spectra.hf.capture.capture_public_qk`), each layer is reduced to float64 spectra
    and energies, and the weight spectra come from each head's rows of W_q and W_k. Gains: ``q_gamma`` /
    ``k_gamma`` hold a QK-norm gain shared by the heads of a layer (Gemma's effective ``1 + weight``), NaN
    for families without one; ``q_gamma_head`` / ``k_gamma_head`` hold the gain of every head and
    coordinate (the shared gain repeated, or OLMo-2's per-head gains). Losses are NaN.

    Raises
    ------
    SpectraError
        A batch that does not fit the model, or fewer tokens per head than ``head_dim``.
    """
    model, arch, dims = loaded.model, loaded.arch, loaded.dims
    H, Hkv, D = dims.n_heads, dims.n_kv_heads, dims.head_dim
    n_tokens = check_public_batch(model, input_ids, drop_first)
    check_enough_tokens(n_tokens, D, drop_first)
    per_layer = capture_public_qk(model, input_ids, drop_first=drop_first, reduce=layer_reducer(H, Hkv, D))
    attns = attention_modules(model, arch)
    with torch.no_grad():
        weights = [_projection_weights(a, arch, dims) for a in attns]
        wq_sv = (
            head_weight_singular_values(torch.stack([wq for wq, _ in weights]), H).cpu().numpy()
        )  # (L, H, D)
        wk_sv = head_weight_singular_values(torch.stack([wk for _, wk in weights]), Hkv).cpu().numpy()
    q_gains = [_gains(getattr(a, "q_norm", None) if arch.has_qk_norm else None, arch, H, D) for a in attns]
    k_gains = [_gains(getattr(a, "k_norm", None) if arch.has_qk_norm else None, arch, Hkv, D) for a in attns]
    rev = loaded.fetched.revision
    ds = step_dataset(
        per_layer,
        wq_sv=wq_sv,
        wk_sv=wk_sv,
        q_gamma=np.stack([g for g, _ in q_gains]),
        k_gamma=np.stack([g for g, _ in k_gains]),
        step=rev.step,
        tokens=rev.tokens,
        train_loss=math.nan,
        val_loss=math.nan,
        attrs={**(attrs or {}), "n_tokens": int(n_tokens)},
    )
    ds["q_gamma_head"] = (("step", "layer", "head", "dim"), np.stack([g for _, g in q_gains])[np.newaxis])
    ds["k_gamma_head"] = (("step", "layer", "kv_head", "dim"), np.stack([g for _, g in k_gains])[np.newaxis])
    ds["q_gamma_head"].attrs = {
        "long_name": "QK-norm gain of each query head and coordinate (NaN if none)",
        "units": "1",
    }
    ds["k_gamma_head"].attrs = {
        "long_name": "QK-norm gain of each key/value head and coordinate (NaN if none)",
        "units": "1",
    }
    for name, note in _gain_notes(arch).items():
        ds[name].attrs["note"] = note
    for name in ("train_loss", "val_loss"):
        ds[name].attrs["note"] = _NOTES["loss_note"]
    if _has_bias(attns[0], arch):
        for name in ("wq_sv", "wk_sv"):
            ds[name].attrs["note"] = (
                "the projection's bias is not part of W (it is in the activations at proj)"
            )
    return ds


def _model_attrs(
    source: ModelSource,
    loaded: PublicModel,
    input_ids: torch.Tensor,
    drop_first: int,
    dtype: str,
    tokenizer_check: str,
) -> dict[str, Any]:
    config = loaded.model.config
    arch = loaded.arch
    rotary = rotary_layout(arch, config)
    return {
        **cube_attributes(
            title=f"Singular-value spectra of attention queries and keys, public model {source.model_id}",
            source=f"collapse-spectra extract (public model, transformers): {dtype} forward pass on the fixed "
            "eval batch, float64 SVD",
        ),
        "run_name": source.model_id,
        "qk_norm": "learned" if arch.has_qk_norm else "none",
        "optimizer": UNKNOWN,
        "seed": UNKNOWN_SEED,
        "data": pretraining_data(source.model_id),
        **{k: v for k, v in _NOTES.items() if k != "loss_note"},
        "model_id": source.model_id,
        "model_source": source.spec if source.kind == "hub" else str(Path(source.spec).resolve()),
        "family": arch.family,
        "model_type": str(config.model_type),
        "architectures": json.dumps(list(getattr(config, "architectures", None) or [])),
        "model_config": _config_json(config),
        "architecture_key": json.dumps(architecture_key(config), sort_keys=True),
        "qk_norm_scope": arch.qk_norm,
        "qk_norm_gain": "1 + weight"
        if arch.gain_offset == 1.0
        else ("weight" if arch.has_qk_norm else "none"),
        "rotary": json.dumps(rotary.as_attrs()),
        "site_notes": json.dumps(site_notes(arch, rotary, loaded.dims.head_dim), sort_keys=True),
        "dtype": dtype,
        "attention": f"{CAPTURE_ATTENTION}: transformers' SDPA attention and masks, recording q and k",
        "tokenizer_check": tokenizer_check,
        "eval_batch_sha256": eval_batch_sha256(input_ids),
        "eval_batch_shape": np.asarray(input_ids.shape, dtype=np.int64),
        "drop_first": int(drop_first),
    }


def _check_compatible(path: Path, cube: xr.Dataset, new: dict[str, Any]) -> None:
    """Refuse to mix spectra of another model, batch, drop_first, dtype or architecture into a cube.

    ``new`` holds the values of this extraction for some of the keys ``model_id``, ``eval_batch_sha256``,
    ``drop_first``, ``dtype``, ``family`` and ``architecture_key`` (the last two once a model is loaded).
    """
    if "model_id" not in cube.attrs:
        raise SpectraError(f"{path}: the cube holds a collapse run, not a public model; choose another --out")
    for key, want in new.items():
        have = cube.attrs.get(key)
        same = (
            json.loads(str(have or "null")) == json.loads(want)
            if key == "architecture_key"
            else str(have) == str(want)
        )
        if not same:
            shown = "another architecture (config)" if key == "architecture_key" else f"{key}={want!r}"
            raise SpectraError(
                f"{path}: the cube was computed with {key}={have!r} but this extraction has {shown}; spectra "
                "computed differently cannot share a cube (choose another --out)"
            )


def _history(job: _Job, added: list[Revision]) -> str:
    revs = ", ".join(f"{r.label} (step {r.step})" for r in added)
    return (
        f"collapse-spectra extract: added {revs} of {job.source.spec} on {job.device}, dtype {job.dtype}, "
        f"drop_first={job.drop_first}, eval batch {job.batch_file.resolve()} (sha256 {job.batch_sha}); "
        f"collapse {package_version('collapse')}, transformers {package_version('transformers')}"
    )


def _finish(cube: xr.Dataset, entries: list[dict[str, Any]]) -> xr.Dataset:
    """Cube-level records that cover every step: the revisions, the software versions, the tokens note."""
    cube.attrs["revisions"] = json.dumps(sorted(entries, key=lambda e: e["step"]))
    versions = json.loads(cube.attrs["versions"])
    versions.update(software_versions("transformers", "huggingface_hub", "tokenizers"))
    cube.attrs["versions"] = json.dumps(versions, sort_keys=True)
    nan_steps = {int(st) for st, t in zip(cube.step.values, cube.tokens.values.astype(float)) if np.isnan(t)}
    unknown = sorted({e["tokens_rule"] for e in entries if e["step"] in nan_steps})
    if unknown:
        cube["tokens"].attrs["note"] = "NaN where no rule gives the token count: " + "; ".join(unknown)
    else:
        cube["tokens"].attrs.pop("note", None)
    return cube


def extract_public(
    source: str | os.PathLike,
    *,
    batch: str | os.PathLike,
    out: str | os.PathLike,
    revisions: str | Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    drop_first: int = 0,
    tokens_per_step: int | None = None,
    force: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    evict: bool | None = None,
    on_note: Callable[[str], object] | None = None,
) -> ExtractResult:
    """Add the spectra of a public model's revisions that the cube does not hold yet.

    Parameters
    ----------
    source
        ``hf:ORG/NAME``, a local model directory, or a directory of revision sub-directories
        (:mod:`spectra.hf.revisions`). The hub and a directory go through the same code after the files
        are fetched.
    batch
        The dataset directory (or its ``eval_batch.safetensors``) whose batch is measured; its
        ``tokenizer.json`` must match the model's by content.
    out
        The cube to create or extend.
    revisions
        A selection (:mod:`spectra.hf.selection`): ``REV`` or ``REV:STEP`` names, ``all``, globs, ``every:N``,
        ``log:K``, ``range:A-B``, comma-separated or as a list (default: ``main``, every sub-directory, or ``.``).
    device, dtype
        Where and in which precision the forward pass runs (``float32``, ``bfloat16``, ``float16``).
    drop_first
        Positions dropped at the start of every sequence before the SVDs.
    tokens_per_step
        Tokens per optimizer step, when no family rule gives the token counts.
    force
        Measure even if the batch's tokenizer differs from the model's, or the model has none (the cube's
        ``tokenizer_check`` says so).
    progress
        Progress bars on stderr.
    cache_dir
        The Hugging Face cache (default: ``huggingface_hub``'s, ``HF_HUB_CACHE``).
    evict
        Hub sources: delete each revision this sweep brought into the cache as soon as its spectra are in the
        cube (:mod:`spectra.hf.cache`). Default: True for the hub; a local source is never deleted.
    on_note
        Called with each line about what the selection leaves out (names without a step, rules that select
        nothing, gaps) and what was evicted; None: no notes.

    Returns
    -------
    ExtractResult
        The cube's path and the steps added and skipped.

    Notes
    -----
    Incremental and atomic like :func:`spectra.extract.run.extract`: revisions whose step the cube holds are
    neither downloaded nor loaded; the cube is written to a temporary file and renamed, after every revision
    that is to be evicted and otherwise at most once a minute. One model is in memory at a time; on the hub,
    the next revision downloads while one is measured.

    Raises
    ------
    SpectraError
        An unknown source, revision, or architecture; a selection with a revision without a step or two
        revisions at one step; weights that are not safetensors; a tokenizer mismatch (without ``force``);
        revisions of different architectures; an existing cube of something else; a batch that does not fit the
        model; ``evict`` for a local source.
    """
    src = parse_source(source)
    plan = plan_revisions(src, revisions, tokens_per_step=tokens_per_step).check()
    evicting = _evict_choice(src, evict)
    note = on_note or (lambda line: None)
    for line in plan.notes():
        note(line)
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise SpectraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    job = _Job(src, dev, dtype, drop_first, force, cache_dir, *_public_batch(batch))
    out = check_writable(Path(out), "cube")
    with ExclusiveLock(out, f"cube {out}"):
        remove_stale_temporaries(out)  # under the lock: debris of a killed extraction of this cube
        existing, entries = _existing_cube(out, job)
        todo, skipped = _revisions_to_do(out, list(plan.revisions), entries)
        ledger = SweepLedger.open(out, src.model_id, hub_cache_dir(cache_dir)) if evicting else None
        with RevisionFetcher(src, todo, cache_dir=cache_dir, ledger=ledger, progress=progress) as fetcher:
            added = _extract_revisions(job, todo, out, existing, entries, progress, fetcher) if todo else []
        if fetcher.evicted:
            note(
                f"evicted from the Hugging Face cache once measured: {len(fetcher.evicted)} revisions "
                f"({fetcher.freed / 1e9:.2f} GB)"
            )
        return ExtractResult(path=out, added=tuple(r.step for r in added), skipped=skipped)


def _evict_choice(source: ModelSource, evict: bool | None) -> bool:
    """``evict`` resolved: by default on for the hub, off for local sources (which are never deleted)."""
    if evict and source.kind != "hub":
        raise SpectraError(
            f"--evict deletes revisions from the Hugging Face cache; {source.spec} is a local directory, which "
            "extraction never deletes"
        )
    return source.kind == "hub" if evict is None else evict


@dataclass(frozen=True)
class _Job:
    """What every revision of one :func:`extract_public` call is measured with."""

    source: ModelSource
    device: torch.device
    dtype: str
    drop_first: int
    force: bool
    cache_dir: str | os.PathLike | None
    batch_file: Path
    dataset_tokenizer: Path
    input_ids: torch.Tensor
    batch_sha: str


def _public_batch(batch: str | os.PathLike) -> tuple[Path, Path, torch.Tensor, str]:
    """The eval batch file, the dataset tokenizer beside it (a public model's must match it), the batch and its
    sha256."""
    batch_file = eval_batch_path(batch)
    dataset_tokenizer = batch_file.parent / TOKENIZER_FILE
    if not dataset_tokenizer.is_file():
        raise SpectraError(
            f"{batch_file.parent}: no {TOKENIZER_FILE} beside the eval batch; a public model needs the dataset "
            "directory, to check that its tokenizer is the model's"
        )
    input_ids = load_eval_batch(batch_file)
    return batch_file, dataset_tokenizer, input_ids, eval_batch_sha256(input_ids)


def _existing_cube(out: Path, job: _Job) -> tuple[xr.Dataset | None, list[dict[str, Any]]]:
    """The cube at ``out`` and its revision records, after checking it was computed as this extraction computes
    (model, batch, drop_first, dtype); ``(None, [])`` when there is none yet."""
    if not out.exists():
        return None, []
    try:
        existing = open_cube(out)
    except SpectraError as e:
        raise SpectraError(
            f"{e}; the existing file is left as it is: move it away or choose another --out"
        ) from None
    cheap = {
        "model_id": job.source.model_id,
        "eval_batch_sha256": job.batch_sha,
        "drop_first": job.drop_first,
        "dtype": job.dtype,
    }
    _check_compatible(out, existing, cheap)
    return existing, json.loads(str(existing.attrs.get("revisions", "[]")))


def _revisions_to_do(
    out: Path, planned: list[Revision], entries: list[dict[str, Any]]
) -> tuple[list[Revision], tuple[int, ...]]:
    """The planned revisions the cube does not hold yet, and the steps it holds; a step holding another revision
    than planned is refused."""
    done = {int(e["step"]): e["revision"] for e in entries}
    for rev in planned:
        if rev.step in done and done[rev.step] != rev.label:
            raise SpectraError(
                f"{out}: step {rev.step} holds revision {done[rev.step]!r}, not {rev.label!r}; choose another --out"
            )
    todo = [r for r in planned if r.step not in done]
    return todo, tuple(r.step for r in planned if r.step in done)


def _extract_revisions(
    job: _Job,
    todo: list[Revision],
    out: Path,
    existing: xr.Dataset | None,
    entries: list[dict[str, Any]],
    progress: bool,
    fetcher: RevisionFetcher,
) -> list[Revision]:
    """Measure ``todo`` one model at a time as ``fetcher`` hands them over; rewrite the cube after each revision
    that is then evicted, else at most once a minute, and at the end."""
    new: list[xr.Dataset] = []
    added: list[Revision] = []
    key, flushed = None, 0
    last_flush = time.monotonic()
    bar = tqdm(todo, desc=f"extract {job.source.model_id}", unit="rev", disable=not progress)
    for rev in bar:
        bar.set_postfix(revision=rev.label)
        fetched = fetcher.next()
        loaded, attrs, entry = _load_revision(job, fetched)
        if key is None:
            key = attrs["architecture_key"]
            if existing is not None:
                _check_compatible(out, existing, {k: attrs[k] for k in ("family", "architecture_key")})
        elif attrs["architecture_key"] != key:
            raise SpectraError(
                f"revision {rev.label!r} has another architecture (config) than {todo[0].label!r}"
            )
        new.append(spectra_for_public_model(loaded, job.input_ids, drop_first=job.drop_first, attrs=attrs))
        added.append(rev)
        entries.append(entry)
        del loaded  # one model in memory at a time
        gc.collect()
        if job.device.type == "cuda":
            torch.cuda.empty_cache()
        if fetcher.will_evict(fetched) or time.monotonic() - last_flush > _FLUSH_SECONDS:
            write_cube(_finish(combine_steps(existing, new, _history(job, added)), entries), out)
            flushed, last_flush = len(new), time.monotonic()
        fetcher.measured(fetched)  # its spectra are on disk now: evicted if the sweep downloaded it
    bar.close()
    if flushed < len(new):
        write_cube(_finish(combine_steps(existing, new, _history(job, added)), entries), out)
    return added


def _load_revision(job: _Job, fetched: FetchedRevision) -> tuple[PublicModel, dict[str, Any], dict[str, Any]]:
    """One fetched revision's tokenizer checked against the dataset's and its model loaded: the model, the
    cube's attributes for it, and its entry in the cube's ``revisions`` record."""
    rev = fetched.revision
    model_tokenizer = fetched.directory / TOKENIZER_FILE
    match = check_tokenizer(
        job.dataset_tokenizer, model_tokenizer if model_tokenizer.is_file() else None, force=job.force
    )
    loaded = load_public_model(fetched, job.device, job.dtype)
    attrs = _model_attrs(job.source, loaded, job.input_ids, job.drop_first, job.dtype, match)
    entry = {
        "step": rev.step,
        "revision": rev.label,
        "commit": fetched.commit,
        "tokens_rule": rev.tokens_rule,
        "tokenizer_check": match,
    }
    return loaded, attrs, entry


__all__ = [
    "DTYPES",
    "PublicModel",
    "architecture_key",
    "extract_public",
    "load_public_model",
    "spectra_for_public_model",
]
