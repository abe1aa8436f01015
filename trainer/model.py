"""A Llama-style decoder in one file: RMSNorm pre-norm blocks, RoPE, grouped-query attention with
optional QK-norm, squared-ReLU or SwiGLU MLP, tied embeddings.

Read-out points used by the offline spectra code (by module name, through forward hooks):

- ``blocks.{i}.attn.q_proj`` / ``k_proj``: raw projections ``x W^T``           (B, T, H*D) / (B, T, Hkv*D)
- ``blocks.{i}.attn.q_norm`` / ``k_norm``: QK-norm, input (B, T, H, D), output with gamma applied
  (``nn.Identity`` when ``qk_norm = "none"``)
- ``blocks.{i}.attn.rotary``: called as ``rotary(q, k)`` on (B, H, T, D) tensors, returns the rotated pair

The attention order is: project -> QK-norm -> RoPE -> scaled_dot_product_attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" layout: coordinate j pairs with j + D/2."""

    def __init__(self, head_dim: int, context_length: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(context_length, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        # float32 tables, derived from float64 angles; not persistent: they are rebuilt from the config
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[-2]
        cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)  # (T, D/2)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


def make_qk_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm over head_dim with one gamma shared by the heads of a layer; frozen = gamma fixed at 1."""
    if cfg.qk_norm == "none":
        return nn.Identity()
    norm = nn.RMSNorm(cfg.resolved_head_dim, eps=cfg.norm_eps)
    if cfg.qk_norm == "frozen":
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
        self.q_norm = make_qk_norm(cfg)
        self.k_norm = make_qk_norm(cfg)
        self.rotary = Rotary(D, cfg.context_length, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        # QK-norm in float32 (under bf16 autocast too): the RMS statistic is the point of the norm, and the
        # float32 gain then matches its input, which keeps the fused RMSNorm kernel
        q, k = self.q_norm(q.float()).type_as(q), self.k_norm(k.float()).type_as(k)
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
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = self.cfg.init_std
                if name.endswith(("o_proj.weight", "mlp.down.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layers)  # GPT-2 style scaling of residual writes
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.ones_(p)  # every 1-D parameter is an RMSNorm gain

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for ``idx`` (B, T); with ``targets`` the mean next-token cross-entropy instead."""
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

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
