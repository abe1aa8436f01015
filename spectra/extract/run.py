"""Build a run's spectra cube: every checkpoint, one forward pass on the fixed batch, float64 SVDs.

``spectra_for_checkpoint`` turns one loaded checkpoint into a one-step ``xarray.Dataset``
with the variables of ``docs/cube.md``; ``extract`` does it for every checkpoint of a run that
the cube does not hold yet and rewrites the cube atomically.

Examples
--------
>>> from spectra.extract.run import extract
>>> result = extract("runs/A1-s0")                  # doctest: +SKIP
>>> result.path, result.added, result.skipped       # doctest: +SKIP
(PosixPath('runs/A1-s0/spectra.nc'), (0, 61, 122), ())
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from spectra.cube import (
    CENTERINGS,
    CUBE_FILENAME,
    DEFAULT_VARIANT,
    SITES,
    DamagedCubeError,
    combine_steps,
    cube_attributes,
    open_cube,
    step_dataset,
    write_cube,
)
from spectra.errors import SpectraError
from spectra.extract.capture import LayerQK, capture_qk, check_batch
from spectra.extract.load import (
    Checkpoint,
    eval_batch_path,
    eval_batch_sha256,
    load_checkpoint,
    load_eval_batch,
    model_config_differences,
    model_config_from_metadata,
    read_metadata,
    resolve_device,
)
from spectra.extract.svd import head_weight_singular_values, token_spectra
from spectra.fileio import ExclusiveLock, check_writable, remove_stale_temporaries
from spectra.rundir import checkpoints_dir, find_checkpoints, run_dir_of
from trainer.config import ConfigError, ModelConfig, model_config_from_dict
from trainer.provenance import package_version

# A long extraction (many checkpoints of a large model on a CPU) rewrites the cube at most this often,
# so that a kill loses at most this much work; the final file does not depend on it.
_FLUSH_SECONDS = 60.0


@dataclass(frozen=True)
class ExtractResult:
    """What ``extract`` did."""

    path: Path
    """The cube."""
    added: tuple[int, ...]
    """Steps computed in this call."""
    skipped: tuple[int, ...]
    """Steps of the run's checkpoints that the cube already held."""
    seconds: tuple[float, ...] = ()
    """Wall time of each added step, in order: reading its checkpoint and computing its spectra (the cube's
    write is not included: it is shared by the steps of one call)."""


class UnreadableCheckpointsError(SpectraError):
    """Checkpoints of a run that could not be read; the run's others were extracted (``result``).

    One damaged file (a truncated copy, a disk error) does not hold back the spectra of the good ones: they
    are in the cube, and this error names each bad file once, with its reason, so that the command still
    fails (exit status 1) and the gap is seen.
    """

    def __init__(self, result: ExtractResult, unreadable: list[tuple[Path, str]]):
        self.result = result
        self.unreadable = unreadable
        held = len(result.added) + len(result.skipped)
        where = (
            f"the cube {result.path} holds the other {held} step(s) (added: {', '.join(map(str, result.added)) or 'none'})"
            if held
            else f"nothing was written to {result.path}"
        )
        reasons = "; ".join(reason for _, reason in unreadable)
        super().__init__(
            f"{len(unreadable)} checkpoint(s) could not be read and are not in the cube, {where}: {reasons}; "
            "replace or remove them, then run extract again"
        )

    def __reduce__(self):  # rebuilt from its parts where a worker process hands it back
        return type(self), (self.result, self.unreadable)


def layer_reducer(n_heads: int, n_kv_heads: int, head_dim: int):
    """A ``capture_qk`` reducer: one layer's activations -> float64 spectra and energies (numpy).

    The reduced layer is a dict of ``q_sv`` ``(H, site, centering, D)``, ``k_sv`` ``(Hkv, site, centering, D)``,
    ``q_energy`` ``(H, site, D)`` and ``k_energy`` ``(Hkv, site, D)``, NaN at the sites the layer lacks.
    """
    n_sites, n_cent = len(SITES), len(CENTERINGS)

    def reduce(lq: LayerQK) -> dict[str, np.ndarray]:
        out = {  # the unit site of a model without QK-norm stays NaN
            "q_sv": np.full((n_heads, n_sites, n_cent, head_dim), np.nan),
            "k_sv": np.full((n_kv_heads, n_sites, n_cent, head_dim), np.nan),
            "q_energy": np.full((n_heads, n_sites, head_dim), np.nan),
            "k_energy": np.full((n_kv_heads, n_sites, head_dim), np.nan),
        }
        present = [SITES.index(site) for site in lq.sites]
        # every head at every site, queries then keys, in one batched call: (S*H + S*Hkv, N, D)
        stacked = torch.cat([lq.q[site] for site in lq.sites] + [lq.k[site] for site in lq.sites])
        spec = token_spectra(stacked)
        sv = torch.stack([spec.uncentered, spec.centered], dim=1).cpu().numpy()  # (S*H + S*Hkv, 2, D)
        energy = spec.energy.cpu().numpy()  # (S*H + S*Hkv, D)
        n_q = len(present) * n_heads
        q_sv = sv[:n_q].reshape(len(present), n_heads, n_cent, head_dim)  # (S, H, 2, D)
        k_sv = sv[n_q:].reshape(len(present), n_kv_heads, n_cent, head_dim)
        out["q_sv"][:, present] = q_sv.transpose(1, 0, 2, 3)
        out["k_sv"][:, present] = k_sv.transpose(1, 0, 2, 3)
        out["q_energy"][:, present] = energy[:n_q].reshape(len(present), n_heads, head_dim).transpose(1, 0, 2)
        out["k_energy"][:, present] = (
            energy[n_q:].reshape(len(present), n_kv_heads, head_dim).transpose(1, 0, 2)
        )
        return out

    return reduce


def _gamma(norm: torch.nn.Module, head_dim: int) -> np.ndarray:
    weight = getattr(norm, "weight", None)
    if weight is None:  # nn.Identity: no QK-norm
        return np.full(head_dim, np.nan)
    return weight.detach().to(torch.float64).cpu().numpy()


def optimizer_variant(run_config: dict[str, Any]) -> dict[str, str]:
    """``muon_qkvo`` and ``weights_dtype`` of a run config; a config saved before the fields existed had the
    defaults (``separate``, ``float32``), which is how that run trained."""
    optim, train = run_config.get("optim", {}), run_config.get("train", {})
    return {
        "muon_qkvo": str(optim.get("muon_qkvo", DEFAULT_VARIANT["muon_qkvo"])),
        "weights_dtype": str(train.get("weights_dtype", DEFAULT_VARIANT["weights_dtype"])),
    }


def _require(ckpt: Checkpoint, *keys: str) -> Any:
    value: Any = ckpt.run_config
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise SpectraError(f"{ckpt.path}: run_config lacks {'.'.join(keys[: i + 1])}")
        value = value[key]
    return value


def _as_int(ckpt: Checkpoint, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SpectraError(f"{ckpt.path}: {what}={value!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise SpectraError(f"{ckpt.path}: {what}={value!r} is not an integer") from None


def _dataset_name(ckpt: Checkpoint) -> str:
    if "dataset" in ckpt.metadata:
        try:
            info = json.loads(ckpt.metadata["dataset"])
        except json.JSONDecodeError as e:
            raise SpectraError(f"{ckpt.path}: metadata dataset is not valid JSON ({e})") from None
        if isinstance(info, dict) and info.get("name"):
            return str(info["name"])
    return ckpt.data_dir.name if ckpt.data_dir is not None else ""


def run_attrs(ckpt: Checkpoint, input_ids: torch.Tensor, drop_first: int, n_tokens: int) -> dict[str, Any]:
    """The cube's global attributes that describe the run and the batch (all but ``history``/``versions``)."""
    if "seed" in ckpt.metadata:
        seed = _as_int(ckpt, ckpt.metadata["seed"], "metadata seed")
    else:
        seed = _as_int(ckpt, _require(ckpt, "train", "seed"), "run_config train.seed")
    return {
        **cube_attributes(
            title=f"Singular-value spectra of attention queries and keys, run {ckpt.run_name}",
            source="collapse-spectra extract: float32 forward pass on the fixed eval batch, float64 SVD",
        ),
        "run_name": ckpt.run_name,
        "qk_norm": ckpt.model_config.qk_norm,
        "optimizer": str(_require(ckpt, "optim", "name")),
        **optimizer_variant(ckpt.run_config),
        "seed": seed,
        "data": _dataset_name(ckpt),
        "model_config": ckpt.metadata["model_config"],
        "run_config": ckpt.metadata["run_config"],
        "eval_batch_sha256": eval_batch_sha256(input_ids),
        "eval_batch_shape": np.asarray(input_ids.shape, dtype=np.int64),
        "drop_first": int(drop_first),
        "n_tokens": int(n_tokens),
        "train_tokens": _as_int(ckpt, _require(ckpt, "train", "tokens"), "run_config train.tokens"),
    }


def check_enough_tokens(n_tokens: int, head_dim: int, drop_first: int) -> None:
    """Refuse a batch that gives fewer token vectors per head than ``head_dim`` (spectra rank-deficient by
    construction), for our checkpoints and public models alike."""
    if n_tokens < head_dim:
        raise SpectraError(
            f"the eval batch gives N={n_tokens} tokens per head after drop_first={drop_first}, fewer than "
            f"head_dim={head_dim}: every spectrum would be rank-deficient by construction"
        )


def spectra_for_checkpoint(
    ckpt: Checkpoint, input_ids: torch.Tensor, *, drop_first: int = 0, device: str | torch.device = "cpu"
) -> xr.Dataset:
    """The cube's variables for one checkpoint, as a Dataset with a ``step`` dimension of length 1.

    One forward pass of ``ckpt.model`` on ``input_ids`` (float32, no autocast, no gradients)
    records queries and keys at every site (``spectra.extract.capture.capture_qk``); each layer is
    reduced to float64 singular values (uncentred and centred) and coordinate energies as soon as
    it is complete (``spectra.extract.svd.token_spectra``). Weight spectra and QK-norm gains come from
    the parameters, the losses from the checkpoint's metadata (NaN where absent).

    Parameters
    ----------
    ckpt
        A loaded checkpoint; its model is moved to ``device`` (in place).
    input_ids
        ``(n_seqs, seq_len)`` token ids, the fixed eval batch.
    drop_first
        Positions dropped at the start of every sequence before the SVDs.
    device
        Where the forward pass and the SVDs run.

    Returns
    -------
    xarray.Dataset
        Variables and coordinates of ``docs/cube.md`` for this step, with the run's global
        attributes (no ``history``: ``extract`` adds it).

    Raises
    ------
    SpectraError
        A batch that does not fit the model, or fewer tokens per head than ``head_dim``.
    """
    dev = resolve_device(device)
    model = ckpt.model.to(dev)
    cfg = ckpt.model_config
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    n_tokens = check_batch(model, input_ids, drop_first)
    check_enough_tokens(n_tokens, D, drop_first)
    per_layer = capture_qk(model, input_ids, drop_first=drop_first, reduce=layer_reducer(H, Hkv, D))

    attns = [block.attn for block in model.blocks]
    with torch.no_grad():
        wq = torch.stack([a.q_proj.weight for a in attns])  # (L, H*D, d_model)
        wk = torch.stack([a.k_proj.weight for a in attns])  # (L, Hkv*D, d_model)
        wq_sv = head_weight_singular_values(wq, H).cpu().numpy()  # (L, H, D)
        wk_sv = head_weight_singular_values(wk, Hkv).cpu().numpy()  # (L, Hkv, D)
    q_gamma = np.stack([_gamma(a.q_norm, D) for a in attns])  # (L, D)
    k_gamma = np.stack([_gamma(a.k_norm, D) for a in attns])

    return step_dataset(
        per_layer,
        wq_sv=wq_sv,
        wk_sv=wk_sv,
        q_gamma=q_gamma,
        k_gamma=k_gamma,
        step=ckpt.step,
        tokens=ckpt.tokens,
        train_loss=ckpt.metadata_float("train_loss"),
        val_loss=ckpt.metadata_float("val_loss"),
        attrs=run_attrs(ckpt, input_ids, drop_first, n_tokens),
    )


# ----------------------------------------------------------------------------------------------------
# The cube on disk


def _read_cube(path: Path) -> xr.Dataset:
    """Load the existing cube fully into memory, file closed (it is about to be replaced), validated by
    :func:`spectra.cube.open_cube`, the one reader of the format."""
    try:
        return open_cube(path)
    except DamagedCubeError:
        raise  # its message says what to do, and extract never writes over it
    except SpectraError as e:
        raise SpectraError(
            f"{e}; the existing cube is left as it is: move it away or choose another --out"
        ) from None


def _check_compatible(
    path: Path,
    cube: xr.Dataset,
    run_name: str,
    model: tuple[Path, ModelConfig],
    batch_sha: str,
    drop_first: int,
) -> None:
    """Refuse to mix spectra of another run, model, batch or drop_first into an existing cube.

    ``model`` is a checkpoint of the run and its model config, for a message naming both the file and the
    field that differs.
    """
    checks = [
        ("run_name", cube.attrs.get("run_name"), run_name),
        ("eval_batch_sha256", cube.attrs.get("eval_batch_sha256"), batch_sha),
        ("drop_first", int(cube.attrs.get("drop_first", -1)), drop_first),
    ]
    for key, have, want in checks:
        if have != want:
            raise SpectraError(
                f"{path}: the cube has {key}={have!r} but this extraction has {want!r}; spectra computed "
                "differently cannot share a cube (choose another --out)"
            )
    try:
        recorded = model_config_from_dict(json.loads(str(cube.attrs.get("model_config", "null"))))
    except (json.JSONDecodeError, ConfigError) as e:
        raise SpectraError(f"{path}: the cube's model_config attribute is not a model config ({e})") from None
    checkpoint, cfg = model
    differences = model_config_differences(recorded, cfg)
    if differences:
        fields = "; ".join(
            f"{field}: {theirs!r} here, {ours!r} in the cube" for field, ours, theirs in differences
        )
        raise SpectraError(
            f"{checkpoint}: its model_config differs from the one the cube {path} was computed for ({fields}); "
            "spectra of another model cannot share a cube (choose another --out)"
        )


def extract(
    path: str | os.PathLike,
    *,
    batch: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    drop_first: int = 0,
    force: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Add the spectra of every checkpoint of a run that the cube does not hold yet.

    Parameters
    ----------
    path
        A run directory, its ``checkpoints/`` directory, or one checkpoint file.
    batch
        The eval batch (``eval_batch.safetensors`` or its dataset directory); default: the one in the
        ``data_dir`` the checkpoints record. Its sha256 must equal the one they record.
    out
        The cube; default ``spectra.nc`` in the run directory.
    device
        Where the forward passes and SVDs run (``cpu``, ``cuda``, ``cuda:1``).
    drop_first
        Positions dropped at the start of every sequence (attention sinks). A cube holds one value.
    force
        Accept a batch whose hash differs from the recorded one (the cube records the batch used).
    progress
        Show a progress bar over the checkpoints (on stderr).

    Returns
    -------
    ExtractResult
        The cube's path and the steps added and skipped.

    Notes
    -----
    Incremental: steps already in the cube are skipped, so a re-run after new checkpoints appeared
    (or after an interruption) computes only what is missing. The cube must have been computed for
    the same run, model, batch hash and ``drop_first``, or this is an error.

    Atomic: the cube is written to a temporary file beside it and renamed, so a kill at any moment
    leaves the previous cube intact. During a long extraction the cube is rewritten at most every
    minute, so an interruption loses at most that much work.

    Deterministic: the same checkpoints, batch, options, device, software and thread count give a
    byte-identical file; ``history`` records the call (steps, device, batch and its hash, software
    version) but no wall-clock time, for that reason.

    Raises
    ------
    UnreadableCheckpointsError
        After the cube is written with every readable checkpoint (nothing is written when none is): the
        checkpoints that could not be read (truncated, damaged, foreign), each named once with its reason.
    LockedError
        Another process is writing the cube (:class:`spectra.fileio.ExclusiveLock`); nothing was computed.
    SpectraError
        No checkpoints, checkpoints of different runs or models (naming the checkpoint and
        the field), a checkpoint whose model_config and run_config disagree, a batch whose hash differs
        (without ``force``), an existing cube of something else or a damaged one, a bad device.
    """
    dev = resolve_device(device)
    paths = find_checkpoints(path)
    out = check_writable(Path(out) if out is not None else run_dir_of(path) / CUBE_FILENAME, "cube")
    run, unreadable = _run_headers(paths)
    if run is None:  # not one readable header: nothing to write, each file named with its reason
        raise UnreadableCheckpointsError(ExtractResult(path=out, added=(), skipped=()), unreadable)
    batch_file = _batch_file(batch, run.first_path, run.first)
    input_ids = load_eval_batch(batch_file, expected_sha256=run.first["eval_batch_sha256"], force=force)
    batch_sha = eval_batch_sha256(input_ids)

    with ExclusiveLock(out, f"cube {out}"):
        remove_stale_temporaries(out)  # under the lock: debris of a killed extraction of this cube
        existing = _read_cube(out) if out.exists() else None
        done: set[int] = set()
        if existing is not None:
            reference = (run.first_path, run.model_config)
            _check_compatible(out, existing, run.first["run_name"], reference, batch_sha, drop_first)
            done = {int(s) for s in existing.step.values}
        todo = [(s, p) for s, p in sorted(run.steps.items()) if s not in done]
        skipped = tuple(s for s in sorted(run.steps) if s in done)
        if not todo:
            return _finished(ExtractResult(path=out, added=(), skipped=skipped), unreadable)
        source = (checkpoints_dir(path) if Path(path).is_dir() else Path(path)).resolve()
        recorded = run.first["eval_batch_sha256"]
        forced = "" if batch_sha == recorded else f", forced over the recorded {recorded}"

        def history(added: list[int]) -> str:
            return (
                f"collapse-spectra extract: added steps {', '.join(map(str, added))} from {source} "
                f"on {dev}, drop_first={drop_first}, eval batch {batch_file.resolve()} (sha256 {batch_sha}{forced}); "
                f"collapse {package_version('collapse')}"
            )

        added, seconds = _extract_steps(
            todo, existing, out, input_ids, dev, drop_first, history, unreadable,
            bar=tqdm(desc=f"extract {run.first['run_name']}", total=len(todo), unit="ckpt", disable=not progress),
        )  # fmt: skip
    result = ExtractResult(path=out, added=tuple(added), skipped=skipped, seconds=tuple(seconds))
    return _finished(result, unreadable)


def _extract_steps(
    todo: list[tuple[int, Path]],
    existing: xr.Dataset | None,
    out: Path,
    input_ids: torch.Tensor,
    device: torch.device,
    drop_first: int,
    history: Callable[[list[int]], str],
    unreadable: list[tuple[Path, str]],
    bar: tqdm,
) -> tuple[list[int], list[float]]:
    """Compute the spectra of the ``todo`` checkpoints (``(step, path)``) into the cube at ``out``, rewriting it
    at most every :data:`_FLUSH_SECONDS` and at the end; returns the steps added and the seconds each took.

    One model is built and its weights replaced checkpoint by checkpoint. A checkpoint whose tensors cannot be read
    is appended to ``unreadable`` and the others go on.
    """
    new: list[xr.Dataset] = []
    seconds: list[float] = []
    model = None
    last_flush = time.monotonic()
    with bar:
        for step, p in todo:
            bar.set_postfix(step=step)
            start = time.perf_counter()
            try:
                ckpt = load_checkpoint(p, device, model=model)
            except SpectraError as e:  # its header was fine, its tensors are not: the others go on
                unreadable.append((p, str(e)))
                bar.update()
                continue
            model = ckpt.model
            new.append(spectra_for_checkpoint(ckpt, input_ids, drop_first=drop_first, device=device))
            seconds.append(time.perf_counter() - start)
            bar.update()
            if time.monotonic() - last_flush > _FLUSH_SECONDS and len(new) < len(todo):
                write_cube(combine_steps(existing, new, history([int(d.step[0]) for d in new])), out)
                last_flush = time.monotonic()
    added = [int(d.step[0]) for d in new]
    if new:
        write_cube(combine_steps(existing, new, history(added)), out)
    return added, seconds


def _finished(result: ExtractResult, unreadable: list[tuple[Path, str]]) -> ExtractResult:
    """``result``, or :class:`UnreadableCheckpointsError` carrying it when checkpoints were left out."""
    if unreadable:
        raise UnreadableCheckpointsError(result, unreadable)
    return result


@dataclass(frozen=True)
class _RunHeaders:
    """The readable checkpoints of one run: the first one's path, metadata and model, and ``{step: path}``."""

    first_path: Path
    first: dict[str, str]
    model_config: ModelConfig
    steps: dict[int, Path]


def _run_headers(paths: list[Path]) -> tuple[_RunHeaders | None, list[tuple[Path, str]]]:
    """Read every checkpoint's header and check the readable ones are one run and one model.

    A file whose header cannot be read (truncated, damaged, not ours) is returned with the reason and left
    out (None for the run when no header is readable); readable checkpoints that disagree (another run, batch
    or model, a step twice) are refused, since they mean that two runs were mixed, not that one file was damaged.
    """
    headers, unreadable = [], []
    for p in paths:
        try:
            headers.append((p, read_metadata(p)))
        except SpectraError as e:
            unreadable.append((p, str(e)))
    if not headers:
        return None, unreadable
    first_path, first = headers[0]
    first_cfg = model_config_from_metadata(first_path, first)
    steps: dict[int, Path] = {}
    for p, meta in headers:
        for key in ("run_name", "eval_batch_sha256"):
            if meta[key] != first[key]:
                raise SpectraError(
                    f"{p}: {key} {meta[key]!r} differs from {first_path.name}'s {first[key]!r}"
                )
        differences = model_config_differences(first_cfg, model_config_from_metadata(p, meta))
        if differences:
            fields = "; ".join(
                f"{field}: {theirs!r} here, {ours!r} in {first_path.name}"
                for field, ours, theirs in differences
            )
            raise SpectraError(
                f"{p}: its model_config differs from {first_path.name}'s ({fields}); the checkpoints of one run "
                "share one model"
            )
        try:
            step = int(meta["step"])
        except ValueError:
            raise SpectraError(f"{p}: metadata step={meta['step']!r} is not an integer") from None
        if step in steps:
            raise SpectraError(f"{p} and {steps[step]} both hold step {step}")
        steps[step] = p
    return _RunHeaders(first_path, first, first_cfg, steps), unreadable


def _batch_file(batch: str | os.PathLike | None, first_path: Path, first: dict[str, str]) -> Path:
    """The eval batch to use: the one given, else the one in the dataset the checkpoints record."""
    if batch is not None:
        return eval_batch_path(batch)
    data_dir = first.get("data_dir")
    if not data_dir:
        raise SpectraError(
            f"{first_path}: the checkpoint records no data_dir; pass the eval batch with --batch"
        )
    batch_file = eval_batch_path(data_dir)
    if not batch_file.is_file():
        raise SpectraError(
            f"{batch_file}: the eval batch the checkpoints record does not exist here; pass it with --batch"
        )
    return batch_file


__all__ = [
    "ExtractResult",
    "UnreadableCheckpointsError",
    "check_enough_tokens",
    "extract",
    "layer_reducer",
    "run_attrs",
    "spectra_for_checkpoint",
]
