"""Builders shared by the test modules: tiny datasets and training runs, checkpoints, cubes, surgery results.

Plain functions and constants, imported as ``from helpers import ...`` (pytest's default import mode puts
``tests/`` on ``sys.path``). The fixtures built from them live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file, save_file

from spectra.cube import open_cubes
from trainer.checkpoint import save_checkpoint
from trainer.config import ModelConfig, OptimConfig, RunConfig, TrainConfig
from trainer.data.prepare import prepare_data
from trainer.model import LLM

SITES = ("proj", "unit", "normed", "rope")  # the read-out sites of docs/cube.md, in cube order
CENTERINGS = ("uncentered", "centered")


# ----------------------------------------------------------------------------------------------------
# a generated corpus, a dataset prepared from it, and the settings of a tiny training run

_NOUNS = "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox owl frog duck".split()
_VERBS = "sees chases likes finds follows helps watches meets feeds calls".split()
_ADJ = "big small red green old young quick slow happy sad".split()


def tiny_corpus(n_docs: int = 240, seed: int = 0) -> list[str]:
    """Deterministic documents of simple sentences, each unique (it ends with its own number word)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = [
            f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(sentences) + f" Story {i}.")
    return docs


def make_tiny_dataset(tmp_path: Path, vocab_size: int = 320, **kwargs) -> Path:
    """Prepare a small dataset (about 20k tokens, vocab ``vocab_size``) under ``tmp_path`` in about a second.

    The text is generated (no corpus needed); the eval batch is 4 x 64 tokens from the val split.
    Extra keyword arguments go to :func:`prepare_data`. The session's ``tiny_data_dir`` is one of these.
    """
    src = tmp_path / "tiny_corpus.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus()))
    options = dict(
        vocab_size=vocab_size, val_frac=0.1, test_frac=0.1, eval_seqs=4, eval_seq_len=64, progress=False
    )
    options.update(kwargs)
    return prepare_data(tmp_path / "data" / "tiny", [str(src)], **options)


TINY_MODEL_OVERRIDES = (  # 24k parameters at vocab 300: 2 layers of 2 query heads sharing one 16-dim kv head
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.d_ff=64",
    "model.context_length=32",
)


def tiny_overrides(vocab: int, optim: Mapping[str, object] | None = None, **train: object) -> list[str]:
    """``--set`` overrides of the ``tiny`` preset: the :data:`TINY_MODEL_OVERRIDES`, steps of 4 x 32 tokens.

    ``vocab`` is the dataset's vocabulary size; ``optim`` and ``train`` add or replace fields of those
    tables (values are written as JSON, which is also valid TOML for numbers, strings, booleans and lists).
    Validation reads 256 tokens unless ``val_tokens`` says otherwise.

    Examples
    --------
    >>> tiny_overrides(300, optim={"schedule": "cosine"}, tokens=1280)[-1]
    'train.tokens=1280'
    """
    model = [f"model.vocab_size={vocab}", *TINY_MODEL_OVERRIDES]
    train = {"batch_size": 4, "seq_len": 32, "val_tokens": 256, **train}
    return (
        model
        + [f"optim.{k}={json.dumps(v)}" for k, v in (optim or {}).items()]
        + [f"train.{k}={json.dumps(v)}" for k, v in train.items()]
    )


@contextlib.contextmanager
def small_filesystem(path: Path, size: int) -> Iterator[Path]:
    """A real file system of ``size`` bytes (a tmpfs) mounted at ``path`` for the block, then unmounted.

    What a full disk does to a command is tested on a real one: the kernel's ENOSPC, whatever the libraries
    make of it. Mounting needs root (CI and the development machines run tests as root on Debian) in a
    mount namespace that allows it; elsewhere the test is skipped with the reason.
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        done = subprocess.CompletedProcess([], 1, "", str(e))
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill (not root, or not permitted here): {done.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def unwritable_directory(path: Path, fill: Callable[[Path], object]) -> Iterator[Path]:
    """The directory ``path``, filled by ``fill(path)``, then made unwritable for this process for the block.

    Not root: its mode is 0555 (what a user meets in a shared directory). Root ignores modes, so there it is
    a small file system (:func:`small_filesystem`) remounted read-only, which stops root too.
    """
    if os.geteuid() != 0:
        path.mkdir(parents=True)
        fill(path)
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with small_filesystem(path, 8 << 20):
        fill(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True, timeout=30)
        yield path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file such as a run's ``metrics.jsonl``, in file order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# rounding: how far two bfloat16 computations of the same thing may differ

BF16_UNIT_ROUNDOFF = 2.0**-8
"""bfloat16 keeps 8 significant bits: one rounding errs by at most 2**-8 of the value (float32: 2**-24)."""


def bf16_newton_schulz_difference(steps: int = 5) -> float:
    """How far two bfloat16 evaluations of the same quintic Newton-Schulz steps may differ, entry by entry, as a
    fraction of the largest entry of the result: ``2 * 3 * steps * 2**-8`` (0.117 for five steps).

    Each evaluation rounds three bfloat16 results per step (the Gram matrix, the polynomial, the new X; the
    matmuls accumulate in float32, whose error of about width * 2**-24 is far below one bfloat16 rounding). Each
    rounding errs by at most 2**-8 of an entry no larger than the result's largest, and the steps carry it on
    without growth relative to the entries: a singular value still growing is multiplied by about a = 3.4 together
    with its error, and one in the band [0.7, 1.2] where the iteration settles is not amplified. So an evaluation
    is within ``3 * steps * 2**-8`` of the exact iteration and two evaluations that round differently (another
    kernel, a batched call, a compiled graph, another CPU) within twice that of each other. Other rounding orders
    simulated on 270 Gaussian inputs of the tests' shapes (each product rounded once from its exact value, or
    A^2 rounded before the polynomial) stayed below 14 * 2**-8.

    The premise is an input whose singular values are not spread over decades, such as a Gaussian matrix:
    singular values 1e-3 of the largest sit where the five steps compose to a slope up to 3.4445**5 = 486,
    and there the roundings are amplified (up to 90 * 2**-8 was seen). Such inputs, and every check that the
    arithmetic is the same, belong in float64: ``orthogonalize(..., dtype=torch.float64)``.
    """
    return 2 * 3 * steps * BF16_UNIT_ROUNDOFF


# ----------------------------------------------------------------------------------------------------
# models and run directories of checkpoints (no training)

EVAL_SHAPE = (3, 24)  # n_seqs, seq_len: N = 72 tokens per head, head_dim 8


def tiny_model_config(qk_norm: str = "learned", **changes: object) -> ModelConfig:
    """A two-layer model of 4 query and 2 key/value heads of dimension 8 over a 64-token vocabulary.

    ``changes`` replace fields, so a module that needs another context length or init shows it at the call.

    Examples
    --------
    >>> tiny_model_config("none", context_length=16).resolved_head_dim
    8
    """
    base = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        context_length=64,
        qk_norm=qk_norm,
    )
    return ModelConfig(**{**base, **changes})


def perturbed_llm(cfg: ModelConfig, seed: int) -> LLM:
    """A seeded fresh model whose trainable weights (QK-norm gains included, unless frozen) are perturbed.

    Initialisation leaves every QK-norm gain at exactly 1; the perturbation gives each gain coordinate
    (and every other trainable weight) its own value, as training would. The model is left in training mode.
    """
    torch.manual_seed(seed)
    model = LLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.05))
    return model


def make_run(
    tmp_path: Path, qk_norm: str = "learned", steps: tuple[int, ...] = (0, 10, 20), name: str = "test-run"
) -> Path:
    """A run directory ``tmp_path/<name>`` with ``checkpoints/`` and a dataset directory beside it.

    Every checkpoint holds a freshly initialised model whose trainable weights (QK-norm gains
    included, unless frozen) are perturbed with a step-dependent seed, so heads, layers and steps
    all differ. The dataset directory ``tmp_path/data/tiny-data`` holds a random eval batch.
    """
    cfg = tiny_model_config(qk_norm)
    run_cfg = RunConfig(
        name=name,
        model=cfg,
        optim=OptimConfig(name="adamw"),
        train=TrainConfig(tokens=64 * 100, batch_size=2, seq_len=32, seed=7),
    ).validate()
    data_dir = tmp_path / "data" / "tiny-data"
    batch_file = data_dir / "eval_batch.safetensors"
    if not batch_file.exists():
        data_dir.mkdir(parents=True)
        ids = torch.randint(0, cfg.vocab_size, EVAL_SHAPE, generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, str(batch_file))
    ids = load_file(str(batch_file))["input_ids"]
    sha = hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    run = tmp_path / name
    for step in steps:
        model = perturbed_llm(cfg, seed=1000 + step)
        tokens = step * 64
        save_checkpoint(
            run / "checkpoints" / f"tokens_{tokens:012d}.safetensors",
            model,
            {
                "model_config": dataclasses.asdict(cfg),
                "run_config": run_cfg.to_dict(),
                "run_name": name,
                "step": step,
                "tokens": tokens,
                "eval_batch_sha256": sha,
                "data_dir": str(data_dir),
                "dataset": {"name": "tiny-data", "sources": ["random"]},
                "train_loss": math.nan if step == 0 else 4.0 - step / 100,
                "val_loss": 4.2 - step / 100,
                "seed": 7,
                "versions": {"torch": torch.__version__},
            },
        )
    return run


def eval_ids(run: Path) -> torch.Tensor:
    return load_file(str(run.parent / "data" / "tiny-data" / "eval_batch.safetensors"))["input_ids"]


def checkpoint_files(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("tokens_*.safetensors"))


# ----------------------------------------------------------------------------------------------------
# cubes (docs/cube.md): ``make_cube`` has random, realistic spectra for I/O and metric tables;
# ``synthetic_cube`` has spectra, gains and energies with known statistics

N_TOKENS = 24  # tokens behind the random spectra of make_cube


def _random_spectra(rng: np.random.Generator, shape: tuple[int, ...], head_dim: int) -> np.ndarray:
    """Singular values of random (N_TOKENS x head_dim) matrices with decaying column scales, float64."""
    scales = np.geomspace(1.0, 0.05, head_dim)  # (D,) a collapsing spectrum, as in a trained model
    x = rng.standard_normal((*shape, N_TOKENS, head_dim)) * scales  # (..., N, D)
    return np.linalg.svd(x, compute_uv=False)  # (..., D), descending


def make_cube(
    *,
    run_name: str = "A1",
    qk_norm: str = "learned",
    optimizer: str = "muon",
    seed: int = 0,
    data: str = "bible-mix",
    steps: tuple[int, ...] = (0, 10, 20),
    tokens_per_step: int = 512,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    k_sv: np.ndarray | None = None,
    rng_seed: int = 0,
) -> xr.Dataset:
    """A cube with every variable, coordinate and global attribute of docs/cube.md.

    ``k_sv`` (step, layer, kv_head, site, centering, sv) replaces the random key spectra when given.
    """
    rng = np.random.default_rng(rng_seed)
    S, L, H, Hkv, D = len(steps), n_layers, n_heads, n_kv_heads, head_dim
    q = _random_spectra(rng, (S, L, H, len(SITES), len(CENTERINGS)), D)
    k = (
        _random_spectra(rng, (S, L, Hkv, len(SITES), len(CENTERINGS)), D)
        if k_sv is None
        else np.asarray(k_sv)
    )
    assert k.shape == (S, L, Hkv, len(SITES), len(CENTERINGS), D)
    energy_q = rng.random((S, L, H, len(SITES), D))
    energy_k = rng.random((S, L, Hkv, len(SITES), D))
    gamma = rng.random((S, L, D)) + 0.5
    if qk_norm == "none":
        q, k = q.copy(), k.copy()
        for arr in (q, k):
            arr[:, :, :, SITES.index("unit")] = np.nan
            arr[:, :, :, SITES.index("normed")] = arr[:, :, :, SITES.index("proj")]
        energy_q[:, :, :, SITES.index("unit")] = np.nan
        energy_k[:, :, :, SITES.index("unit")] = np.nan
        gamma[:] = np.nan
    act = "activation units"
    ds = xr.Dataset(
        {
            "q_sv": (
                ("step", "layer", "head", "site", "centering", "sv"),
                q,
                {"long_name": "query singular values", "units": act},
            ),
            "k_sv": (
                ("step", "layer", "kv_head", "site", "centering", "sv"),
                k,
                {"long_name": "key singular values", "units": act},
            ),
            "wq_sv": (
                ("step", "layer", "head", "sv"),
                _random_spectra(rng, (S, L, H), D),
                {"long_name": "W_q head singular values", "units": "1"},
            ),
            "wk_sv": (
                ("step", "layer", "kv_head", "sv"),
                _random_spectra(rng, (S, L, Hkv), D),
                {"long_name": "W_k head singular values", "units": "1"},
            ),
            "q_gamma": (
                ("step", "layer", "dim"),
                gamma,
                {"long_name": "QK-norm gain of the queries", "units": "1"},
            ),
            "k_gamma": (
                ("step", "layer", "dim"),
                gamma.copy(),
                {"long_name": "QK-norm gain of the keys", "units": "1"},
            ),
            "q_energy": (
                ("step", "layer", "head", "site", "dim"),
                energy_q,
                {"long_name": "mean square query coordinate", "units": "activation units2"},
            ),
            "k_energy": (
                ("step", "layer", "kv_head", "site", "dim"),
                energy_k,
                {"long_name": "mean square key coordinate", "units": "activation units2"},
            ),
            "train_loss": (
                "step",
                np.r_[np.nan, rng.random(S - 1) + 3.0],
                {"long_name": "training loss", "units": "nats/token"},
            ),
            "val_loss": (
                "step",
                rng.random(S) + 3.0,
                {"long_name": "validation loss", "units": "nats/token"},
            ),
        },  # fmt: skip
        coords={
            "step": (
                "step",
                np.asarray(steps, dtype=np.int64),
                {"long_name": "optimizer step", "units": "1"},
            ),
            "tokens": (
                "step",
                np.asarray(steps, dtype=np.int64) * tokens_per_step,
                {"long_name": "training tokens", "units": "tokens"},
            ),
            "layer": ("layer", np.arange(L), {"long_name": "transformer block", "units": "1"}),
            "head": ("head", np.arange(H), {"long_name": "query head", "units": "1"}),
            "kv_head": ("kv_head", np.arange(Hkv), {"long_name": "key/value head", "units": "1"}),
            "site": ("site", list(SITES), {"long_name": "read-out site", "units": "1"}),
            "centering": ("centering", list(CENTERINGS), {"long_name": "centring over tokens", "units": "1"}),
            "sv": ("sv", np.arange(D), {"long_name": "singular value index, descending", "units": "1"}),
            "dim": ("dim", np.arange(D), {"long_name": "coordinate within a head", "units": "1"}),
        },  # fmt: skip
        attrs={
            "Conventions": "CF-1.10",
            "title": f"attention Q/K singular-value spectra of run {run_name}",
            "history": "synthetic cube written by tests/helpers.py",
            "source": "tests",
            "format": "collapse-spectra-cube",
            "format_version": 1,
            "run_name": run_name,
            "qk_norm": qk_norm,
            "optimizer": optimizer,
            "seed": seed,
            "data": data,
            "model_config": json.dumps({"n_layers": L, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D}),
            "run_config": json.dumps({"seed": seed}),
            "eval_batch_sha256": "0" * 64,
            "eval_batch_shape": np.array([2, 16]),
            "drop_first": 4,
            "n_tokens": N_TOKENS,
            "train_tokens": int(max(steps) * tokens_per_step),
            "versions": json.dumps({"numpy": np.__version__, "xarray": xr.__version__}),
        },
    )
    return ds


def write_cube(path: Path, ds: xr.Dataset) -> Path:
    """Write ``ds`` as docs/cube.md says (NetCDF4, zlib) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    ds.to_netcdf(path, engine="netcdf4", format="NETCDF4", encoding=encoding)
    return path


def flat_spectrum(rank: float, head_dim: int) -> np.ndarray:
    """Singular values whose singular-value participation ratio is exactly ``rank`` when it is an integer.

    ``floor(rank)`` ones, then the fractional part as one extra smaller value; the rest zeros.
    """
    s = np.zeros(head_dim)
    whole = int(math.floor(rank))
    s[:whole] = 1.0
    if whole < head_dim and rank > whole:
        s[whole] = rank - whole
    return s


def synthetic_cube(
    run_name: str = "A1-s0",
    *,
    qk_norm: str = "learned",
    optimizer: str = "muon",
    seed: int = 0,
    data: str = "bible-mix",
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    steps: tuple[int, ...] = (0, 10, 20),
    tokens_per_step: int = 1000,
    rank: float | np.ndarray = 4.0,
    gamma: np.ndarray | None = None,
    energy: np.ndarray | None = None,
) -> xr.Dataset:
    """A cube per docs/cube.md with known spectra.

    ``rank`` is the singular-value PR of every key and query head at every site and centring: a
    scalar, or an array (step, layer, kv_head) for the keys. ``gamma`` (step, layer, dim) defaults to 1 at
    step 0 then a spread that grows with the step (learned), 1 (frozen) or NaN (none). ``energy``
    (step, layer, kv_head, dim) at site ``unit`` defaults to random positive values; ``normed`` is
    ``gamma² × unit``.
    """
    rng = np.random.default_rng(seed + 17)
    S, L, H, Hkv, D = len(steps), n_layers, n_heads, n_kv_heads, head_dim
    k_rank = np.broadcast_to(np.asarray(rank, dtype=np.float64), (S, L, Hkv))
    k_sv = np.empty((S, L, Hkv, 4, 2, D))
    for idx in np.ndindex(S, L, Hkv):
        k_sv[idx] = flat_spectrum(k_rank[idx], D)  # same at every site and centring
    q_sv = np.repeat(k_sv[:, :, :1], H, axis=2)
    if gamma is None:
        if qk_norm == "learned":
            spread = np.linspace(0.2, 1.8, D)
            gamma = np.stack([np.ones(D) + (s / max(steps)) * (spread - 1) for s in steps])
            gamma = np.repeat(gamma[:, None, :], L, axis=1)
        elif qk_norm == "frozen":
            gamma = np.ones((S, L, D))
        else:
            gamma = np.full((S, L, D), np.nan)
    if energy is None:
        energy = rng.uniform(0.5, 1.5, size=(S, L, Hkv, D))
    k_energy = np.empty((S, L, Hkv, 4, D))
    k_energy[:, :, :, 0] = energy * 3.0  # proj: an arbitrary scale
    k_energy[:, :, :, 1] = energy if qk_norm != "none" else np.nan
    k_energy[:, :, :, 2] = energy * gamma[:, :, None, :] ** 2 if qk_norm != "none" else energy * 3.0
    k_energy[:, :, :, 3] = k_energy[:, :, :, 2]
    q_energy = np.repeat(k_energy[:, :, :1], H, axis=2)
    if qk_norm == "none":
        k_sv[:, :, :, 1] = np.nan
        q_sv[:, :, :, 1] = np.nan
    tokens = np.asarray(steps, dtype=np.int64) * tokens_per_step
    val = 8.0 - 0.1 * np.arange(S) - 0.01 * seed
    train = val + 0.05
    train[0] = np.nan
    u = {"units": "1"}
    ds = xr.Dataset(
        {
            "q_sv": (
                ("step", "layer", "head", "site", "centering", "sv"),
                q_sv,
                {"long_name": "query singular values", "units": "activation units"},
            ),
            "k_sv": (
                ("step", "layer", "kv_head", "site", "centering", "sv"),
                k_sv,
                {"long_name": "key singular values", "units": "activation units"},
            ),
            "wq_sv": (
                ("step", "layer", "head", "sv"),
                q_sv[:, :, :, 0, 0],
                {"long_name": "W_q singular values", **u},
            ),
            "wk_sv": (
                ("step", "layer", "kv_head", "sv"),
                k_sv[:, :, :, 0, 0],
                {"long_name": "W_k singular values", **u},
            ),
            "q_gamma": (("step", "layer", "dim"), gamma.copy(), {"long_name": "query QK-norm gain", **u}),
            "k_gamma": (("step", "layer", "dim"), gamma.copy(), {"long_name": "key QK-norm gain", **u}),
            "q_energy": (
                ("step", "layer", "head", "site", "dim"),
                q_energy,
                {"long_name": "query coordinate energy", "units": "activation units^2"},
            ),
            "k_energy": (
                ("step", "layer", "kv_head", "site", "dim"),
                k_energy,
                {"long_name": "key coordinate energy", "units": "activation units^2"},
            ),
            "train_loss": (("step",), train, {"long_name": "training loss", "units": "nats/token"}),
            "val_loss": (("step",), val, {"long_name": "validation loss", "units": "nats/token"}),
        },
        coords={
            "step": (
                "step",
                np.asarray(steps, dtype=np.int64),
                {"long_name": "optimizer step", "units": "1"},
            ),
            "tokens": ("step", tokens, {"long_name": "training tokens", "units": "tokens"}),
            "layer": ("layer", np.arange(L), {"long_name": "layer", **u}),
            "head": ("head", np.arange(H), {"long_name": "query head", **u}),
            "kv_head": ("kv_head", np.arange(Hkv), {"long_name": "key/value head", **u}),
            "site": ("site", list(SITES), {"long_name": "read-out site"}),
            "centering": ("centering", list(CENTERINGS), {"long_name": "centring"}),
            "sv": ("sv", np.arange(D), {"long_name": "singular value index", **u}),
            "dim": ("dim", np.arange(D), {"long_name": "coordinate within a head", **u}),
        },
        attrs={
            "Conventions": "CF-1.10",
            "title": f"synthetic cube {run_name}",
            "history": "built by tests",
            "source": "tests",
            "format": "collapse-spectra-cube",
            "format_version": "1",
            "run_name": run_name,
            "qk_norm": qk_norm,
            "optimizer": optimizer,
            "seed": seed,
            "data": data,
            "model_config": json.dumps(
                {"n_layers": L, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D, "qk_norm": qk_norm}
            ),
            "run_config": json.dumps(
                {"name": run_name, "optim": {"name": optimizer}, "train": {"seed": seed}}
            ),
            "eval_batch_sha256": "0" * 64,
            "eval_batch_shape": "4,32",
            "drop_first": 0,
            "n_tokens": 128,
            "train_tokens": int(tokens[-1]),
            "versions": json.dumps({"numpy": np.__version__}),
        },
    )
    return ds


def stack(cubes: list[xr.Dataset]) -> xr.Dataset:
    """Stack cubes along ``run`` through the real reader: write each, then ``open_cubes``."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_cube(Path(tmp) / f"{i}" / "spectra.nc", c) for i, c in enumerate(cubes)]
        return open_cubes(paths, lazy=False)  # loaded: the files go with the directory on return


# ----------------------------------------------------------------------------------------------------
# surgery results (the surgery.nc beside a cube)


def surgery_result(run_name: str = "a1-s0", gamma_applicable: bool = True) -> xr.Dataset:
    fractions = np.array([0.0, 0.25, 0.5, 0.75])
    seeds = np.arange(3)
    first_only = np.where(seeds[None, :] == 0, 1.0, np.nan)
    gamma = (4.0 + 2.0 * fractions)[:, None] * first_only
    if not gamma_applicable:
        gamma = np.full_like(gamma, np.nan)
    svd = (4.0 + 1.0 * fractions)[:, None] * first_only
    random = (4.0 + 3.0 * fractions)[:, None] + np.array([-0.1, 0.0, 0.1])[None, :]
    return xr.Dataset(
        {
            "loss": (
                ("strategy", "fraction", "seed"),
                np.stack([gamma, svd, random]),
                {"units": "nats/token"},
            ),
            "baseline_loss": ((), 4.0, {"units": "nats/token"}),
        },
        coords={"strategy": ["gamma", "svd", "random"], "fraction": fractions, "seed": seeds},
        attrs={
            "run_name": run_name,
            "qk_norm": "learned" if gamma_applicable else "none",
            "optimizer": "muon",
            "step": 20,
            "tokens": 20_000,
            "checkpoint": f"runs/{run_name}/checkpoints/tokens_000000020000.safetensors",
            "layers": "0,1",
            "test_tokens": 4096,
            "gamma_status": "ok" if gamma_applicable else "model has no QK-norm",
        },
    )
