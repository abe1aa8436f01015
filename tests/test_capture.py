"""Capture of queries and keys at every read-out site, checked against the model's own arithmetic."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import perturbed_llm, tiny_model_config

from spectra.cube import SITES
from spectra.errors import SpectraError
from spectra.extract.capture import LayerQK, capture_qk
from trainer.model import LLM, Rotary

B, T = 2, 12


def perturbed_model(qk_norm: str = "learned", seed: int = 0) -> LLM:
    return perturbed_llm(tiny_model_config(qk_norm), seed).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def record(module: torch.nn.Module, model: LLM, ids: torch.Tensor, with_input: bool = False):
    """Our own forward hook: the module's (input, output) of one plain forward pass."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen


@pytest.mark.parametrize(
    ("qk_norm", "sites"), [("learned", SITES), ("frozen", SITES), ("none", ("proj", "normed", "rope"))]
)
def test_shapes_sites_and_gqa(qk_norm, sites):
    out = capture_qk(perturbed_model(qk_norm), batch(), drop_first=2)
    assert list(out) == [0, 1]
    for layer, lq in out.items():
        assert isinstance(lq, LayerQK) and lq.layer == layer and lq.sites == sites
        for site in sites:
            assert lq.q[site].shape == (4, B * (T - 2), 8)  # (H, N, D)
            assert lq.k[site].shape == (2, B * (T - 2), 8)  # (Hkv, N, D): keys keep their KV heads
            assert lq.q[site].dtype == lq.k[site].dtype == torch.float32


def test_proj_is_the_projection_split_into_heads_in_token_order():
    model, ids = perturbed_model(), batch()
    out = capture_qk(model, ids, drop_first=3)
    seen = record(model.blocks[1].attn.k_proj, model, ids)
    k = seen["out"].view(B, T, 2, 8)  # (B, T, Hkv, D)
    for h in range(2):
        for b in range(B):
            for t in range(3, T):
                n = b * (T - 3) + (t - 3)
                assert torch.equal(out[1].k["proj"][h, n], k[b, t, h])


def test_unit_and_normed_follow_rmsnorm():
    model, ids = perturbed_model("learned"), batch()
    lq = capture_qk(model, ids)[0]
    norm = model.blocks[0].attn.k_norm
    # unit = x / sqrt(mean(x^2) + eps), computed here in float64 from the raw projection
    # (float32 rms_norm over D = 8: the mean square errs by at most 8 u, its rsqrt by half that plus a rounding,
    # the product by one more: 7 u = 4.2e-7 relative, u = 2**-24)
    x = lq.k["proj"].double()
    ms = x.square().mean(-1, keepdim=True)
    expected = x * torch.rsqrt(ms + norm.eps)
    torch.testing.assert_close(lq.k["unit"].double(), expected, rtol=1e-6, atol=1e-7)
    # so the RMS is 1 up to the epsilon, sqrt(ms / (ms + eps)) exactly (an epsilon of 1e-5 would be 180 times off)
    rms = lq.k["unit"].double().square().mean(-1).sqrt()
    torch.testing.assert_close(rms, (ms / (ms + norm.eps)).sqrt().squeeze(-1), rtol=1e-6, atol=0)
    # normed is the norm's own output: unit times the learned gain
    torch.testing.assert_close(lq.k["normed"], lq.k["unit"] * norm.weight, rtol=1e-6, atol=1e-6)
    seen = record(norm, model, ids)
    torch.testing.assert_close(
        lq.k["normed"], seen["out"].permute(2, 0, 1, 3).reshape(2, B * T, 8), rtol=0, atol=0
    )
    assert not torch.allclose(lq.k["normed"], lq.k["unit"], rtol=1e-3)


def test_a_bfloat16_model_is_captured_at_its_qk_norms_float32_precision():
    model, ids = perturbed_model("learned").to(torch.bfloat16), batch()
    lq = capture_qk(model, ids)[0]
    norm = model.blocks[0].attn.k_norm
    assert (
        lq.k["proj"].dtype == torch.bfloat16 and lq.k["unit"].dtype == lq.k["normed"].dtype == torch.float32
    )
    # QKNorm widens the bfloat16 projection exactly and normalises in float32: the bound of the float32 test above
    x = lq.k["proj"].double()
    expected = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(lq.k["unit"].double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lq.k["normed"], lq.k["unit"] * norm.weight.float(), rtol=1e-6, atol=1e-6)


def test_frozen_unit_equals_normed_exactly_and_none_normed_equals_proj():
    frozen = capture_qk(perturbed_model("frozen"), batch())
    for lq in frozen.values():
        assert torch.equal(lq.q["unit"], lq.q["normed"]) and torch.equal(lq.k["unit"], lq.k["normed"])
    none = capture_qk(perturbed_model("none"), batch())
    for lq in none.values():
        assert torch.equal(lq.q["normed"], lq.q["proj"]) and torch.equal(lq.k["normed"], lq.k["proj"])


def test_rope_rotates_normed_by_the_original_positions():
    model, ids = perturbed_model(), batch()
    d = 5
    lq = capture_qk(model, ids, drop_first=d)[1]
    cfg = model.cfg
    rot = Rotary(8, cfg.context_length, cfg.rope_theta)
    normed = lq.q["normed"].view(4, B, T - d, 8)  # (H, B, T', D)
    # positions d .. T-1: dropping happens after the rotation, never by re-indexing positions
    expected = Rotary.rotate(normed, rot.cos[d:T], rot.sin[d:T]).reshape(4, -1, 8)
    torch.testing.assert_close(lq.q["rope"], expected, rtol=1e-6, atol=1e-6)
    # a rotation keeps each vector's length, but not the vectors
    torch.testing.assert_close(lq.q["rope"].norm(dim=-1), lq.q["normed"].norm(dim=-1))
    assert not torch.allclose(lq.q["rope"], lq.q["normed"], atol=1e-3)


def test_drop_first_drops_the_leading_positions():
    model, ids = perturbed_model(), batch()
    full = capture_qk(model, ids)[0]
    dropped = capture_qk(model, ids, drop_first=4)[0]
    for site in SITES:
        expected = full.k[site].view(2, B, T, 8)[:, :, 4:].reshape(2, -1, 8)
        torch.testing.assert_close(dropped.k[site], expected, rtol=0, atol=0)


def test_reduce_layers_and_early_stop():
    model, ids = perturbed_model(), batch()
    final_norm = []
    handle = model.norm.register_forward_hook(lambda *a: final_norm.append(1))
    calls = []

    def reduce(lq: LayerQK) -> float:
        calls.append(lq.layer)
        return float(lq.k["rope"].square().sum())

    out = capture_qk(model, ids, layers=[0], reduce=reduce)
    assert calls == [0] and list(out) == [0] and isinstance(out[0], float)
    assert final_norm == []  # the pass stopped after layer 0's read-out
    capture_qk(model, ids, reduce=reduce)
    assert calls == [0, 0, 1] and final_norm == []  # also after the last layer: no LM head
    handle.remove()
    # the hooks are gone afterwards, also when reduce fails
    with pytest.raises(ZeroDivisionError):
        capture_qk(model, ids, reduce=lambda lq: 1 / 0)
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_batches_and_arguments():
    model = perturbed_model()
    cases = [
        (dict(input_ids=batch(), drop_first=T), "drop_first must be in"),
        (dict(input_ids=torch.full((1, 4), 64), drop_first=0), "outside the vocabulary"),
        (
            dict(input_ids=torch.zeros(1, 65, dtype=torch.int64), drop_first=0),
            "exceeds the model's context_length",
        ),
        (dict(input_ids=torch.zeros(4), drop_first=0), "2-D integer tensor"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SpectraError, match=message):
            capture_qk(model, kwargs["input_ids"], drop_first=kwargs["drop_first"])
    with pytest.raises(SpectraError, match="layers must be"):
        capture_qk(model, batch(), layers=[2])


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_site_follows_the_models_layout(layout):
    # written out here from the definition, in float64: pair i turns by angle t * theta^(-2i/D); in the
    # half layout pair i is the coordinates (i, i + D/2), in the interleaved one (2i, 2i + 1)
    model = perturbed_llm(replace(tiny_model_config("learned"), rope_layout=layout), 0).eval()
    d = 3
    lq = capture_qk(model, batch(), drop_first=d)[0]
    D, theta = 8, model.cfg.rope_theta
    pairs = (
        [(i, i + D // 2) for i in range(D // 2)]
        if layout == "half"
        else [(2 * i, 2 * i + 1) for i in range(D // 2)]
    )
    normed = lq.k["normed"].double().view(2, B, T - d, D).numpy()  # (Hkv, B, T', D)
    pos = np.arange(d, T)[None, :, None]  # positions d .. T-1
    expected = normed.copy()
    for i, (a, b) in enumerate(pairs):
        angle = pos[..., 0] * theta ** (-2.0 * i / D)  # (1, T')
        c, s = np.cos(angle), np.sin(angle)
        expected[..., a] = normed[..., a] * c - normed[..., b] * s
        expected[..., b] = normed[..., a] * s + normed[..., b] * c
    # entries |x| <= sqrt(D) max|gamma| (about 4); float32 tables (rounded from float64 angles), two products
    # and a sum: within 4 u |x| = 1e-6 of the float64 rotation, so atol 1e-5; the other layout is O(1) off
    np.testing.assert_allclose(lq.k["rope"].view(2, B, T - d, D).numpy(), expected, atol=1e-5)
