"""Which key dimensions a strategy removes, and removing them: rotary pairs, gamma, SVD, random, masks.

The pieces of pruning surgery ([`run`][spectra.surgery.run]): how many coordinates a fraction removes
(:func:`removed_count`), the order each strategy removes them in (:func:`gamma_removal_orders`,
:func:`random_removal_order`, or the keys' singular directions, :func:`key_singular_vectors`), and a context
manager that applies the removal to a model and restores it bit for bit (:func:`pruned_keys`). How a coordinate
is removed, and why whole rotary pairs by default, is in docs/surgery.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from spectra.errors import SpectraError
from spectra.surgery.file import GAMMA_OK
from trainer.model import LLM, rope_pairs

DEFAULT_BATCH_SIZE = 8
"""Sequences per forward pass (the test windows and the eval batch)."""


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


def removal_order(scores: np.ndarray, pair_rope: bool = True, layout: str = "half") -> np.ndarray:
    """Coordinates of one head in the order they are removed: lowest score first, ties by index.

    With ``pair_rope`` a coordinate and its rotary partner (j and j + D/2 in the ``half`` layout, 2i and
    2i + 1 in the ``interleaved`` one: ``model.rope_layout``) are scored together (the sum of their scores)
    and removed together, so every prefix of even length is a union of rotary pairs.

    >>> removal_order(np.array([3.0, 1.0, 2.0, 0.5])).tolist()          # pairs (0, 2): 5, (1, 3): 1.5
    [1, 3, 0, 2]
    >>> removal_order(np.array([3.0, 1.0, 2.0, 0.5]), layout="interleaved").tolist()  # (0, 1): 4, (2, 3): 2.5
    [2, 3, 0, 1]
    >>> removal_order(np.array([3.0, 1.0, 2.0, 0.5]), pair_rope=False).tolist()
    [3, 1, 2, 0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not pair_rope:
        return np.argsort(scores, kind="stable")
    pairs = np.asarray(rope_pairs(scores.shape[0], layout))  # (D/2, 2)
    order = np.argsort(scores[pairs[:, 0]] + scores[pairs[:, 1]], kind="stable")  # (D/2,)
    return pairs[order].ravel()


def random_removal_order(
    seed: int, layer: int, n_kv_heads: int, head_dim: int, pair_rope: bool = True, layout: str = "half"
) -> np.ndarray:
    """Random removal orders (n_kv_heads, head_dim) for one layer; the same (seed, layer) gives the same orders.

    Seeding by (seed, layer) keeps a layer's draw independent of which other layers are pruned.
    """
    rng = np.random.default_rng([seed, layer])
    return np.stack([removal_order(rng.random(head_dim), pair_rope, layout) for _ in range(n_kv_heads)])


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
    if qk_norm in ("frozen", "frozen_k"):
        return (
            f"not applicable: the key norm's gain is frozen at 1 (qk_norm = {qk_norm!r}): all |gamma| are equal, "
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
        order = removal_order(np.abs(gamma), pair_rope, model.cfg.rope_layout)
        orders[i] = np.tile(order, (model.cfg.n_kv_heads, 1))
    return orders


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
