"""Resume state: everything needed to continue a killed run bit for bit, stored without pickle.

Layout (one complete state; older ones are deleted once a newer one is in place)::

    RUN_DIR/resume/step_<8-digit step>/
        model.safetensors       model.state_dict() as stored in memory (float32 parameters)
        optimizer.safetensors   every tensor of Optimizers.state_dict(), keyed by its path in that structure
        rng.safetensors         torch CPU (and CUDA) generator states as uint8 tensors
        manifest.json           format tag, step, tokens, world size, the full run config and its sha256,
                                the optimizer state's non-tensor skeleton, numpy and Python RNG states,
                                and the training loop's metrics accumulator

A state is written into ``resume/.tmp-step_<step>-<random>/`` (manifest last, every file fsynced)
and the directory is then renamed to its final name, so a directory named ``step_*`` is always
complete; a kill at any point leaves at worst a ``.tmp-*`` directory, which is ignored and removed
by the next write. Nothing here unpickles: tensors go through safetensors, the rest is JSON.

The optimizer state is a nest of dicts (with int keys), lists, tuples, tensors and scalars. It is
flattened by :func:`flatten_state` into ``{path: tensor}`` plus a JSON skeleton in which every
non-JSON node is tagged (``{"__tensor__": path}``, ``{"__tuple__": [...]}``,
``{"__dict__": [[key, value], ...]}``), and :func:`unflatten_state` rebuilds it exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.checkpoint import unwrap_model
from trainer.config import RunConfig, config_sha256, differences_from_saved
from trainer.errors import TrainerError
from trainer.fileio import apply_default_mode, fsync_dir, naming_a_full_disk, write_safetensors
from trainer.rundir import RESUME_DIR

FORMAT = "collapse-resume"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


class ResumeError(TrainerError):
    """Resume state is missing, incomplete, or was written for another configuration."""


# ----------------------------------------------------------------------------------------------------
# Pickle-free (de)serialisation of nested state


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat ``{path: tensor}`` dict.

    Parameters
    ----------
    obj
        Nest of dicts (str or int keys), lists, tuples, tensors, and JSON scalars.
    prefix
        Path prefix of the tensor keys (``/``-separated).

    Returns
    -------
    skeleton, tensors
        ``skeleton`` is JSON-serialisable; ``unflatten_state(skeleton, tensors)`` rebuilds ``obj``.

    Examples
    --------
    >>> skel, tensors = flatten_state({"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.95)})
    >>> list(tensors)
    ['state/0/step']
    >>> unflatten_state(skel, tensors)["betas"]
    (0.9, 0.95)
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            # clone: save_file rejects tensors that share storage, and views of a larger buffer
            tensors[path] = node.detach().to("cpu").contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                if not isinstance(k, str | int) or isinstance(k, bool):
                    raise TypeError(f"state key {k!r} at {path or '/'} is neither str nor int")
                items.append([k, encode(v, f"{path}/{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(node, tuple):
            return {"__tuple__": [encode(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [encode(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(node)]
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {path or '/'} without pickle")

    return encode(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        raise ResumeError(f"untagged table in resume skeleton: {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# ----------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current torch (CPU and CUDA), numpy and Python RNG states as (uint8 tensors, JSON)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002 - the global generator's state
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": {
            "bit_generator": name,
            "keys": keys.tolist(),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    """Set the generators to the states of :func:`capture_rng` (CUDA ones only if present here)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        states_cuda = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states_cuda)
    n = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["bit_generator"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# ----------------------------------------------------------------------------------------------------
# Writing and reading


@dataclass
class ResumeState:
    """One loaded resume state (tensors on the CPU)."""

    path: Path
    """The ``step_*`` directory it came from."""
    step: int
    """Optimizer steps completed."""
    tokens: int
    """Training tokens consumed (all processes)."""
    world_size: int
    """Processes of the run that wrote it."""
    metrics: dict[str, Any]
    """The training loop's metrics accumulator, as it passed it to :func:`save_resume_state`."""
    model_state: dict[str, torch.Tensor]
    optimizer_state: Any
    rng_tensors: dict[str, torch.Tensor]
    rng_json: dict[str, Any]

    def restore(self, model: torch.nn.Module, optimizers: Any) -> None:
        """Load weights, optimizer state and RNG states into a freshly built model and optimizers."""
        unwrap_model(model).load_state_dict(self.model_state, strict=True)
        optimizers.load_state_dict(self.optimizer_state)
        restore_rng(self.rng_tensors, self.rng_json)


def resume_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RESUME_DIR


def _state_dirname(step: int) -> str:
    return f"step_{step:08d}"


def list_resume_states(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every complete (final-named) resume state, oldest first."""
    root = resume_dir(run_dir)
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = STATE_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _write_fsync(path: Path, write, final_dir: Path) -> None:
    """``write(path)``, the umask's mode, fsync; a full disk is named by the file's place in ``final_dir``."""
    with naming_a_full_disk(final_dir / path.name, path.parent):
        write(path)
        # save_file creates private files; resume state is the run's, like its checkpoints
        apply_default_mode(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def save_resume_state(
    run_dir: str | os.PathLike,
    *,
    step: int,
    tokens: int,
    cfg: RunConfig,
    world_size: int,
    model: torch.nn.Module,
    optimizers: Any,
    metrics: dict[str, Any],
) -> Path:
    """Write the resume state of ``step`` atomically and delete older states.

    Parameters
    ----------
    run_dir
        The run directory; the state goes to ``run_dir/resume/step_<step>/``.
    step, tokens
        Optimizer steps completed and tokens consumed so far.
    cfg
        The run config (stored whole; :func:`load_resume_state` compares it).
    world_size
        Number of processes (a different count changes the batch order, so resuming refuses it).
    model
        The model (wrappers are removed); its ``state_dict`` is saved as is.
    optimizers
        An object with ``state_dict()`` (``trainer.optim.Optimizers``).
    metrics
        JSON-able accumulator of the training loop, returned unchanged by :func:`load_resume_state`.

    Returns
    -------
    Path
        The final directory.
    """
    root = resume_dir(run_dir)
    final = root / _state_dirname(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    with naming_a_full_disk(final, run_dir):
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        model_state = {
            k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()
        }
        skeleton, opt_tensors = flatten_state(optimizers.state_dict())
        rng_tensors, rng_json = capture_rng()
        _write_fsync(tmp / "model.safetensors", lambda p: write_safetensors(p, model_state), final)
        _write_fsync(tmp / "optimizer.safetensors", lambda p: write_safetensors(p, opt_tensors), final)
        _write_fsync(tmp / "rng.safetensors", lambda p: write_safetensors(p, rng_tensors), final)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "tokens": tokens,
            "world_size": world_size,
            "config_sha256": config_sha256(cfg),
            "config": cfg.to_dict(),
            "optimizer_skeleton": skeleton,
            "rng": rng_json,
            "metrics": metrics,
        }
        # allow_nan: the accumulator may hold NaN placeholders; Python's json reads them back
        _write_fsync(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, sort_keys=True)), final)
        fsync_dir(tmp)
        if final.exists():  # only after a resume that redoes a step; keep the swap atomic
            old = root / f"{_OLD_PREFIX}{final.name}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep=final)
    return final


def _prune(root: Path, keep: Path) -> None:
    """Delete every other state and stale temporary directory (left by a kill mid-write)."""
    for p in root.iterdir():
        if p == keep:
            continue
        if not (STATE_RE.match(p.name) or p.name.startswith((_TMP_PREFIX, _OLD_PREFIX))):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def load_resume_state(run_dir: str | os.PathLike, cfg: RunConfig, world_size: int) -> ResumeState:
    """Load the newest complete resume state of ``run_dir`` and check it belongs to this run.

    Raises
    ------
    ResumeError
        No state exists; the manifest is unreadable or of another format; the stored config
        differs from ``cfg`` (the message lists every differing key); or it was written by a run
        with another number of processes.
    """
    states = list_resume_states(run_dir)
    if not states:
        raise ResumeError(
            f"--resume: {resume_dir(run_dir)} holds no complete resume state "
            "(the run was never started, or was killed before its first resume write)"
        )
    step, path = states[-1]
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"cannot read resume manifest {manifest_path}: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ResumeError(
            f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    if manifest["step"] != step:
        raise ResumeError(f"{manifest_path}: step {manifest['step']} does not match its directory name")
    diff = (
        differences_from_saved(manifest["config"], cfg)
        if manifest["config_sha256"] != config_sha256(cfg)
        else []
    )
    if diff:
        raise ResumeError(
            f"--resume: the config differs from the one {path} was written with: " + "; ".join(diff)
        )
    if manifest["world_size"] != world_size:
        raise ResumeError(
            f"--resume: {path} was written by {manifest['world_size']} process(es), this run has {world_size}; "
            "the global batch order depends on it"
        )
    try:
        model_state = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ResumeError(f"cannot read resume state {path}: {e}") from None
    return ResumeState(
        path=path,
        step=step,
        tokens=manifest["tokens"],
        world_size=manifest["world_size"],
        metrics=manifest["metrics"],
        model_state=model_state,
        optimizer_state=unflatten_state(manifest["optimizer_skeleton"], opt_tensors),
        rng_tensors=rng_tensors,
        rng_json=manifest["rng"],
    )
