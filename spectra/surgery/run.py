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
removed by default, and why ``svd`` acts before the norm instead are explained in ``docs/surgery.md``.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from scipy import stats
from tqdm.auto import tqdm

from spectra.errors import SpectraError
from spectra.extract.load import (
    Checkpoint,
    eval_batch_sha256,
    load_checkpoint,
    load_eval_batch,
    resolve_device,
    run_dir_of,
)
from spectra.fileio import ExclusiveLock, atomic_write, check_writable, remove_stale_temporaries
from trainer.model import LLM
from trainer.provenance import software_versions, utc_now

STRATEGIES = ("gamma", "svd", "random")
DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
DEFAULT_TEST_TOKENS = 65_536
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEEDS = 3
INTERVAL_LEVEL = 0.95
FORMAT = "collapse-surgery"
FORMAT_VERSION = "1"
GAMMA_OK = "ok"

# ----------------------------------------------------------------------------------------------------
# Parsing and counting


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layer indices from ``None``/``"all"``, a list of ints, or a spec such as ``"0,1"``, ``"0-3"``, ``"0,2-4"``.

    >>> parse_layers("0,2-4", 6)
    (0, 2, 3, 4)
    >>> parse_layers(None, 3)
    (0, 1, 2)
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return tuple(range(n_layers))
    if isinstance(spec, str):
        layers: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                if sep:
                    start, stop = int(lo), int(hi)
                    if stop < start:
                        raise ValueError
                    layers.extend(range(start, stop + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise SpectraError(
                    f"layers: {part!r} in {spec!r} is not a layer index or an increasing range such as 0-3"
                ) from None
    else:
        layers = [int(i) for i in spec]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SpectraError(
            f"layers: {bad} out of range for a model with {n_layers} layers (0..{n_layers - 1})"
        )
    if not layers:
        raise SpectraError("layers: no layer selected")
    return tuple(sorted(set(layers)))


def removed_count(fraction: float, head_dim: int, pair_rope: bool = True) -> int:
    """Key coordinates removed per head for ``fraction`` of ``head_dim``, rounded half up to whole rotary pairs.

    >>> removed_count(0.375, 64), removed_count(0.125, 8), removed_count(0.125, 8, pair_rope=False)
    (24, 2, 1)
    """
    if not 0.0 <= fraction <= 1.0:
        raise SpectraError(f"fraction {fraction} is outside [0, 1]")
    unit = 2 if pair_rope else 1
    return unit * math.floor(fraction * head_dim / unit + 0.5)


def removal_order(scores: np.ndarray, pair_rope: bool = True) -> np.ndarray:
    """Coordinates of one head in the order they are removed: lowest score first, ties by index.

    With ``pair_rope`` coordinate j and its rotary partner j + D/2 are scored together (the sum of
    their scores) and removed together, so every prefix of even length is a union of rotary pairs.

    >>> removal_order(np.array([3.0, 1.0, 2.0, 0.5])).tolist()          # pairs (0, 2): 5, (1, 3): 1.5
    [1, 3, 0, 2]
    >>> removal_order(np.array([3.0, 1.0, 2.0, 0.5]), pair_rope=False).tolist()
    [3, 1, 2, 0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not pair_rope:
        return np.argsort(scores, kind="stable")
    half = scores.shape[0] // 2
    pairs = np.argsort(scores[:half] + scores[half:], kind="stable")  # (D/2,)
    return np.stack([pairs, pairs + half], axis=1).ravel()


def random_removal_order(
    seed: int, layer: int, n_kv_heads: int, head_dim: int, pair_rope: bool = True
) -> np.ndarray:
    """Random removal orders (n_kv_heads, head_dim) for one layer; the same (seed, layer) gives the same orders.

    Seeding by (seed, layer) keeps a layer's draw independent of which other layers are pruned.
    """
    rng = np.random.default_rng([seed, layer])
    return np.stack([removal_order(rng.random(head_dim), pair_rope) for _ in range(n_kv_heads)])


def keep_masks(orders: Mapping[int, np.ndarray], n_remove: int) -> dict[int, torch.Tensor]:
    """Per-layer keep masks (n_kv_heads, head_dim) of 0/1 from removal orders; empty when nothing is removed."""
    if n_remove == 0:
        return {}
    masks = {}
    for layer, order in orders.items():
        keep = torch.ones(order.shape, dtype=torch.float32)  # (Hkv, D)
        keep.scatter_(1, torch.from_numpy(np.ascontiguousarray(order[:, :n_remove])), 0.0)
        masks[layer] = keep
    return masks


# ----------------------------------------------------------------------------------------------------
# Gamma


def key_gamma(model: LLM, layer: int) -> np.ndarray | None:
    """The key-norm gain of ``layer`` as float64 (D,), or ``None`` for a model without QK-norm."""
    norm = model.blocks[layer].attn.k_norm
    weight = getattr(norm, "weight", None)
    return None if weight is None else weight.detach().to("cpu", torch.float64).numpy()


def gamma_status(model: LLM, layers: Sequence[int]) -> str:
    """``"ok"`` when gamma can rank the key coordinates of every layer in ``layers``, else the plain reason."""
    qk_norm = model.cfg.qk_norm
    if qk_norm == "none":
        return "not applicable: the model has no QK-norm (qk_norm = 'none'), so there is no gamma to rank key coordinates by"
    if qk_norm == "frozen":
        return (
            "not applicable: the QK-norm gain is frozen at 1 (qk_norm = 'frozen'): all |gamma| are equal, "
            "so gamma ranks no key coordinate above another"
        )
    flat = [i for i in layers if np.ptp(np.abs(key_gamma(model, i))) == 0.0]
    if flat:
        return (
            f"not applicable: all |gamma| of the key norm are equal in layer(s) {', '.join(map(str, flat))} "
            "(an untrained checkpoint?), so gamma ranks no key coordinate above another"
        )
    return GAMMA_OK


def gamma_removal_orders(model: LLM, layers: Sequence[int], pair_rope: bool = True) -> dict[int, np.ndarray]:
    """Removal orders (n_kv_heads, head_dim) by smallest ``|gamma|``, the same for every head of a layer."""
    orders = {}
    for i in layers:
        gamma = key_gamma(model, i)
        if gamma is None:
            raise SpectraError(gamma_status(model, layers))
        order = removal_order(np.abs(gamma), pair_rope)
        orders[i] = np.tile(order, (model.cfg.n_kv_heads, 1))
    return orders


# ----------------------------------------------------------------------------------------------------
# SVD of the keys on the fixed batch


@torch.inference_mode()
def key_singular_vectors(
    model: LLM, eval_batch: torch.Tensor, layers: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Right singular vectors and singular values of every key head's (N x D) matrix at site ``proj``.

    The keys of head h are ``K_h = X W_k,h^T`` over the N = n_seqs * seq_len token positions of
    ``eval_batch``, uncentred, computed in float64 from the float32 input of ``k_proj``. They are
    streamed through a QR factorisation (``K = Q R``, R updated batch by batch from ``[R; K_batch]``),
    so memory stays O(D^2) per head; ``R = U' S V^T`` then gives K's own S and V, since
    ``K = (Q U') S V^T``. (Unlike an eigendecomposition of ``K^T K``, this does not square the condition
    number, so small singular values stay accurate.)

    Returns
    -------
    dict
        layer -> ``(V, S)``: V (n_kv_heads, D, D) float64 on the CPU with the right singular vectors in
        its columns, S (n_kv_heads, D) in descending order (zero-padded when N < D).
    """
    cfg = model.cfg
    H, D = cfg.n_kv_heads, cfg.resolved_head_dim
    device = next(model.parameters()).device
    R: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        W = model.blocks[i].attn.k_proj.weight.detach().double().view(H, D, -1)  # (Hkv, D, C)

        def hook(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, W.shape[-1])  # (N_b, C)
            k = torch.einsum("nc,hdc->hnd", x, W)  # (Hkv, N_b, D)
            stacked = k if i not in R else torch.cat([R[i], k], dim=1)
            R[i] = torch.linalg.qr(stacked, mode="r").R  # (Hkv, min(rows, D), D)

        return hook

    handles = [model.blocks[i].attn.k_proj.register_forward_hook(make_hook(i)) for i in layers]
    try:
        for start in range(0, eval_batch.shape[0], batch_size):
            model(eval_batch[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        _, S, Vh = torch.linalg.svd(R[i], full_matrices=True)  # S (Hkv, min(rows, D)), Vh (Hkv, D, D)
        S = F.pad(S, (0, D - S.shape[-1]))
        out[i] = (Vh.mT.cpu(), S.cpu())
    return out


def svd_projectors(
    vectors: Mapping[int, tuple[torch.Tensor, torch.Tensor]], n_remove: int
) -> dict[int, torch.Tensor]:
    """Per-layer projectors ``V_r V_r^T`` (n_kv_heads, D, D) onto the top r = D - n_remove directions."""
    if n_remove == 0:
        return {}
    projectors = {}
    for layer, (V, _) in vectors.items():
        Vr = V[..., : V.shape[-1] - n_remove]  # (Hkv, D, r)
        projectors[layer] = Vr @ Vr.mT
    return projectors


# ----------------------------------------------------------------------------------------------------
# Applying an intervention


@contextmanager
def pruned_keys(
    model: LLM,
    *,
    masks: Mapping[int, torch.Tensor] | None = None,
    projections: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[LLM]:
    """Temporarily remove key dimensions from ``model``; everything is restored bit for bit on exit.

    Parameters
    ----------
    masks
        layer -> keep mask (n_kv_heads, D) of 0/1, multiplied into the output of ``k_norm`` (the QK-normed
        keys with gamma applied, before RoPE) by a forward hook. For ``qk_norm = "none"`` ``k_norm`` is the
        identity and the mask acts on the raw keys.
    projections
        layer -> (n_kv_heads, D, D) matrices P_h; head h's rows of ``W_k`` become ``P_h W_k,h`` (computed in
        float64, stored in the weight's dtype), so the keys are projected before QK-norm and RoPE.

    Notes
    -----
    Empty mappings change nothing at all: no hook is registered and no weight is written, which is why
    fraction 0 reproduces the unpruned loss exactly.
    """
    H, D = model.cfg.n_kv_heads, model.cfg.resolved_head_dim
    handles = []
    saved: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for i, P in (projections or {}).items():
                weight = model.blocks[i].attn.k_proj.weight
                saved[i] = weight.detach().clone()
                W = weight.detach().double().view(H, D, -1)  # (Hkv, D, C)
                weight.copy_((P.to(W.device, torch.float64) @ W).reshape(weight.shape))
        for i, mask in (masks or {}).items():
            keep = mask.to(next(model.parameters()).device)

            def hook(module, inputs, output, keep=keep):
                return output * keep.to(output.dtype)  # (B, T, Hkv, D) * (Hkv, D)

            handles.append(model.blocks[i].attn.k_norm.register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for i, original in saved.items():
                model.blocks[i].attn.k_proj.weight.copy_(original)


# ----------------------------------------------------------------------------------------------------
# The test split and the loss


def read_dataset_meta(data_dir: str | os.PathLike) -> dict:
    """``meta.json`` of a dataset directory, with the keys surgery relies on checked."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SpectraError(f"dataset directory not found: {data_dir}")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise SpectraError(f"{meta_path} not found: {data_dir} is not a prepared dataset directory")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise SpectraError(f"{meta_path}: invalid JSON: {e}") from None
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise SpectraError(f"{meta_path}: dtype {meta.get('dtype')!r} is not 'uint16' or 'uint32'")
    test = meta.get("splits", {}).get("test") if isinstance(meta.get("splits"), dict) else None
    if (
        not isinstance(test, dict)
        or not isinstance(test.get("file"), str)
        or not isinstance(test.get("tokens"), int)
    ):
        raise SpectraError(f"{meta_path}: splits.test with 'file' and 'tokens' is missing")
    return meta


def read_test_split(data_dir: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """The test split as a read-only memmap of token ids, after checking its size and vocabulary."""
    data_dir = Path(data_dir)
    meta = read_dataset_meta(data_dir)
    test = meta["splits"]["test"]
    path = data_dir / test["file"]
    if not path.is_file():
        raise SpectraError(f"{path} not found (splits.test of {data_dir / 'meta.json'})")
    dtype = np.dtype(meta["dtype"])
    if test["tokens"] <= 0:
        raise SpectraError(
            f"{data_dir / 'meta.json'}: splits.test.tokens is {test['tokens']}: the test split is empty"
        )
    expected = test["tokens"] * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise SpectraError(
            f"{path}: {size} bytes, but meta.json says {test['tokens']} {dtype} tokens ({expected} bytes)"
        )
    tokenizer = meta.get("tokenizer")
    tokenizer_vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    if isinstance(tokenizer_vocab, int) and tokenizer_vocab > vocab_size:
        raise SpectraError(
            f"{data_dir / 'meta.json'}: the tokenizer's vocab_size {tokenizer_vocab} exceeds the model's "
            f"vocab_size {vocab_size}; this dataset is not the one the model was trained on"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(test["tokens"],))


def loss_windows(
    tokens: np.ndarray, seq_len: int, test_tokens: int, vocab_size: int, source: str = "test split"
) -> torch.Tensor:
    """Contiguous, non-overlapping windows (n, seq_len + 1) from the start of ``tokens`` (int64, CPU).

    Window w holds tokens w*seq_len .. (w+1)*seq_len, so its seq_len targets are the next tokens of its
    seq_len inputs and every token is predicted once. n = min(test_tokens, len(tokens) - 1) // seq_len.
    """
    n = min(test_tokens, tokens.shape[0] - 1) // seq_len
    if n == 0:
        raise SpectraError(
            f"{source}: {tokens.shape[0]} tokens and test_tokens={test_tokens} give no window of seq_len={seq_len} + 1"
        )
    flat = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1], dtype=np.int64))
    index = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # (n, T+1)
    windows = flat[index]
    top = int(windows.max())
    if top >= vocab_size:
        raise SpectraError(f"{source}: token id {top} is outside the model's vocabulary of {vocab_size}")
    return windows


@torch.inference_mode()
def evaluate_loss(
    model: LLM,
    windows: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], object] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``windows`` (n, T+1).

    Per-token losses come from the model's own dtype (float32) and are summed in float64, in a fixed
    order, so the same model and windows always give the same number. ``on_batch(1)`` is called after
    each forward pass (a progress bar's ``update``).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size].to(device)  # (b, T+1)
        logits = model(chunk[:, :-1])  # (b, T, V)
        losses = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="none")
        total += float(losses.double().sum())
        count += losses.numel()
        if on_batch is not None:
            on_batch(1)
    return total / count


# ----------------------------------------------------------------------------------------------------
# The experiment


def _run_field(ckpt: Checkpoint, section: str, key: str):
    try:
        return ckpt.run_config[section][key]
    except (KeyError, TypeError):
        raise SpectraError(f"{ckpt.path}: run_config has no {section}.{key}") from None


IDENTITY_ATTRS = (
    "run_name",
    "step",
    "tokens",
    "checkpoint_eval_batch_sha256",
    "eval_batch_sha256",
    "model_config",
    "layers",
    "pair_rope",
    "seq_len",
    "test_tokens",
    "head_dim",
    "mask_site",
)
"""Attributes two surgery results must share to be cells of one experiment (merged into one file)."""


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
    meta = read_dataset_meta(data_dir)
    used_hash = _data_hash(meta, data_dir, ckpt, force)
    seq_len = seq_len or int(_run_field(ckpt, "train", "seq_len"))
    if not 0 < seq_len <= cfg.context_length:
        raise SpectraError(
            f"seq_len={seq_len} must be in 1..{cfg.context_length} (the model's context_length)"
        )
    windows = loss_windows(
        read_test_split(data_dir, cfg.vocab_size), seq_len, test_tokens, cfg.vocab_size,
        source=str(data_dir / meta["splits"]["test"]["file"]),
    )  # fmt: skip
    status = gamma_status(model, chosen) if "gamma" in strategies else "not requested"
    vectors = {}
    if "svd" in strategies:
        eval_batch = load_eval_batch(data_dir, expected_sha256=ckpt.eval_batch_sha256, force=force)  # (n, T)
        used_hash = eval_batch_sha256(eval_batch)
        if eval_batch.shape[1] > cfg.context_length:
            raise SpectraError(
                f"{data_dir / 'eval_batch.safetensors'}: sequences of {eval_batch.shape[1]} tokens exceed the "
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
            i: random_removal_order(seed, i, cfg.n_kv_heads, cfg.resolved_head_dim, pair_rope)
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
        Remove whole rotary pairs (j, j + D/2) so that the rotation cannot move a kept coordinate into a
        removed slot; ``False`` removes single coordinates (the original gamma-surgery).
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
    device = resolve_device(device)
    setup = _setup(
        checkpoint, data_dir, strategies, fractions, layers=layers, pair_rope=pair_rope,
        test_tokens=test_tokens, seq_len=seq_len, batch_size=batch_size, device=device, force=force,
    )  # fmt: skip
    if setup.status not in (GAMMA_OK, "not requested") and echo is not None:
        echo(f"gamma strategy {setup.status}")
    grid_seeds = seeds if "random" in strategies else 1  # the deterministic strategies fill seed 0 only
    request = _surgery_dataset(
        setup, strategies, fractions, grid_seeds, pair_rope, np.nan, force, batch_size, device
    )
    if reuse is not None:
        check_same_experiment(reuse, request)
        request = merge_surgeries(reuse, request)
    loss = request["loss"].values.copy()
    todo = _missing_cells(request, strategies, fractions, seeds, setup.status)
    baseline = float(reuse["baseline_loss"]) if reuse is not None else None
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
    return _with_loss(request, loss, baseline)


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


def _surgery_dataset(
    setup: _Setup, strategies, fractions, seeds, pair_rope, baseline, force, batch_size, device
) -> xr.Dataset:
    """The surgery dataset of this setup with every loss NaN (filled in by :func:`run_surgery`)."""
    ckpt, cfg = setup.ckpt, setup.model.cfg
    loss = np.full((len(strategies), len(fractions), seeds), np.nan)
    ds = xr.Dataset(
        {
            "loss": (
                ("strategy", "fraction", "seed"),
                loss,
                {
                    "long_name": "mean next-token cross-entropy on the test split after pruning",
                    "units": "nats/token",
                    "comment": "deterministic strategies (gamma, svd) fill seed 0 only, NaN elsewhere; "
                    "a strategy that is not applicable is NaN everywhere",
                },
            ),
            "baseline_loss": (
                (),
                baseline,
                {"long_name": "test loss of the unpruned model", "units": "nats/token"},
            ),
        },
        coords={
            "strategy": (
                "strategy",
                np.array(strategies, dtype=object),
                {"long_name": "pruning strategy", "units": "1"},
            ),
            "fraction": (
                "fraction",
                np.array(fractions, dtype=np.float64),
                {
                    "long_name": "requested fraction of head_dim removed from each pruned key head",
                    "units": "1",
                },
            ),
            "seed": (
                "seed",
                np.arange(seeds, dtype=np.int64),
                {"long_name": "random-pruning seed", "units": "1"},
            ),
            "removed_dims": (
                "fraction",
                np.array(setup.removed, dtype=np.int64),
                {"long_name": "key coordinates (or SVD directions) removed per pruned head", "units": "1"},
            ),
        },
        attrs={
            "Conventions": "CF-1.10",
            "title": f"Pruning surgery of the attention keys of run {ckpt.run_name}",
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "history": _history_line(
                setup, strategies, fractions, seeds, pair_rope, force, batch_size, device
            ),
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
        },
    )
    return ds


def _with_loss(ds: xr.Dataset, loss: np.ndarray, baseline: float) -> xr.Dataset:
    """``ds`` with its losses, their seed mean and interval, and the baseline filled in."""
    mean, low, high = _interval(loss)
    deterministic = np.array([s != "random" for s in ds["strategy"].values])
    low[deterministic], high[deterministic] = np.nan, np.nan
    dims = ("strategy", "fraction")
    out = ds.copy()
    out["loss"] = (ds["loss"].dims, loss, ds["loss"].attrs)
    out["baseline_loss"] = ((), baseline, ds["baseline_loss"].attrs)
    out["loss_mean"] = (dims, mean, {"long_name": "loss averaged over seeds", "units": "nats/token"})
    out["loss_ci_low"] = (
        dims,
        low,
        {
            "long_name": "lower bound of the 95% Student-t interval of the mean loss over seeds",
            "units": "nats/token",
            "comment": "NaN for deterministic strategies and for fewer than 2 seeds",
        },
    )
    out["loss_ci_high"] = (
        dims,
        high,
        {
            "long_name": "upper bound of the 95% Student-t interval of the mean loss over seeds",
            "units": "nats/token",
        },
    )
    return out


def check_same_experiment(existing: xr.Dataset, new: xr.Dataset) -> None:
    """Refuse to merge surgery results of different experiments, naming the first attribute that differs."""
    where = existing.encoding.get("source", "the existing surgery result")  # the file it was read from
    for key in IDENTITY_ATTRS:
        have, want = str(existing.attrs.get(key)), str(new.attrs.get(key))
        if have != want:
            raise SpectraError(
                f"{where} holds another experiment ({key} = {have}, this one has {want}): results measured "
                "differently cannot share a file; choose another --out"
            )


def merge_surgeries(existing: xr.Dataset, new: xr.Dataset) -> xr.Dataset:
    """The union of two results of one experiment: strategies in first-seen order, fractions sorted, seeds
    up to the larger count; where both hold a cell, ``existing`` wins (it was measured first)."""
    strategies = list(existing["strategy"].values) + [
        s for s in new["strategy"].values if s not in existing["strategy"].values
    ]
    fractions = sorted(set(map(float, existing["fraction"].values)) | set(map(float, new["fraction"].values)))
    seeds = max(existing.sizes["seed"], new.sizes["seed"])
    grid = dict(
        strategy=np.array(strategies, dtype=object), fraction=np.array(fractions), seed=np.arange(seeds)
    )
    a = existing["loss"].reindex(grid)
    b = new["loss"].reindex(grid)
    loss = a.where(~np.isnan(a), b)
    head_dim, pair_rope = int(new.attrs["head_dim"]), bool(int(new.attrs["pair_rope"]))
    merged = new.reindex(grid).copy()
    merged = merged.assign_coords(
        removed_dims=(
            "fraction",
            np.array([removed_count(f, head_dim, pair_rope) for f in fractions], dtype=np.int64),
            new["removed_dims"].attrs,
        )
    )
    merged["loss"] = (("strategy", "fraction", "seed"), loss.values, new["loss"].attrs)
    merged["baseline_loss"] = existing["baseline_loss"]
    merged.attrs["history"] = f"{existing.attrs.get('history', '')}\n{new.attrs['history']}".strip()
    return merged


def _interval(values: np.ndarray, level: float = INTERVAL_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t interval of the mean over the last axis, ignoring NaN; NaN bounds for n < 2."""
    n = np.sum(~np.isnan(values), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, axis=-1) / np.where(n > 0, n, np.nan)
        sd = np.sqrt(np.nansum((values - mean[..., None]) ** 2, axis=-1) / np.where(n > 1, n - 1, np.nan))
        half = stats.t.ppf(0.5 + level / 2, np.where(n > 1, n - 1, np.nan)) * sd / np.sqrt(n)
    return mean, mean - half, mean + half


def default_output_path(checkpoint_path: str | os.PathLike) -> Path:
    """``RUN/surgery.nc`` for ``RUN/checkpoints/tokens_X.safetensors`` (else beside the checkpoint)."""
    return run_dir_of(Path(checkpoint_path).resolve()) / "surgery.nc"


def write_surgery(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write a surgery dataset as zlib-compressed NetCDF4, atomically (temporary name, then rename)."""
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    return atomic_write(
        path, lambda tmp: ds.to_netcdf(tmp, mode="w", engine="netcdf4", format="NETCDF4", encoding=encoding)
    )


def read_surgery(path: str | os.PathLike) -> xr.Dataset:
    """Read a surgery file written by :func:`write_surgery`; anything else is a :class:`SpectraError`.

    A file of another format at the path (a cube, metrics, a user's file) is never replaced: the error says so.
    """
    path = Path(path)
    from spectra.cube import read_netcdf

    try:
        ds = read_netcdf(path)
    except SpectraError as e:
        raise SpectraError(
            f"{e}; {path} is not a surgery file, so it is left as it is: choose another --out"
        ) from None
    if ds.attrs.get("format") != FORMAT:
        raise SpectraError(
            f"{path}: not a surgery file (global attribute format = {ds.attrs.get('format')!r}), so it is left "
            "as it is: choose another --out"
        )
    return ds


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
        existing = read_surgery(target) if target.exists() else None
        ds = run_surgery(checkpoint, data_dir, reuse=existing, **kwargs)
        return write_surgery(ds, target)
