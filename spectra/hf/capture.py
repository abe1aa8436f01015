"""Record the queries and keys of a ``transformers`` model at every read-out site, in one forward pass.

The sites keep the meaning of ``docs/sites.md``, located in each family's modules by its adapter
(:mod:`spectra.hf.adapters`):

| site | hook |
| --- | --- |
| ``proj`` | output of ``q_proj`` / ``k_proj`` (GPT-NeoX: head h's q and k slices of ``query_key_value``) |
| ``unit`` | input of ``q_norm`` / ``k_norm`` divided by its RMS with the module's epsilon (QK-norm families) |
| ``normed`` | output of ``q_norm`` / ``k_norm``; ``proj`` itself without QK-norm |
| ``rope`` | the query and key tensors the attention module hands to its attention kernel |

The ``rope`` site is read at the one place every family passes through, whatever its rotary layout
(full, partial, per-layer bases, no RoPE in some layers): the attention function. ``transformers``
looks it up by name (``config._attn_implementation``) in its ``AttentionInterface``; this module
registers one more, :data:`CAPTURE_ATTENTION`, which records its ``query`` and ``key`` arguments and then
computes the attention with ``transformers``' own SDPA function and SDPA masks (the documented way to
add an attention function), so the model computes exactly what it computes under ``sdpa``. The
score scaling (``1/sqrt(head_dim)``, Gemma's ``query_pre_attn_scalar``) is applied inside the kernel and
is not part of the recorded vectors.

``unit`` follows the families' RMSNorm arithmetic: float32, ``x * rsqrt(mean(x^2) + eps)``, back to the
input's dtype, before the gain; the mean runs over ``head_dim`` for per-head norms and over the whole
projection for OLMo-2's.

Memory: as in :mod:`spectra.extract.capture`, each layer is reduced as soon as its attention function has run
and the forward pass stops after the last requested layer, so one layer's activations are alive at a
time and the later layers, the final norm and any LM head are not computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.extract.capture import LayerQK, heads_first_bhtd, heads_first_bthd
from spectra.hf.adapters import Architecture, HeadLayout, architecture_for, head_layout

CAPTURE_ATTENTION = "collapse_capture"
"""Name of the recording attention function in ``transformers``' ``AttentionInterface``."""

T = TypeVar("T")

# the recorder of the capture in progress in this thread (None: the function only computes attention)
_RECORDER: ContextVar[Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None] = ContextVar(
    "collapse_capture_recorder", default=None
)


def require_transformers() -> Any:
    """``import transformers``, or a SpectraError saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise SpectraError(
            "public models need the transformers library: pip install 'collapse[hf]' (or: pip install -e '.[hf]')"
        ) from None
    return transformers


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    record = _RECORDER.get()
    if record is not None:
        record(module, query, key)  # (B, H, T, D), (B, Hkv, T, D)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture_attention() -> str:
    """Register :data:`CAPTURE_ATTENTION` (attention and mask functions) with ``transformers``; idempotent."""
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    return CAPTURE_ATTENTION


class _StopForward(Exception):
    """Raised once the last requested layer is recorded, to end the forward pass."""


@contextmanager
def _capture_implementation(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the recording attention function, restoring its own afterwards."""
    register_capture_attention()
    previous = model.config._attn_implementation
    if previous != CAPTURE_ATTENTION:
        model.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        yield
    finally:
        if previous != CAPTURE_ATTENTION:
            model.set_attn_implementation(previous)


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, in float32 as the families' RMSNorms compute it."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attention_modules(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The attention module of every decoder layer, in layer order."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise SpectraError(f"{type(model).__name__}: no decoder layers at base_model.layers")
    return [getattr(layer, arch.attention) for layer in layers]


def check_public_batch(model: nn.Module, input_ids: torch.Tensor, drop_first: int) -> int:
    """Validate an eval batch for a ``transformers`` model and return N, the tokens per head.

    Raises
    ------
    SpectraError
        Not a 2-D integer tensor, ids outside the model's embedding, longer than its
        ``max_position_embeddings``, or ``drop_first`` not in ``[0, seq_len)``.
    """
    if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise SpectraError(
            f"input_ids must be a 2-D integer tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    n_seqs, seq_len = input_ids.shape
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise SpectraError(
            f"eval batch has token ids in [{lo}, {hi}], outside the model's embedding [0, {vocab})"
        )
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise SpectraError(
            f"eval batch seq_len {seq_len} exceeds the model's max_position_embeddings {context}"
        )
    if not 0 <= drop_first < seq_len:
        raise SpectraError(
            f"drop_first must be in [0, {seq_len}) for sequences of {seq_len} tokens, got {drop_first}"
        )
    return n_seqs * (seq_len - drop_first)


def _site_hooks(
    attn: nn.Module,
    arch: Architecture,
    dims: HeadLayout,
    q: dict[str, torch.Tensor],
    k: dict[str, torch.Tensor],
    drop_first: int,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks filling ``q`` and ``k`` with one layer's ``proj`` (and ``unit``, ``normed``) vectors."""
    H, Hkv, D = dims.n_heads, dims.n_kv_heads, dims.head_dim

    def on_proj(store: dict[str, torch.Tensor], heads: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            store["proj"] = heads_first_bthd(out, heads, drop_first)  # (heads, N, D)

        return hook

    def on_fused(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        per_head = out.view(*out.shape[:2], H, 3 * D)  # (B, T, H, [q_h, k_h, v_h])
        q["proj"] = heads_first_bthd(per_head[..., :D], H, drop_first)
        k["proj"] = heads_first_bthd(per_head[..., D : 2 * D], H, drop_first)

    def on_norm(store: dict[str, torch.Tensor], heads: int) -> Callable[..., None]:
        def to_heads(x: torch.Tensor) -> torch.Tensor:
            if arch.norm_input == "bhtd":
                return heads_first_bhtd(x, drop_first)
            return heads_first_bthd(x, heads, drop_first)  # (B, T, H, D) or the full width (B, T, H*D)

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            store["unit"] = to_heads(_unit_rms(args[0], float(getattr(module, arch.norm_eps))))
            store["normed"] = to_heads(out)

        return hook

    if arch.qkv_proj is not None:
        handles = [getattr(attn, arch.qkv_proj).register_forward_hook(on_fused)]
    else:
        handles = [
            getattr(attn, arch.q_proj).register_forward_hook(on_proj(q, H)),
            getattr(attn, arch.k_proj).register_forward_hook(on_proj(k, Hkv)),
        ]
    if arch.has_qk_norm:
        handles.append(attn.q_norm.register_forward_hook(on_norm(q, H)))
        handles.append(attn.k_norm.register_forward_hook(on_norm(k, Hkv)))
    return handles


def capture_public_qk(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    drop_first: int = 0,
    layers: Iterable[int] | None = None,
    reduce: Callable[[LayerQK], T] | None = None,
) -> dict[int, T] | dict[int, LayerQK]:
    """Run a ``transformers`` model once on ``input_ids`` and record queries and keys at every site.

    Parameters
    ----------
    model
        A supported ``transformers`` model (its base model, as ``AutoModel`` loads it, or one with a head)
        in eval mode; it runs in its own dtype on its own device, without gradients. Its attention
        implementation is switched to :data:`CAPTURE_ATTENTION` for the pass and restored afterwards.
    input_ids
        ``(n_seqs, seq_len)`` token ids.
    drop_first
        Positions dropped at the start of every sequence after the forward pass.
    layers
        Layer indices to record (default: all); the pass stops after the last of them.
    reduce
        Called with each layer's ``LayerQK`` as soon as it is complete; its result is kept instead.

    Returns
    -------
    dict
        ``{layer: reduce(LayerQK)}`` (or ``LayerQK``), heads first as in :func:`spectra.extract.capture.capture_qk`:
        ``q[site]`` is ``(n_heads, N, D)``, ``k[site]`` ``(n_kv_heads, N, D)``; ``unit`` only for QK-norm
        families.
    """
    arch = architecture_for(model.config.model_type)
    dims = head_layout(model.config)
    H, Hkv, D = dims.n_heads, dims.n_kv_heads, dims.head_dim
    attns = attention_modules(model, arch)
    wanted = sorted(set(range(len(attns)) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(attns):
        raise SpectraError(f"layers must be a non-empty subset of 0..{len(attns) - 1}, got {wanted}")
    check_public_batch(model, input_ids, drop_first)
    layer_of = {id(attns[i]): i for i in wanted}
    stores: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {i: ({}, {}) for i in wanted}
    results: dict[int, Any] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        i = layer_of.get(id(module))
        if i is None:
            return
        q, k = stores[i]
        if query.shape[1] != H or key.shape[1] != Hkv or query.shape[-1] != D:
            raise SpectraError(
                f"layer {i}: the attention received queries {tuple(query.shape)} and keys {tuple(key.shape)}, "
                f"not the ({H}, {Hkv}) heads of dimension {D} the config describes"
            )
        q["rope"], k["rope"] = heads_first_bhtd(query, drop_first), heads_first_bhtd(key, drop_first)
        if not arch.has_qk_norm:
            q["normed"], k["normed"] = q["proj"], k["proj"]
        lq = LayerQK(layer=i, q=dict(q), k=dict(k))
        q.clear()
        k.clear()
        results[i] = lq if reduce is None else reduce(lq)
        if i == wanted[-1]:
            raise _StopForward

    for i in wanted:
        handles += _site_hooks(attns[i], arch, dims, *stores[i], drop_first)
    device = next(model.parameters()).device
    token = _RECORDER.set(record)
    try:
        with _capture_implementation(model), torch.no_grad():
            try:
                model(input_ids=input_ids.to(device), use_cache=False)
            except _StopForward:
                pass  # the last requested layer is recorded
    finally:
        _RECORDER.reset(token)
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if i not in results]
    if missing:
        raise SpectraError(f"layers {missing} were not recorded: their attention function never ran")
    return {i: results[i] for i in wanted}


__all__ = [
    "CAPTURE_ATTENTION",
    "attention_modules",
    "capture_public_qk",
    "check_public_batch",
    "register_capture_attention",
    "require_transformers",
]
