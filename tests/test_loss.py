"""The chunked LM head + cross-entropy (trainer.model.linear_cross_entropy) against the plain loss: values and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_config

from trainer.model import LLM, linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(
    n: int = 37, c: int = 16, v: int = 50, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g, dtype=dtype),
        torch.randn(v, c, generator=g, dtype=dtype) * 0.5,
        torch.randint(0, v, (n,), generator=g),
    )


def loss_and_grads(x, w, t, chunk: int, bf16: bool, scale: float = 1.0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = linear_cross_entropy(x, w, t, chunk)
    (loss * scale).backward()  # a scaled upstream gradient, as grad accumulation divides the loss
    return loss.detach(), x.grad, w.grad


def test_chunk_zero_is_the_plain_loss():
    x, w, t = inputs()
    assert torch.equal(linear_cross_entropy(x, w, t, 0), F.cross_entropy(F.linear(x, w).float(), t))


# Chunked and plain compute the same sums in other orders (per chunk, then over chunks; the softmax as exp(z - lse)
# against torch's kernel), each over at most V = 50 classes or N = 37 rows, and a sum of n terms errs by at most
# n * u of the summed magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 4.2). float64, where
# equality is the point: 50 * 2**-53 = 6e-15 of magnitudes below about 10 (the loss, |x| |W| sums): 1e-12. float32:
# 50 * 2**-24 = 3e-6 of the same magnitudes, which for these inputs lie within about 3 times each result: rtol 1e-5,
# and atol 1e-6 for entries near 0. A dropped or doubled ragged chunk, or a gradient not scaled by the upstream 0.25,
# moves entries by a quarter or more of their size.
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [(torch.float64, 0, 1e-12), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])  # ragged last chunk, one chunk, more than the rows
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk, dtype, rtol, atol):
    x, w, t = inputs(dtype=dtype)
    ref = loss_and_grads(x, w, t, 0, bf16=False, scale=0.25)
    got = loss_and_grads(x, w, t, chunk, bf16=False, scale=0.25)
    assert got[0].dtype == dtype
    for a, b, what in zip(got, ref, ("loss", "dx", "dW")):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, what=what: f"{what}: {m}")


def bf16_gradient_bounds(
    x: torch.Tensor, w: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the chunked and the plain bf16 gradients may differ, entry by entry: ``(dx bound, dW bound)``.

    Both take the same bf16 logits (a matmul's row depends on that row only) and the same bf16 dloss/dz = (softmax
    - onehot) / N. dW: the plain path rounds one bf16 product dz^T x, the chunked one the product of each chunk
    before summing them in float32; each rounding errs by at most u = 2**-8 of its entry, and every entry is at
    most |dz|^T |x| in size, so the two differ by at most 2 u |dz|^T |x| (float32 sums: far below). dx: row by row
    the same products, so at most a rounding apart each: 2 u |dz| |W|. The magnitudes here are from float64
    logits; the bf16 logits err by u |z| < 0.03, which moves softmax values by under 6%: a factor 1.1 covers it.
    """
    u = 2**-8
    z = x.double() @ w.double().T  # (N, V)
    dz = torch.softmax(z, dim=-1)
    dz[torch.arange(len(t)), t] -= 1.0
    dz = dz.abs() / len(t)
    return 2 * u * 1.1 * (dz @ w.double().abs()), 2 * u * 1.1 * (dz.T @ x.double().abs())


def test_chunked_loss_under_bf16_autocast_is_the_plain_loss_to_bf16_precision():
    x, w, t = inputs()
    ref = loss_and_grads(x, w, t, 0, bf16=True)
    got = loss_and_grads(x, w, t, 8, bf16=True)
    # the same bf16 logits, float32 sums in another order: N = 37 rows of magnitude below 8 (see above)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b, bound, what in zip(got[1:], ref[1:], bf16_gradient_bounds(x, w, t), ("dx", "dW")):
        assert a.dtype == b.dtype == torch.float32
        excess = ((a - b).abs().double() - bound).max().item()
        assert excess <= 0, f"{what}: {excess} above the bound"
    # and bf16 really is in play: it moves dx by far more than float32 could
    assert (loss_and_grads(x, w, t, 8, bf16=False)[1] - got[1]).abs().max() > 1e-5


def test_without_gradients_only_the_loss_is_computed():
    x, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), w, t, 4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x.detach() @ w.T, t), rtol=1e-6, atol=1e-6)


def test_a_frozen_weight_gets_no_gradient():
    x, w, t = inputs()
    x.requires_grad_()
    linear_cross_entropy(x, w, t, 4).backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("tied", [True, False])
def test_the_model_loss_with_chunks_equals_the_plain_model_loss(tied):
    """``LLM(cfg, loss_chunk_tokens=N)``: the same loss and parameter gradients, tied head or not."""
    cfg = dataclasses.replace(tiny_model_config(), tie_embeddings=tied)
    ids = torch.randint(0, cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 16):
        torch.manual_seed(0)
        model = LLM(cfg, loss_chunk_tokens=chunk)
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert model(ids[:, :-1]).shape == (3, 20, cfg.vocab_size)  # logits without targets, as before
    (plain, g0), (chunked, g1) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(
            g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_model_and_chunked_loss_compile_into_one_graph():
    """fullgraph=True: the autograd.Function and its chunk loop trace without a graph break (aot_eager keeps
    the test fast; inductor compiles the same graph)."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = LLM(cfg, loss_chunk_tokens=16)
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids[:, :-1], ids[:, 1:])
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_negative_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        LLM(tiny_model_config(), loss_chunk_tokens=-1)
