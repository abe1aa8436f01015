"""Record the queries and keys of every attention layer at every read-out site, in one forward pass.

Read-out sites, in the order of the attention (see ``docs/sites.md`` for why each matters):

| site | vectors | hook |
| --- | --- | --- |
| ``proj`` | raw projections ``x W_q^T``, ``x W_k^T`` split into heads | ``q_proj`` / ``k_proj`` output |
| ``unit`` | RMS-normalised to unit RMS over head_dim, before the gain (QK-norm models only) | ``q_norm`` / ``k_norm`` input |
| ``normed`` | after QK-norm, gain gamma applied (equal to ``proj`` without QK-norm) | ``q_norm`` / ``k_norm`` output |
| ``rope`` | after the rotary embedding, as they enter the attention scores | ``rotary`` output |

``unit`` is computed from the norm's input exactly as the model's QK-norm computes it
(``torch.nn.functional.rms_norm`` in at least float32, with the module's own epsilon, no weight), so for
a frozen QK-norm model (gamma fixed at 1) it equals ``normed`` bit for bit.

Every site's vectors are returned heads first, ``(heads, N, D)`` with ``N = n_seqs * (seq_len -
drop_first)`` tokens in the order ``n = b * (seq_len - drop_first) + t``; keys keep their key/value
heads (``n_kv_heads`` of them under grouped-query attention), they are never repeated to the query
heads. Values are the model's own float32 activations; nothing is converted here.

Memory: a layer's vectors are handed to ``reduce`` as soon as its last hook has fired and are then
dropped, so at most one layer's activations are alive at a time (about 60 MB of float32 for the 88M
model on 4096 tokens, whatever its depth). The forward pass stops right after the last requested layer's attention read-out,
so neither the rest of the network nor the LM head is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from spectra.cube import SITES
from spectra.errors import SpectraError
from trainer.model import LLM, at_least_float32

T = TypeVar("T")


@dataclass(frozen=True)
class LayerQK:
    """One layer's queries and keys at every site, heads first.

    ``q[site]`` is ``(n_heads, N, D)`` and ``k[site]`` is ``(n_kv_heads, N, D)``, float32 on the
    model's device. ``unit`` is absent for models without QK-norm.
    """

    layer: int
    q: dict[str, torch.Tensor]
    k: dict[str, torch.Tensor]

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites present, in ``SITES`` order."""
        return tuple(s for s in SITES if s in self.q)


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass once every requested layer is recorded."""


def heads_first_bthd(x: torch.Tensor, n_heads: int, drop_first: int) -> torch.Tensor:
    """(B, T, H*D) or (B, T, H, D) -> (H, N, D) with the first ``drop_first`` positions dropped."""
    b, t = x.shape[:2]
    x = x.view(b, t, n_heads, -1)[:, drop_first:]  # (B, T', H, D)
    return x.permute(2, 0, 1, 3).reshape(n_heads, -1, x.shape[-1])  # (H, B*T', D)


def heads_first_bhtd(x: torch.Tensor, drop_first: int) -> torch.Tensor:
    """(B, H, T, D) -> (H, N, D) with the first ``drop_first`` positions dropped."""
    x = x[:, :, drop_first:]  # (B, H, T', D)
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # (H, B*T', D)


def check_batch(model: LLM, input_ids: torch.Tensor, drop_first: int) -> int:
    """Validate a batch for ``model`` and return N, the tokens per head after dropping positions.

    Raises
    ------
    SpectraError
        Not a 2-D integer tensor, longer than the context, token ids outside the vocabulary, or
        ``drop_first`` not in ``[0, seq_len)``.
    """
    cfg = model.cfg
    if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise SpectraError(
            f"input_ids must be a 2-D integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    n_seqs, seq_len = input_ids.shape
    if seq_len > cfg.context_length:
        raise SpectraError(
            f"eval batch seq_len {seq_len} exceeds the model's context_length {cfg.context_length}"
        )
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise SpectraError(
            f"eval batch has token ids in [{lo}, {hi}], outside the vocabulary [0, {cfg.vocab_size})"
        )
    if not 0 <= drop_first < seq_len:
        raise SpectraError(
            f"drop_first must be in [0, {seq_len}) for sequences of {seq_len} tokens, got {drop_first}"
        )
    return n_seqs * (seq_len - drop_first)


def capture_qk(
    model: LLM,
    input_ids: torch.Tensor,
    *,
    drop_first: int = 0,
    layers: Iterable[int] | None = None,
    reduce: Callable[[LayerQK], T] | None = None,
) -> dict[int, T] | dict[int, LayerQK]:
    """Run ``model`` once on ``input_ids`` and record queries and keys at every read-out site.

    The forward pass runs in the model's dtype (float32) on the model's device, without autocast and
    without gradients; hooks are removed afterwards, also on error.

    Parameters
    ----------
    model
        A ``trainer.model.LLM`` (put it in eval mode; it has no dropout either way).
    input_ids
        ``(n_seqs, seq_len)`` token ids; moved to the model's device.
    drop_first
        Positions dropped at the start of every sequence (attention-sink / BOS tokens), so that
        ``N = n_seqs * (seq_len - drop_first)``.
    layers
        Layer indices to record (default: all). The pass stops after the last of them.
    reduce
        Called with each layer's ``LayerQK`` as soon as the layer is complete (inside the
        forward pass); its result is stored instead of the activations, which are then freed.

    Returns
    -------
    dict
        ``{layer: reduce(LayerQK)}``, or ``{layer: LayerQK}`` without ``reduce``, in layer order.

    Examples
    --------
    >>> from trainer.config import ModelConfig
    >>> model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()
    >>> out = capture_qk(model, torch.randint(0, 64, (2, 16)), drop_first=1)
    >>> out[1].sites, tuple(out[1].q["rope"].shape), tuple(out[1].k["rope"].shape)
    (('proj', 'unit', 'normed', 'rope'), (4, 30, 8), (2, 30, 8))
    >>> norms = capture_qk(model, torch.randint(0, 64, (2, 16)), reduce=lambda lq: lq.k["proj"].norm())
    >>> sorted(norms)
    [0, 1]
    """
    n_layers = len(model.blocks)
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= n_layers:
        raise SpectraError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {wanted}")
    check_batch(model, input_ids, drop_first)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    results: dict[int, Any] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for i in wanted:
            handles += _layer_hooks(
                model.blocks[i].attn, i, drop_first, results, reduce, last=i == wanted[-1]
            )
        with torch.no_grad():
            try:
                model(input_ids)
            except _StopForward:
                pass  # the last requested layer is recorded; the rest of the pass is not needed
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if i not in results]
    if missing:  # pragma: no cover - only if the model stops calling its rotary module
        raise SpectraError(f"layers {missing} were not recorded: their hooks never fired")
    return {i: results[i] for i in wanted}


def _layer_hooks(
    attn: nn.Module,
    i: int,
    drop_first: int,
    results: dict[int, Any],
    reduce: Callable[[LayerQK], Any] | None,
    last: bool,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the hooks that record layer ``i``'s queries and keys at every site; its ``LayerQK`` (or
    ``reduce`` of it) lands in ``results[i]`` when the rotary embedding has run, and the last layer's ends the
    forward pass (:class:`_StopForward`)."""
    h, hkv = attn.n_heads, attn.n_kv_heads
    q: dict[str, torch.Tensor] = {}
    k: dict[str, torch.Tensor] = {}

    def on_proj(store: dict[str, torch.Tensor], heads: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            store["proj"] = heads_first_bthd(out, heads, drop_first)  # (heads, N, D)

        return hook

    def on_norm(store: dict[str, torch.Tensor], heads: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0]  # (B, T, heads, D), the norm's input
            if isinstance(module, nn.RMSNorm):
                # the norm's own arithmetic without the gain: unit RMS over head_dim, in QKNorm's dtype
                unit = F.rms_norm(at_least_float32(x), module.normalized_shape, weight=None, eps=module.eps)
                store["unit"] = heads_first_bthd(unit, heads, drop_first)
            store["normed"] = heads_first_bthd(out, heads, drop_first)

        return hook

    def on_rotary(_module: nn.Module, _args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        q["rope"] = heads_first_bhtd(out[0], drop_first)  # (H, N, D)
        k["rope"] = heads_first_bhtd(out[1], drop_first)  # (Hkv, N, D)
        layer = LayerQK(layer=i, q=dict(q), k=dict(k))
        q.clear()
        k.clear()
        results[i] = layer if reduce is None else reduce(layer)
        if last:
            raise _StopForward

    if not isinstance(attn.q_norm, nn.RMSNorm | nn.Identity):
        raise SpectraError(f"layer {i}: unexpected QK-norm module {type(attn.q_norm).__name__}")
    return [
        attn.q_proj.register_forward_hook(on_proj(q, h)),
        attn.k_proj.register_forward_hook(on_proj(k, hkv)),
        attn.q_norm.register_forward_hook(on_norm(q, h)),
        attn.k_norm.register_forward_hook(on_norm(k, hkv)),
        attn.rotary.register_forward_hook(on_rotary),
    ]
