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
    n: int = 37, c: int = 16, v: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, c, generator=g),
        torch.randn(v, c, generator=g) * 0.5,
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


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])  # ragged last chunk, one chunk, more than the rows
def test_chunked_loss_and_gradients_equal_the_plain_ones_in_float32(chunk):
    x, w, t = inputs()
    ref = loss_and_grads(x, w, t, 0, bf16=False, scale=0.25)
    got = loss_and_grads(x, w, t, chunk, bf16=False, scale=0.25)
    assert got[0].dtype == torch.float32
    for a, b, what in zip(got, ref, ("loss", "dx", "dW")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")


def test_chunked_loss_under_bf16_autocast_is_the_plain_loss_to_bf16_precision():
    x, w, t = inputs()
    ref = loss_and_grads(x, w, t, 0, bf16=True)
    got = loss_and_grads(x, w, t, 8, bf16=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # the same bf16 logits, float32 sums
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=2**-8 * b.abs().max().item())
    # and bf16 really is in play (the tolerance above is not looser than the effect)
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
