"""A Llama-style decoder in one file: RMSNorm pre-norm blocks, RoPE, grouped-query attention with
optional QK-norm, squared-ReLU or SwiGLU MLP, tied embeddings.

Read-out points used by the offline spectra code (by module name, through forward hooks):

- ``blocks.{i}.attn.q_proj`` / ``k_proj``: raw projections ``x W^T``           (B, T, H*D) / (B, T, Hkv*D)
- ``blocks.{i}.attn.q_norm`` / ``k_norm``: QK-norm, input (B, T, H, D), output with gamma applied
  (``nn.Identity`` when ``qk_norm = "none"``)
- ``blocks.{i}.attn.rotary``: called as ``rotary(q, k)`` on (B, H, T, D) tensors, returns the rotated pair
  (its coordinate pairs: :func:`rope_pairs`, by ``model.rope_layout``)

The attention order is: project -> QK-norm -> RoPE -> scaled_dot_product_attention.

``model(idx, targets)`` computes the loss with :func:`linear_cross_entropy`, at the end of this file:
the LM head and the cross-entropy, optionally a chunk of tokens at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as it is when it is float64 (a float64 model computes in float64 throughout)."""
    return x if x.dtype == torch.float64 else x.float()


class Rotary(nn.Module):
    """Rotary position embedding. Pair i (frequency ``theta^(-2i/D)``) is the coordinates (i, i + D/2) in the
    ``half`` layout ("rotate half", Llama) and (2i, 2i + 1) in the ``interleaved`` layout (torchtune's); the
    two are the same rotation up to a fixed permutation of the head's coordinates."""

    def __init__(self, head_dim: int, context_length: int, theta: float, layout: str = "half"):
        super().__init__()
        if layout not in ("half", "interleaved"):
            raise ValueError(f"unknown RoPE layout {layout!r}; expected 'half' or 'interleaved'")
        self.layout = layout
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(context_length, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        # float32 tables, derived from float64 angles; not persistent: they are rebuilt from the config
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The ``half`` layout: coordinate j turns with j + D/2."""
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)

    @staticmethod
    def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The ``interleaved`` layout: coordinate 2i turns with 2i + 1."""
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)  # (T, D/2)
        rotate = self.rotate if self.layout == "half" else self.rotate_interleaved
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rope_pairs(head_dim: int, layout: str) -> list[tuple[int, int]]:
    """The coordinate pairs RoPE turns together, pair i (frequency ``theta^(-2i/D)``) first.

    >>> rope_pairs(4, "half"), rope_pairs(4, "interleaved")
    ([(0, 2), (1, 3)], [(0, 1), (2, 3)])
    """
    half = head_dim // 2
    if layout == "half":
        return [(i, i + half) for i in range(half)]
    if layout == "interleaved":
        return [(2 * i, 2 * i + 1) for i in range(half)]
    raise ValueError(f"unknown RoPE layout {layout!r}; expected 'half' or 'interleaved'")


class QKNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in at least float32: the RMS statistic is the point of the norm. The gain is cast
    to the input's dtype (exact: a bfloat16 gain of pure bfloat16 weights widens without rounding), so input and
    gain match and PyTorch's fused kernel runs; the output is in float32 (float64 for a float64 model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = at_least_float32(x)
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def make_qk_norm(cfg: ModelConfig, which: str) -> nn.Module:
    """RMSNorm over head_dim with one gamma shared by the heads of a layer, for ``which`` = ``"q"`` or ``"k"``;
    ``frozen`` fixes both gammas at 1, ``frozen_k`` only the keys'."""
    if cfg.qk_norm == "none":
        return nn.Identity()
    norm = QKNorm(cfg.resolved_head_dim, eps=cfg.resolved_norm_eps)
    if cfg.qk_norm == "frozen" or (cfg.qk_norm == "frozen_k" and which == "k"):
        norm.weight.requires_grad_(False)
    return norm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        D = self.head_dim
        # separate projections so that Muon orthogonalises each and spectra finds W_k by name
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * D, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * D, cfg.d_model, bias=False)
        self.q_norm = make_qk_norm(cfg, "q")
        self.k_norm = make_qk_norm(cfg, "k")
        self.rotary = Rotary(D, cfg.context_length, cfg.rope_theta, cfg.rope_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        # QK-norm in float32 (QKNorm; under bf16 autocast and bfloat16 weights too), back to q's dtype
        q, k = self.q_norm(q).type_as(q), self.k_norm(k).type_as(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = self.rotary(q, k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.resolved_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.resolved_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LLM(nn.Module):
    """The decoder. ``loss_chunk_tokens`` is how ``model(idx, targets)`` computes its loss, not part of the
    architecture: 0 materialises the (B, T, V) logits, N > 0 runs the LM head and the cross-entropy N tokens
    at a time (:func:`linear_cross_entropy`; the same value to float rounding)."""

    def __init__(self, cfg: ModelConfig, *, loss_chunk_tokens: int = 0):
        super().__init__()
        cfg.validate()
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be non-negative, got {loss_chunk_tokens}")
        self.cfg = cfg
        self.loss_chunk_tokens = loss_chunk_tokens
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.resolved_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = self.cfg.init_std
                residual_write = name.endswith(("o_proj.weight", "mlp.down.weight"))
                if residual_write and self.cfg.init_scheme == "scaled_residual":
                    std /= math.sqrt(2 * self.cfg.n_layers)  # GPT-2 style scaling of residual writes
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.ones_(p)  # every 1-D parameter is an RMSNorm gain

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ``idx`` (B, T); with ``targets`` the mean next-token cross-entropy instead."""
        x = self.embed(idx)  # (B, T, C)
        if self.cfg.embed_scale == "sqrt_d_model":
            x = x * math.sqrt(self.cfg.d_model)  # the tied LM head below reads the unscaled table
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight  # (V, C)
        if targets is None:
            return F.linear(x, weight)  # (B, T, V)
        return linear_cross_entropy(
            x.view(-1, x.size(-1)), weight, targets.reshape(-1), self.loss_chunk_tokens
        )

    def num_params(self) -> int:
        """Distinct parameters (a tied LM head counted once)."""
        return sum(p.numel() for p in self.parameters())


def count_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 N + 12 L d T, with N every weight including the LM head.

    N counts the LM head as a matmul even when tied (its FLOPs are spent either way).
    The attention term follows the PaLM appendix: 12 * n_layers * (n_heads * head_dim) * seq_len.
    """
    D = cfg.resolved_head_dim
    attn = cfg.d_model * D * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = cfg.d_model * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    n_matmul = cfg.n_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * D * seq_len


# ----------------------------------------------------------------------------------------------------
# The LM head and the loss, a chunk of tokens at a time (``model(idx, targets)`` with loss_chunk_tokens > 0).
#
# At the 88M preset's batch of 32 x 2048 tokens and vocabulary 49,152 the logits are 3.2e9 numbers: 6.4 GB in
# bfloat16 and 12.9 GB more for the float32 copy the loss reads; on one H100 the head with its loss took 66 ms
# eager and 22 ms compiled (torch 2.11; docs/benchmarks.md). The libraries that fuse it (Liger Kernel's fused linear cross-entropy,
# Apple's Cut Cross-Entropy) are Triton kernels for CUDA only; the tests run on the CPU, so this is plain
# torch, which torch.compile fuses on either device, in the model's own graph. It lives in this file because
# it is what ``model(idx, targets)`` computes, and spectra may import the model file and nothing else.


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would multiply in: the autocast dtype when autocast is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    grad_x: bool,
    grad_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss over all rows and, if asked, the gradients of the *mean* loss."""
    n = x.shape[0]
    dtype = _compute_dtype(x)
    # softmax and sums in float32, or in float64 for a float64 model
    acc = torch.promote_types(torch.float32, dtype)
    xc, wc = x.to(dtype), weight.to(dtype)  # (N, C), (V, C): cast once, not per chunk
    loss_sum = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty_like(x) if grad_x else None  # (N, C)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_w else None  # (V, C)
    for start in range(0, n, chunk_tokens):
        xs, ts = xc[start : start + chunk_tokens], targets[start : start + chunk_tokens]  # (n, C), (n,)
        logits = (xs @ wc.mT).to(acc)  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        loss_sum = loss_sum + (lse - logits.gather(1, ts[:, None]).squeeze(1)).sum()
        if dx is None and dw is None:
            continue
        # in place: the float32 logits are the largest tensor here and are not needed any more
        dz = logits.sub_(lse[:, None]).exp_()  # softmax (n, V)
        dz.scatter_add_(1, ts[:, None], torch.full_like(lse[:, None], -1.0))  # minus the one-hot target
        dz = dz.div_(n).to(dtype)
        if dx is not None:
            dx[start : start + chunk_tokens] = (dz @ wc).to(x.dtype)
        if dw is not None:
            dw = dw + (dz.mT @ xs).to(acc)
    return loss_sum, dx, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ weight.T`` with gradients computed in the forward pass."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, dx, dw = _chunked(x, weight, targets, chunk_tokens, grad_x=need_x, grad_w=need_w)
        ctx.save_for_backward(
            dx if dx is not None else x.new_empty(0),
            dw.to(weight.dtype) if dw is not None else weight.new_empty(0),
        )
        ctx.need = (need_x, need_w)
        return loss_sum / x.shape[0]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        dx, dw = ctx.saved_tensors
        need_x, need_w = ctx.need
        return (dx * grad_loss if need_x else None, dw * grad_loss if need_w else None, None, None)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 0
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) of the logits ``x @ weight.T``, ``chunk_tokens`` rows at a time.

    For rows ``x_i`` (C,) with targets ``t_i`` and logits ``z_i = W x_i`` (V,)::

        loss       = (1/N) sum_i [logsumexp(z_i) - z_i[t_i]]
        dloss/dz_i = (softmax(z_i) - onehot(t_i)) / N
        dloss/dx_i = W^T dloss/dz_i          dloss/dW = sum_i dloss/dz_i x_i^T

    With ``chunk_tokens > 0`` and gradients needed, all of them are computed in the forward pass, chunk
    by chunk, and only ``dloss/dx`` (N, C) and ``dloss/dW`` (V, C) are kept; the backward pass scales
    them by the incoming gradient (the scheme of Liger Kernel's fused linear cross-entropy). So at most
    one chunk's logits exist at a time and nothing is recomputed. Precision follows ``F.linear`` then
    ``F.cross_entropy(logits.float())``: matmuls in the autocast dtype when autocast is on, log-sum-exp
    and softmax in float32, ``dloss/dW`` summed over the chunks in float32.

    Parameters
    ----------
    x
        Final hidden states (N, C).
    weight
        LM-head weight (V, C) (the token embedding when tied).
    targets
        Target ids (N,), int64.
    chunk_tokens
        Rows per chunk; 0 computes the whole ``(N, V)`` logits at once, exactly
        ``F.cross_entropy(F.linear(x, weight).float(), targets)``.

    Returns
    -------
    torch.Tensor
        0-d loss, float32 (float64 for float64 inputs). With ``chunk_tokens > 0`` and gradients needed, its backward pass returns
        the gradients computed in the forward pass (see :func:`linear_cross_entropy`); under ``no_grad`` only
        the loss is computed.

    Examples
    --------
    >>> x, w, t = torch.randn(10, 4), torch.randn(7, 4), torch.randint(0, 7, (10,))
    >>> plain = linear_cross_entropy(x, w, t)
    >>> bool(torch.allclose(linear_cross_entropy(x, w, t, chunk_tokens=3), plain))
    True
    """
    if chunk_tokens <= 0:
        return F.cross_entropy(at_least_float32(F.linear(x, weight)), targets)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_tokens)
    loss_sum, _, _ = _chunked(x, weight, targets, chunk_tokens, grad_x=False, grad_w=False)
    return loss_sum / x.shape[0]
