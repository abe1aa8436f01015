"""Pruning surgery: the test loss a model loses when key dimensions are removed by gamma, by SVD, or at random.

The experiment plan's section 3.4 asks whether the QK-norm gain gamma is a reliable proxy for which key
dimensions a head uses. This module removes the same number of key dimensions from every pruned head with
three strategies and measures the next-token loss on the dataset's held-out **test** split (never used for
any SVD):

``gamma``
    remove the coordinates whose key-norm gain ``|gamma_j|`` is smallest (gamma is shared by the heads of
    a layer, so every head of a layer loses the same coordinates);
``svd``
    project each head's block of ``W_k`` onto the top right singular vectors of that head's keys, measured
    at site ``proj`` on the fixed eval batch (uncentred, float64);
``random``
    remove random coordinates of each head, one draw per seed; the mean and a 95% interval over seeds are
    reported.

How a coordinate is removed (a per-head mask on the QK-normed keys, before RoPE), why whole rotary pairs are
removed by default, and why ``svd`` acts before the norm instead are explained in ``docs/surgery.md``. The pieces
are [`pruning`][spectra.surgery.pruning] (what is removed and how), [`loss`][spectra.surgery.loss] (the test
split and its loss) and [`file`][spectra.surgery.file] (the result's format); this module runs the experiment.

Example
-------
>>> ds = run_surgery("runs/a1/checkpoints/tokens_000025000000.safetensors", "data/bbe",
...                  fractions=(0, 0.25, 0.5), seeds=5)                      # doctest: +SKIP
>>> ds.loss_mean.sel(fraction=0.5) - ds.baseline_loss                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from spectra.dataset import read_meta
from spectra.errors import SpectraError
from spectra.extract.load import (
    EVAL_BATCH_FILE,
    Checkpoint,
    eval_batch_sha256,
    load_checkpoint,
    load_eval_batch,
    resolve_device,
)
from spectra.fileio import ExclusiveLock, check_writable, remove_stale_temporaries
from spectra.rundir import run_dir_of
from spectra.surgery.file import (
    GAMMA_OK,
    INTERVAL_LEVEL,
    SURGERY_FILENAME,
    check_same_experiment,
    empty_surgery,
    merge_surgeries,
    read_own_surgery,
    with_loss,
    write_surgery,
)
from spectra.surgery.loss import evaluate_loss, loss_windows, test_split
from spectra.surgery.pruning import (
    DEFAULT_BATCH_SIZE,
    gamma_removal_orders,
    gamma_status,
    keep_masks,
    key_singular_vectors,
    parse_layers,
    pruned_keys,
    random_removal_order,
    removed_count,
    svd_projectors,
)
from trainer.model import LLM
from trainer.provenance import software_versions, utc_now

STRATEGIES = ("gamma", "svd", "random")
DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
DEFAULT_TEST_TOKENS = 65_536
DEFAULT_SEEDS = 3


def _run_field(ckpt: Checkpoint, section: str, key: str):
    try:
        return ckpt.run_config[section][key]
    except (KeyError, TypeError):
        raise SpectraError(f"{ckpt.path}: run_config has no {section}.{key}") from None


@dataclasses.dataclass
class _Setup:
    """Everything one surgery needs, checked before any loss is measured."""

    ckpt: Checkpoint
    model: LLM
    data_dir: Path
    layers: tuple[int, ...]
    removed: list[int]
    windows: torch.Tensor
    seq_len: int
    status: str
    vectors: dict
    used_hash: str


def _data_hash(meta: dict, data_dir: Path, ckpt: Checkpoint, force: bool) -> str:
    """The eval-batch hash of the dataset's meta.json, checked against the checkpoint's (see run_surgery)."""
    eval_meta = meta.get("eval_batch")
    data_hash = eval_meta.get("sha256") if isinstance(eval_meta, dict) else None
    if not isinstance(data_hash, str):
        raise SpectraError(f"{data_dir / 'meta.json'}: eval_batch.sha256 is missing")
    if eval_meta.get("split") == "test":
        raise SpectraError(
            f"{data_dir / 'meta.json'}: the eval batch was cut from the test split; the SVDs would then see "
            "the text the loss is measured on (prepare the dataset with the eval batch from the val split)"
        )
    if data_hash != ckpt.eval_batch_sha256 and not force:
        # the hash identifies the dataset: a different one may have trained on this one's test text
        raise SpectraError(
            f"{data_dir / 'meta.json'}: eval batch sha256 {data_hash} differs from the checkpoint's "
            f"{ckpt.eval_batch_sha256} ({ckpt.path}): not the dataset this run was trained on, so its test split "
            "may not be held out (use force to proceed anyway)"
        )
    return data_hash


def _setup(
    checkpoint: str | os.PathLike | Checkpoint,
    data_dir: str | os.PathLike | None,
    strategies: tuple[str, ...],
    fractions: tuple[float, ...],
    *,
    layers: str | Sequence[int] | None,
    pair_rope: bool,
    test_tokens: int,
    seq_len: int | None,
    batch_size: int,
    device: torch.device,
    force: bool,
) -> _Setup:
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device)
    model = ckpt.model.to(device).eval()
    cfg = model.cfg
    chosen = parse_layers(layers, cfg.n_layers)
    if data_dir is None:
        if not ckpt.data_dir:
            raise SpectraError(f"{ckpt.path}: no dataset directory recorded; pass data_dir (--data)")
        data_dir = ckpt.data_dir
    data_dir = Path(data_dir)
    meta = read_meta(data_dir, splits=("test",))
    used_hash = _data_hash(meta, data_dir, ckpt, force)
    seq_len = seq_len or int(_run_field(ckpt, "train", "seq_len"))
    if not 0 < seq_len <= cfg.context_length:
        raise SpectraError(
            f"seq_len={seq_len} must be in 1..{cfg.context_length} (the model's context_length)"
        )
    windows = loss_windows(
        test_split(data_dir, meta, cfg.vocab_size), seq_len, test_tokens, cfg.vocab_size,
        source=str(data_dir / meta["splits"]["test"]["file"]),
    )  # fmt: skip
    status = gamma_status(model, chosen) if "gamma" in strategies else "not requested"
    vectors = {}
    if "svd" in strategies:
        eval_batch = load_eval_batch(data_dir, expected_sha256=ckpt.eval_batch_sha256, force=force)  # (n, T)
        used_hash = eval_batch_sha256(eval_batch)
        if eval_batch.shape[1] > cfg.context_length:
            raise SpectraError(
                f"{data_dir / EVAL_BATCH_FILE}: sequences of {eval_batch.shape[1]} tokens exceed the "
                f"model's context_length {cfg.context_length}"
            )
        vectors = key_singular_vectors(model, eval_batch, chosen, batch_size)
    removed = [removed_count(f, cfg.resolved_head_dim, pair_rope) for f in fractions]
    return _Setup(ckpt, model, data_dir, chosen, removed, windows, seq_len, status, vectors, used_hash)


def _interventions(
    setup: _Setup, strategy: str, seed: int, pair_rope: bool
) -> Iterator[tuple[int, dict, dict]]:
    """(fraction index, key masks, W_k projections) of one strategy and seed, for every fraction."""
    cfg = setup.model.cfg
    if strategy == "svd":
        for f_i, n in enumerate(setup.removed):
            yield f_i, {}, svd_projectors(setup.vectors, n)
        return
    if strategy == "gamma":
        orders = gamma_removal_orders(setup.model, setup.layers, pair_rope)
    else:
        orders = {
            i: random_removal_order(
                seed, i, cfg.n_kv_heads, cfg.resolved_head_dim, pair_rope, cfg.rope_layout
            )
            for i in setup.layers
        }
    for f_i, n in enumerate(setup.removed):
        yield f_i, keep_masks(orders, n), {}


def run_surgery(
    checkpoint: str | os.PathLike | Checkpoint,
    data_dir: str | os.PathLike | None = None,
    *,
    strategies: Sequence[str] = STRATEGIES,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seeds: int = DEFAULT_SEEDS,
    layers: str | Sequence[int] | None = None,
    pair_rope: bool = True,
    test_tokens: int = DEFAULT_TEST_TOKENS,
    seq_len: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    reuse: xr.Dataset | None = None,
) -> xr.Dataset:
    """Test loss after removing a fraction of every pruned key head's dimensions, per strategy.

    Parameters
    ----------
    checkpoint
        A checkpoint file, or a :class:`spectra.extract.load.Checkpoint` (its model is moved to ``device`` and
        restored bit for bit after each measurement).
    data_dir
        The dataset directory the run was trained on; ``None`` uses the one recorded in the checkpoint.
        Its ``meta.json`` eval-batch hash must equal the checkpoint's (else :class:`SpectraError`, unless
        ``force``): the hash identifies the dataset, so the test split evaluated is the one held out from
        this run's training, not text another dataset may have trained on.
    strategies
        Any of ``"gamma"``, ``"svd"``, ``"random"``, in the order they appear in the output.
    fractions
        Fractions of ``head_dim`` removed from each pruned key head, in [0, 1]; see :func:`removed_count`.
        They are sorted and deduplicated in the output.
    seeds
        Number of random draws (seeds 0 .. seeds-1) for ``random``.
    layers
        Layers to prune (``None`` or ``"all"``: every layer; ``"0,1"``, ``"0-3"`` or a list of ints).
    pair_rope
        Remove whole rotary pairs ((j, j + D/2), or (2i, 2i + 1) for ``model.rope_layout = "interleaved"``)
        so that the rotation cannot move a kept coordinate into a removed slot; ``False`` removes single
        coordinates (the original gamma-surgery).
    test_tokens
        Predicted tokens of the test split to evaluate (capped by the split's length).
    seq_len
        Window length; ``None`` uses the run's ``train.seq_len``.
    batch_size
        Sequences per forward pass, for the test windows and for the eval batch.
    device
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
    force
        Proceed although the dataset's eval-batch hash differs from the checkpoint's.
    progress
        Show a progress bar (on stderr) over every forward pass of the test windows, with an estimate of
        the time left.
    echo
        Called with human-readable notes (a strategy that is not applicable and why).
    reuse
        An earlier result of the same experiment (same checkpoint, dataset, layers, windows: see
        :data:`IDENTITY_ATTRS`, else :class:`SpectraError`): its cells are kept, only the missing ones are
        measured, and the result holds the union of both grids.

    Returns
    -------
    xarray.Dataset
        ``loss(strategy, fraction, seed)`` and its seed mean and 95% interval, ``baseline_loss``,
        ``removed_dims(fraction)``; the schema is in ``docs/surgery.md``.
    """
    strategies, fractions = _checked_request(strategies, fractions, seeds, batch_size, test_tokens)
    device = resolve_device(device)
    setup = _setup(
        checkpoint, data_dir, strategies, fractions, layers=layers, pair_rope=pair_rope,
        test_tokens=test_tokens, seq_len=seq_len, batch_size=batch_size, device=device, force=force,
    )  # fmt: skip
    if setup.status not in (GAMMA_OK, "not requested") and echo is not None:
        echo(f"gamma strategy {setup.status}")
    grid_seeds = seeds if "random" in strategies else 1  # the deterministic strategies fill seed 0 only
    request = _experiment(setup, strategies, fractions, grid_seeds, pair_rope, force, batch_size, device)
    if reuse is not None:
        check_same_experiment(reuse, request)
        request = merge_surgeries(reuse, request)
    todo = _missing_cells(request, strategies, fractions, seeds, setup.status)
    baseline = float(reuse["baseline_loss"]) if reuse is not None else None
    loss, baseline = _measure(setup, request, todo, baseline, fractions, pair_rope, batch_size, progress)
    return with_loss(request, loss, baseline)


def _checked_request(
    strategies: Sequence[str], fractions: Sequence[float], seeds: int, batch_size: int, test_tokens: int
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The strategies as given and the fractions sorted and deduplicated, after refusing a bad request."""
    strategies = tuple(strategies)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies or len(set(strategies)) != len(strategies):
        raise SpectraError(
            f"strategies {list(strategies)}: expected distinct values among {', '.join(STRATEGIES)}"
        )
    fractions = tuple(sorted({float(f) for f in fractions}))
    if not fractions:
        raise SpectraError("fractions: none given")
    if seeds < 1:
        raise SpectraError(f"seeds must be at least 1, got {seeds}")
    if batch_size < 1 or test_tokens < 1:
        raise SpectraError(f"batch_size and test_tokens must be positive, got {batch_size} and {test_tokens}")
    return strategies, fractions


def _measure(
    setup: _Setup,
    request: xr.Dataset,
    todo: list[tuple[str, float, int]],
    baseline: float | None,
    fractions: tuple[float, ...],
    pair_rope: bool,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, float]:
    """The losses of ``request`` with the ``todo`` cells measured, and the unpruned baseline (measured first
    unless given), one forward pass per batch of test windows under a progress bar."""
    loss = request["loss"].values.copy()
    n_batches = math.ceil(setup.windows.shape[0] / batch_size)
    total = n_batches * (len(todo) + (baseline is None))  # forward passes: a bar with an estimate
    with tqdm(total=total, desc="surgery", unit="batch", disable=not progress or not total) as bar:
        if baseline is None:
            bar.set_postfix_str("unpruned model")
            baseline = evaluate_loss(setup.model, setup.windows, batch_size, on_batch=bar.update)
        index = {name: i for i, name in enumerate(request["strategy"].values)}
        fraction_index = {float(f): i for i, f in enumerate(request["fraction"].values)}
        for strategy, seed in dict.fromkeys((s, seed) for s, _, seed in todo):
            wanted = {f for s, f, sd in todo if s == strategy and sd == seed}
            for f_i, masks, projections in _interventions(setup, strategy, seed, pair_rope):
                if fractions[f_i] not in wanted:
                    continue
                bar.set_postfix_str(f"{strategy} {fractions[f_i]:g} seed {seed}")
                with pruned_keys(setup.model, masks=masks, projections=projections):
                    value = evaluate_loss(setup.model, setup.windows, batch_size, on_batch=bar.update)
                loss[index[strategy], fraction_index[fractions[f_i]], seed] = value
    return loss, baseline


def _missing_cells(
    ds: xr.Dataset, strategies: Sequence[str], fractions: Sequence[float], seeds: int, status: str
) -> list[tuple[str, float, int]]:
    """The requested (strategy, fraction, seed) cells that ``ds`` holds no loss for (and that apply)."""
    cells = []
    for strategy in strategies:
        if strategy == "gamma" and status != GAMMA_OK:
            continue  # not applicable: NaN by definition, nothing to measure
        for f in fractions:
            for seed in range(seeds) if strategy == "random" else (0,):
                if np.isnan(float(ds["loss"].sel(strategy=strategy, fraction=f, seed=seed))):
                    cells.append((strategy, f, seed))
    return cells


def _history_line(setup: _Setup, strategies, fractions, seeds, pair_rope, force, batch_size, device) -> str:
    return (
        f"{utc_now()} spectra.surgery.run.run_surgery("
        f"checkpoint={str(setup.ckpt.path)!r}, data_dir={str(setup.data_dir)!r}, strategies={list(strategies)}, "
        f"fractions={list(fractions)}, seeds={seeds}, layers={list(setup.layers)}, pair_rope={pair_rope}, "
        f"test_tokens={int(setup.windows.shape[0] * setup.seq_len)}, seq_len={setup.seq_len}, "
        f"batch_size={batch_size}, device={str(device)!r}, force={force})"
    )


def _experiment(
    setup: _Setup, strategies, fractions, seeds, pair_rope, force, batch_size, device
) -> xr.Dataset:
    """The surgery file of this setup with every loss NaN (filled in by :func:`run_surgery`)."""
    ckpt, cfg = setup.ckpt, setup.model.cfg
    attrs = {
        "history": _history_line(setup, strategies, fractions, seeds, pair_rope, force, batch_size, device),
        "source": "collapse-spectra surgery",
        "run_name": ckpt.run_name,
        "qk_norm": cfg.qk_norm,
        "optimizer": str(_run_field(ckpt, "optim", "name")),
        "seed": int(_run_field(ckpt, "train", "seed")),
        "step": int(ckpt.step),
        "tokens": int(ckpt.tokens),
        "checkpoint": str(Path(ckpt.path).resolve()),
        "data_dir": str(setup.data_dir.resolve()),
        "layers": ",".join(map(str, setup.layers)),
        "head_dim": cfg.resolved_head_dim,
        "seq_len": setup.seq_len,
        "test_tokens": int(setup.windows.shape[0] * setup.seq_len),
        "pair_rope": int(pair_rope),
        "mask_site": "output of k_norm (QK-normed keys, gamma applied, before RoPE)",
        "svd_site": "proj (k_proj output), uncentred, on the fixed eval batch; W_k head blocks projected",
        "interval": f"{INTERVAL_LEVEL:.0%} Student-t interval of the mean over seeds",
        "gamma_status": setup.status,
        "eval_batch_sha256": setup.used_hash,
        "checkpoint_eval_batch_sha256": ckpt.eval_batch_sha256,
        "model_config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
        "versions": json.dumps(software_versions("xarray", "netCDF4"), sort_keys=True),
    }
    title = f"Pruning surgery of the attention keys of run {ckpt.run_name}"
    return empty_surgery(strategies, fractions, seeds, setup.removed, title=title, attrs=attrs)


def default_output_path(checkpoint_path: str | os.PathLike) -> Path:
    """``RUN/surgery.nc`` for ``RUN/checkpoints/tokens_X.safetensors`` (else beside the checkpoint)."""
    return run_dir_of(Path(checkpoint_path).resolve()) / SURGERY_FILENAME


def surgery(
    checkpoint: str | os.PathLike | Checkpoint,
    data_dir: str | os.PathLike | None = None,
    *,
    out: str | os.PathLike | None = None,
    **kwargs,
) -> Path:
    """Run :func:`run_surgery` and write its result to ``out`` (default ``RUN/surgery.nc``); returns the path.

    ``out`` defaults to the run directory of the checkpoint (``RUN/checkpoints/tokens_X.safetensors``
    -> ``RUN/surgery.nc``). If ``out`` exists it must be a surgery file of the same experiment (same
    checkpoint, dataset, layers and test windows): its results are kept and only the cells this call adds
    are measured; a file of another format or experiment is refused and left as it is. One process at a
    time writes ``out`` (a lock beside it), and temporaries of a killed surgery of ``out`` are removed.
    Keyword arguments are those of :func:`run_surgery`.
    """
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    target = check_writable(Path(out) if out is not None else default_output_path(path), "surgery file")
    with ExclusiveLock(target, f"surgery file {target}"):
        remove_stale_temporaries(target)
        existing = read_own_surgery(target) if target.exists() else None
        ds = run_surgery(checkpoint, data_dir, reuse=existing, **kwargs)
        return write_surgery(ds, target)
