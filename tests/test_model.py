"""The decoder: parameter counts, shapes, QK-norm variants, GQA, MLP kinds, causality, RoPE, FLOPs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_config
from torch import nn

from trainer.config import ModelConfig, OptimConfig, load_config
from trainer.model import LLM, Rotary, count_flops_per_token, rope_pairs
from trainer.optim import Optimizers

SMALL = tiny_model_config("learned", context_length=16)


def small(**changes) -> ModelConfig:
    return dataclasses.replace(SMALL, **changes)


def build(cfg: ModelConfig, seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    return LLM(cfg)


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)  # (B, T)


def expected_params(m: ModelConfig) -> int:
    """Parameter count written out from the architecture, independently of the module tree."""
    D = m.resolved_head_dim
    attn = m.d_model * D * m.n_heads * 2 + m.d_model * D * m.n_kv_heads * 2  # q, o + k, v
    mlp = m.d_model * m.d_ff * (3 if m.mlp == "swiglu" else 2)
    norms = 2 * m.d_model + (2 * D if m.qk_norm != "none" else 0)  # attn/mlp RMSNorm + q/k gamma
    head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    return m.vocab_size * m.d_model + m.n_layers * (attn + mlp + norms) + m.d_model + head


# ----------------------------------------------------------------------------------------------------
# parameter counts


def test_tiny_parameter_count():
    cfg = load_config("tiny").model
    model = LLM(cfg)
    assert model.num_params() == expected_params(cfg) == 1_246_592


def test_paper_parameter_count_on_meta():
    cfg = load_config("paper-88m").model
    with torch.device("meta"):  # no memory, no init cost: the count is all we want
        model = LLM(cfg)
    assert model.num_params() == expected_params(cfg) == 88_630_528


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"qk_norm": "none"},
        {"qk_norm": "frozen"},
        {"mlp": "swiglu"},
        {"tie_embeddings": False},
        {"head_dim": 6},
    ],
)
def test_parameter_count_formula(changes):
    cfg = small(**changes)
    assert LLM(cfg).num_params() == expected_params(cfg)


# ----------------------------------------------------------------------------------------------------
# forward


def test_logits_shape_and_initial_loss():
    model = build(SMALL)
    idx = tokens(SMALL)
    logits = model(idx)
    assert logits.shape == (2, 12, SMALL.vocab_size)
    targets = tokens(SMALL, seed=2)  # unrelated to the input (a tied head favours repeating the input token)
    loss = model(idx, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # small init: nearly uniform predictions, loss close to ln V (logits of sd 0.02 sqrt(d_model) = 0.11, so the
    # mean over 24 tokens strays from ln V by about 0.11 / sqrt(24) = 0.023 per sd: 0.1 is over 4 sd)
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1
    # the loss is the mean cross-entropy of the logits against the given targets
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, SMALL.vocab_size), targets.reshape(-1)))


@pytest.mark.parametrize("chunk", [0, 7])
def test_a_float64_model_computes_its_loss_and_gradients_in_float64(chunk):
    model = build(SMALL).double()
    model.loss_chunk_tokens = chunk
    idx, targets = tokens(SMALL), tokens(SMALL, seed=2)
    loss = model(idx, targets)
    loss.backward()
    assert loss.dtype == torch.float64 and all(p.grad.dtype == torch.float64 for p in model.parameters())
    # the float64 loss is the float64 cross-entropy of the float64 logits: no float32 step in between
    # (a float32 cast would err by about 2**-24 * ln V ~ 3e-7; float64 arithmetic by ~1e-15)
    with torch.no_grad():
        direct = F.cross_entropy(model(idx).reshape(-1, SMALL.vocab_size), targets.reshape(-1))
    assert abs(loss.item() - direct.item()) < 1e-12


@pytest.mark.parametrize("position", [11, 5, 0])
def test_causality(position):
    model = build(SMALL).eval()
    idx = tokens(SMALL)
    changed = idx.clone()
    changed[:, position] = (changed[:, position] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :position], b[:, :position], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, position:], b[:, position:], atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# QK-norm


def test_qk_norm_none_has_no_gain():
    model = build(small(qk_norm="none"))
    assert not [n for n, _ in model.named_parameters() if "q_norm" in n or "k_norm" in n]
    for block in model.blocks:
        assert isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)


@pytest.mark.parametrize(
    "variant, q_trainable, k_trainable",
    [("learned", True, True), ("frozen", False, False), ("frozen_k", True, False)],
)
def test_qk_norm_gain_shape(variant, q_trainable, k_trainable):
    cfg = small(qk_norm=variant)
    model = build(cfg)
    for block in model.blocks:
        for norm, trainable in ((block.attn.q_norm, q_trainable), (block.attn.k_norm, k_trainable)):
            assert isinstance(norm, nn.RMSNorm)
            assert norm.weight.shape == (cfg.resolved_head_dim,)  # one gamma shared by the heads of a layer
            assert norm.weight.requires_grad is trainable
            assert torch.equal(norm.weight, torch.ones(cfg.resolved_head_dim))


def test_qk_norm_output_has_unit_rms_times_gamma():
    cfg = small(qk_norm="learned")
    model = build(cfg)
    norm = model.blocks[0].attn.q_norm
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, cfg.resolved_head_dim))
    x = torch.randn(2, 5, cfg.n_heads, cfg.resolved_head_dim) * 3  # (B, T, H, D)
    y = norm(x)
    unit = x / x.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt()
    assert torch.allclose(y, unit * norm.weight, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_frozen_gain_stays_one_while_learned_moves(optimizer):
    moved = {}
    for variant in ("learned", "frozen", "frozen_k"):
        cfg = small(qk_norm=variant)
        model = build(cfg)
        opt = Optimizers(
            model, OptimConfig(name=optimizer, lr=1e-2, muon_lr=0.02), total_steps=3, device_type="cpu"
        )
        for step in range(3):
            opt.set_lr(step)
            idx = tokens(cfg, seed=step)
            model(idx, idx).backward()
            opt.step()
            opt.zero_grad()
        gains = [b.attn.q_norm.weight for b in model.blocks] + [b.attn.k_norm.weight for b in model.blocks]
        moved[variant] = [not torch.equal(g, torch.ones_like(g)) for g in gains]
        assert not torch.equal(model.blocks[0].attn.q_proj.weight, build(cfg).blocks[0].attn.q_proj.weight)
    assert all(moved["learned"])
    assert not any(moved["frozen"])  # exactly 1.0: no gradient, no weight decay, no optimizer state
    n = len(moved["frozen_k"]) // 2
    assert all(moved["frozen_k"][:n]) and not any(
        moved["frozen_k"][n:]
    )  # the queries' gains move, the keys' not


@pytest.mark.parametrize(
    ("dtype", "eps"), [(torch.float32, 2.0**-23), (torch.float64, 2.0**-52), (torch.bfloat16, 2.0**-23)]
)
def test_norm_eps_dtype_is_torchs_default(dtype, eps):
    """``norm_eps = "dtype"`` is torch.nn.RMSNorm(eps=None): eps = the machine epsilon of the type the norm computes
    in, float32's for float32 and bfloat16 inputs (torch's opmath type), float64's for float64. A near-zero vector
    (mean square 1e-12, below every eps here) then comes out as x / sqrt(1e-12 + eps), not as x / sqrt(1e-6)."""
    model = build(small(norm_eps="dtype"))
    norm = model.blocks[0].attn_norm.to(dtype)
    assert norm.eps is None and model.blocks[0].attn.q_norm.eps is None and model.norm.eps is None
    x = torch.full((1, SMALL.d_model), 1e-6, dtype=dtype)
    with torch.no_grad():
        y = norm(x).double()
    expected = x.double() / math.sqrt(1e-12 + eps)
    # a few roundings of the compute type, then one of the output's: bfloat16 keeps 8 bits (2**-8)
    torch.testing.assert_close(y, expected, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert build(small()).blocks[0].attn_norm.eps == SMALL.norm_eps  # a number stays that number


# ----------------------------------------------------------------------------------------------------
# attention: GQA, RoPE


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_projection_shapes(n_kv_heads):
    cfg = small(n_kv_heads=n_kv_heads)
    attn = build(cfg).blocks[0].attn
    D = cfg.resolved_head_dim
    assert attn.q_proj.weight.shape == (cfg.n_heads * D, cfg.d_model)
    assert attn.k_proj.weight.shape == (n_kv_heads * D, cfg.d_model)
    assert attn.v_proj.weight.shape == (n_kv_heads * D, cfg.d_model)
    assert attn.o_proj.weight.shape == (cfg.d_model, cfg.n_heads * D)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_attention_matches_explicit_computation(n_kv_heads):
    """Query head h reads key/value head h // (n_heads / n_kv_heads): the mapping the spectra code assumes."""
    cfg = small(n_kv_heads=n_kv_heads)
    attn = build(cfg).blocks[0].attn
    B, T, H, Hkv, D = 2, 7, cfg.n_heads, n_kv_heads, cfg.resolved_head_dim
    x = torch.randn(B, T, cfg.d_model)
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x).view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_norm(attn.k_proj(x).view(B, T, Hkv, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = attn.rotary(q, k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = scores.softmax(-1) @ v  # (B, H, T, D)
        expected = attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_rope_depends_only_on_the_offset():
    D, T = 16, 32
    rotary = Rotary(D, T, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    qv, kv = (
        torch.randn(D, generator=g, dtype=torch.float64),
        torch.randn(D, generator=g, dtype=torch.float64),
    )
    # the same q and k vector at every position, rotated by the position's angles
    q, k = rotary(qv.expand(1, 1, T, D), kv.expand(1, 1, T, D))  # (1, 1, T, D) each
    scores = (q[0, 0] @ k[0, 0].T).numpy()  # scores[m, n] = <R_m q, R_n k>
    for offset in (0, 1, 3, 10):
        along = [scores[m, m - offset] for m in range(offset, T)]
        assert max(along) - min(along) < 1e-5 * max(1.0, abs(along[0]))
    assert abs(scores[5, 4] - scores[5, 2]) > 1e-3  # and it does depend on the offset
    # rotations preserve norms
    assert torch.allclose(q.norm(dim=-1), qv.norm().expand(1, 1, T), atol=1e-5)


def test_rope_is_rotate_half_layout():
    D = 8
    rotary = Rotary(D, 4, theta=10000.0)
    e0 = torch.zeros(1, 1, 4, D)
    e0[..., 0] = 1.0
    q, _ = rotary(e0, e0)
    # coordinate 0 pairs with D/2 and turns by 1 radian per position at the highest frequency
    t = torch.arange(4, dtype=torch.float32)
    assert torch.allclose(q[0, 0, :, 0], torch.cos(t), atol=1e-6)
    assert torch.allclose(q[0, 0, :, D // 2], torch.sin(t), atol=1e-6)
    others = [j for j in range(D) if j not in (0, D // 2)]
    assert torch.equal(q[0, 0, :, others], torch.zeros(4, len(others)))
    assert torch.equal(q[0, 0, 0], e0[0, 0, 0])  # position 0 is not rotated


def test_rope_interleaved_layout_turns_adjacent_pairs():
    """torchtune's layout: coordinate 2i turns with 2i + 1 at the frequency of pair i."""
    D = 8
    rotary = Rotary(D, 4, theta=10000.0, layout="interleaved")
    t = torch.arange(4, dtype=torch.float32)
    for i in range(D // 2):
        e = torch.zeros(1, 1, 4, D)
        e[..., 2 * i] = 1.0
        q, _ = rotary(e, e)
        angle = t * 10000.0 ** (-2 * i / D)
        assert torch.allclose(q[0, 0, :, 2 * i], torch.cos(angle), atol=1e-6)
        assert torch.allclose(q[0, 0, :, 2 * i + 1], torch.sin(angle), atol=1e-6)
        others = [j for j in range(D) if j not in (2 * i, 2 * i + 1)]
        assert torch.equal(q[0, 0, :, others], torch.zeros(4, len(others)))
    assert rope_pairs(D, "interleaved") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert rope_pairs(D, "half") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    with pytest.raises(ValueError, match="unknown RoPE layout 'adjacent'"):
        Rotary(D, 4, theta=10000.0, layout="adjacent")


def test_the_two_rope_layouts_are_one_rotation_up_to_a_permutation():
    """Interleaved(x) = P^T half(P x) for the permutation P that sends coordinate 2i to i and 2i + 1 to i + D/2
    (the same pairs, the same frequencies); float64 inputs, so only rounding of the float32 tables differs."""
    D, T = 8, 6
    perm = [
        c for pair in rope_pairs(D, "half") for c in pair
    ]  # interleaved slot j holds half-layout coordinate
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    half, inter = Rotary(D, T, 10000.0, "half").double(), Rotary(D, T, 10000.0, "interleaved").double()
    y_inter, _ = inter(x[..., perm], x[..., perm])
    y_half, _ = half(x, x)
    torch.testing.assert_close(y_inter, y_half[..., perm], rtol=0, atol=1e-15)


def test_a_model_with_one_layout_is_the_other_with_permuted_head_coordinates():
    """Permuting the rows of every head of W_q and W_k (and the QK-norm gains) maps a ``half`` model onto an
    ``interleaved`` one with the same logits: the layout only relabels coordinates when training from scratch."""
    cfg = small(qk_norm="learned")
    model = build(cfg)
    D, perm = cfg.resolved_head_dim, [c for pair in rope_pairs(cfg.resolved_head_dim, "half") for c in pair]
    other = LLM(dataclasses.replace(cfg, rope_layout="interleaved"))
    state = model.state_dict()
    for i, block in enumerate(model.blocks):
        for name, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
            rows = [h * D + c for h in range(heads) for c in perm]
            state[f"blocks.{i}.attn.{name}.weight"] = block.attn.get_parameter(f"{name}.weight")[rows]
        with torch.no_grad():  # a learned gain must move with its coordinates
            for norm in ("q_norm", "k_norm"):
                state[f"blocks.{i}.attn.{norm}.weight"] = torch.linspace(0.5, 1.5, D)[perm]
                block.attn.get_submodule(norm).weight.copy_(torch.linspace(0.5, 1.5, D))
    other.load_state_dict(state)
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(other(idx), model(idx), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# MLP and embeddings


def test_mlp_kinds():
    relu2 = build(small(mlp="relu2")).blocks[0].mlp
    swiglu = build(small(mlp="swiglu")).blocks[0].mlp
    assert relu2.gate is None and isinstance(swiglu.gate, nn.Linear)
    assert swiglu.gate.weight.shape == swiglu.up.weight.shape == (SMALL.d_ff, SMALL.d_model)
    assert swiglu.down.weight.shape == (SMALL.d_model, SMALL.d_ff)
    x = torch.randn(3, SMALL.d_model)
    with torch.no_grad():
        assert torch.allclose(relu2(x), relu2.down(torch.relu(relu2.up(x)) ** 2), atol=1e-6)
        silu = swiglu.gate(x) * torch.sigmoid(swiglu.gate(x))
        assert torch.allclose(swiglu(x), swiglu.down(silu * swiglu.up(x)), atol=1e-6)


def test_tied_embeddings():
    model = build(small(tie_embeddings=True))
    assert model.lm_head is None
    assert not [n for n, _ in model.named_parameters() if "lm_head" in n]
    idx = tokens(SMALL)
    with torch.no_grad():
        h = model.embed(idx)
        for block in model.blocks:
            h = block(h)
        assert torch.allclose(model(idx), model.norm(h) @ model.embed.weight.T, atol=1e-5)
    # the embedding gets gradient from the output layer too, also for tokens never in the input
    unused = sorted(set(range(SMALL.vocab_size)) - set(idx.flatten().tolist()))
    model(idx, idx).backward()
    assert unused and model.embed.weight.grad[unused].abs().sum() > 0

    untied = build(small(tie_embeddings=False))
    assert isinstance(untied.lm_head, nn.Linear)
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - model.num_params() == SMALL.vocab_size * SMALL.d_model


def test_embed_scale_multiplies_the_input_embedding_only():
    cfg = small(embed_scale="sqrt_d_model", tie_embeddings=True)
    model, plain = build(cfg), build(small(tie_embeddings=True))
    assert torch.equal(model.embed.weight, plain.embed.weight)
    idx = tokens(cfg)
    with torch.no_grad():
        h = model.embed(idx) * math.sqrt(cfg.d_model)
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(model(idx), model.norm(h) @ model.embed.weight.T)  # the head: unscaled
        assert (model(idx) - plain(idx)).abs().max() > 1e-3


def test_unscaled_init_draws_every_matrix_at_init_std():
    model = build(small(n_layers=8, init_std=0.02, init_scheme="unscaled"))
    # n >= 1024 draws per matrix: its std errs by at most 2.2% of 0.02 at one sd; 25% is over 11 sd
    for name in ("attn.o_proj.weight", "mlp.down.weight", "attn.q_proj.weight"):
        assert abs(model.blocks[0].get_parameter(name).std().item() - 0.02) < 0.25 * 0.02


def test_residual_write_init_is_scaled():
    cfg = small(n_layers=8, init_std=0.02)
    model = build(cfg)
    block = model.blocks[0]
    expected = 0.02 / math.sqrt(2 * cfg.n_layers)
    # the std of n >= 1024 normal draws errs by 1 / sqrt(2n) <= 2.2% of it: 25% is over 11 sd
    assert abs(block.attn.o_proj.weight.std().item() - expected) < 0.25 * expected
    assert abs(block.attn.q_proj.weight.std().item() - 0.02) < 0.25 * 0.02


# ----------------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_by_hand():
    cfg = load_config("tiny").model  # V 4096, d 128, L 4, H 4, Hkv 2, D 32, d_ff 512, relu2
    attn = 128 * 32 * 4 + 128 * 32 * 2 + 128 * 32 * 2 + 128 * 32 * 4  # q, k, v, o = 49,152
    mlp = 128 * 512 * 2  # up, down = 131,072
    n = 4 * (attn + mlp) + 128 * 4096  # + LM head (tied, but its matmul is still done) = 1,245,184
    assert n == 1_245_184
    assert count_flops_per_token(cfg, 128) == 6 * n + 12 * 4 * 4 * 32 * 128 == 8_257_536
    # the attention term grows with the sequence; the weight term does not
    assert count_flops_per_token(cfg, 256) - count_flops_per_token(cfg, 128) == 12 * 4 * 4 * 32 * 128


def test_flops_per_token_swiglu_and_paper():
    cfg = small(mlp="swiglu", tie_embeddings=False)
    D = 8
    n = 2 * (32 * D * (2 * 4 + 2 * 2) + 32 * 64 * 3) + 32 * 64
    assert count_flops_per_token(cfg, 16) == 6 * n + 12 * 2 * 4 * D * 16
    paper = load_config("paper-88m").model
    # matmul weights are every parameter except the 22*(2*512 + 2*64) + 512 gains
    n_paper = 88_630_528 - (22 * (2 * 512 + 2 * 64) + 512)
    assert count_flops_per_token(paper, 2048) == 6 * n_paper + 12 * 22 * 8 * 64 * 2048
