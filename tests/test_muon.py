"""Batched Muon (trainer.muon) against torch.optim.Muon, its coefficient sets, and its compiled path."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from trainer.config import load_config
from trainer.model import LLM
from trainer.muon import (
    POLAR_EXPRESS,
    QUINTIC,
    BatchedMuon,
    adjusted_lr,
    newton_schulz_schedule,
    orthogonalize,
    shape_groups,
)
from trainer.optim import Optimizers, clip_grad_norm

pytestmark = pytest.mark.usefixtures("one_thread")

# Shapes with repeats (batched together), a tall and a wide one (transposed or not), as in a model.
SHAPES = [(32, 32), (16, 32), (32, 32), (64, 32), (32, 64), (16, 32), (64, 32)]


def twin_parameters(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in SHAPES]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def step_both(ref: list, new: list, opt_ref, opt_new, seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    for p, q in zip(ref, new):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
    opt_ref.step()
    opt_new.step()


# ----------------------------------------------------------------------------------------------------
# the same maths as torch.optim.Muon


@pytest.mark.parametrize(
    "hyper",
    [
        {},
        {"nesterov": False},
        {"weight_decay": 0.1},
        {"adjust_lr_fn": "match_rms_adamw"},
        {"ns_steps": 3, "momentum": 0.8},
    ],
    ids=["defaults", "no-nesterov", "weight-decay", "match-rms", "3-steps"],
)
def test_updates_equal_torch_muon_on_mixed_shapes(hyper):
    hyper = {"lr": 0.02, "weight_decay": 0.0, "adjust_lr_fn": "original", **hyper}
    ref, new = twin_parameters()
    opt_ref, opt_new = torch.optim.Muon(ref, **hyper), BatchedMuon(new, **hyper)
    for s in range(4):
        step_both(ref, new, opt_ref, opt_new, s)
    for p, q in zip(ref, new):
        # one flipped bfloat16 rounding in the orthogonalised update moves a weight by ~ lr * 2**-8
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4)
        torch.testing.assert_close(
            opt_new.state[q]["momentum_buffer"], opt_ref.state[p]["momentum_buffer"], rtol=0, atol=1e-6
        )


def test_a_different_hyperparameter_is_detected():
    """The tolerance above is far below what a wrong rule would give: the test can fail."""
    ref, new = twin_parameters()
    opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    opt_new = BatchedMuon(new, lr=0.02, weight_decay=0.0, nesterov=False, adjust_lr_fn="original")
    for s in range(4):
        step_both(ref, new, opt_ref, opt_new, s)
    assert max((p - q).abs().max().item() for p, q in zip(ref, new)) > 1e-3


def test_batched_muon_follows_torch_muon_on_the_tiny_model():
    """Five training steps of the `tiny` preset with each implementation: the same weights to bf16 precision."""
    cfg = load_config("tiny", ["model.vocab_size=256", "optim.muon_weight_decay=0.01"])
    models, opts = [], []
    for impl in ("torch", "batched"):
        torch.manual_seed(0)
        model = LLM(cfg.model)
        models.append(model)
        opts.append(Optimizers(model, dataclasses.replace(cfg.optim, muon_impl=impl), 5, "cpu"))
    assert [type(o.optimizers[0]).__name__ for o in opts] == ["Muon", "BatchedMuon"]
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        ids = torch.randint(0, 256, (2, 65), generator=g)
        for model, opt in zip(models, opts):
            opt.set_lr(step)
            model(ids[:, :-1], ids[:, 1:]).backward()
            clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_orthogonalize_one_matrix_is_torch_muons_newton_schulz():
    from torch.optim._muon import _zeropower_via_newtonschulz  # the reference, private in torch 2.13

    g = torch.randn(48, 24, generator=torch.Generator().manual_seed(3))
    ours = orthogonalize(g, newton_schulz_schedule("quintic", 5))
    torch.testing.assert_close(
        ours, _zeropower_via_newtonschulz(g, QUINTIC, 5, 1e-7).float(), rtol=0, atol=1e-2
    )


def test_stacking_does_not_change_the_result():
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(4))
    schedule = newton_schulz_schedule("quintic", 5)
    stacked = orthogonalize(g, schedule)
    for i in range(5):
        torch.testing.assert_close(stacked[i], orthogonalize(g[i], schedule), rtol=0, atol=1e-2)


def test_adjusted_lr_is_torchs():
    from torch.optim._muon import _adjust_lr

    for shape in [(2048, 512), (512, 2048), (256, 512), (512, 512)]:
        for fn in ("original", "match_rms_adamw"):
            assert adjusted_lr(0.024, shape, fn) == pytest.approx(_adjust_lr(0.024, fn, torch.Size(shape)))


def test_shape_groups_and_parameters_without_gradient():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    assert shape_groups(params) == [[0, 2], [1, 5], [3, 6], [4]]
    opt = BatchedMuon(params, lr=0.02)
    before = params[1].detach().clone()
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.randn(p.shape)
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    assert all("momentum_buffer" in opt.state[p] for i, p in enumerate(params) if i != 1)


def test_rejects_what_torch_muon_rejects():
    with pytest.raises(ValueError, match="2-D"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3, 3))], adjust_lr_fn="other")
    with pytest.raises(ValueError, match="5 steps"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3, 3))], coefficients="polar_express", ns_steps=4)


# ----------------------------------------------------------------------------------------------------
# Polar Express: the numbers against the paper's construction, and what the set changes


def _best_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """Minimax ``a x + b x^3 + c x^5`` for the constant 1 on [lo, hi]: the Remez exchange on four points."""
    if lo / hi >= 1 - 5e-6:  # the interval has shrunk to a point: the limit of the equioscillating polynomial
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + 1) / 4, (lo + 3) / 4  # interior extrema, exact as lo -> hi
    err, previous = math.inf, None
    while previous is None or abs(previous - err) > 1e-15:
        previous = err
        rows = [[x, x**3, x**5, s] for x, s in ((lo, 1), (q, -1), (r, 1), (hi, -1))]
        a, b, c, err = np.linalg.solve(np.array(rows), np.ones(4))
        root = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - root) / (10 * c)), math.sqrt((-3 * b + root) / (10 * c))
    return float(a), float(b), float(c)


def polar_express_composition(lo: float, steps: int, safety: float, cushion: float) -> list[tuple]:
    """Amsel et al. (2025), arXiv:2505.16932: the greedy composition of minimax quintics on [lo, 1], each
    fitted on [max(lo, cushion * hi), hi] and recentred, all but the last divided by (1 + safety)^(1, 3, 5)."""
    hi, out = 1.0, []
    for i in range(steps):
        a, b, c = _best_odd_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:  # recentre so that the images of lo and hi are symmetric about 1
            scale = 2 / (a * lo + b * lo**3 + c * lo**5 + a * hi + b * hi**3 + c * hi**5)
            a, b, c = a * scale, b * scale, c * scale
        if i < steps - 1:
            f = 1 + safety
            a, b, c = a / f, b / f**3, c / f**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return out


def test_polar_express_coefficients_are_the_papers_construction():
    """The shipped set (modded-nanogpt's) is the paper's composition for [1e-3, 1], safety 2e-2, cushion 0.02."""
    derived = polar_express_composition(lo=1e-3, steps=5, safety=2e-2, cushion=0.02)
    np.testing.assert_allclose(np.array(POLAR_EXPRESS), np.array(derived), rtol=1e-12)
    # and another safety factor gives other numbers: the check is not vacuous
    other = polar_express_composition(lo=1e-3, steps=5, safety=1e-2, cushion=0.02)
    assert not np.allclose(np.array(POLAR_EXPRESS), np.array(other), rtol=1e-6)


def test_polar_express_orthogonalizes_an_ill_conditioned_update_more_tightly():
    """Singular values over three decades: Polar Express maps them all near 1, the quintic leaves a spread.
    The coefficient set changes the optimizer, which is why it is an option recorded with the run."""
    g = torch.Generator().manual_seed(5)
    u, v = (
        torch.linalg.qr(torch.randn(64, 8, generator=g))[0],
        torch.linalg.qr(torch.randn(32, 8, generator=g))[0],
    )
    update = (u * torch.logspace(0, -3, 8)) @ v.T  # (64, 32) of rank 8, condition number 1000
    sv = {
        name: torch.linalg.svdvals(orthogonalize(update, newton_schulz_schedule(name, 5)).double())[:8]
        for name in ("quintic", "polar_express")
    }
    assert 0.75 < sv["polar_express"].min() and sv["polar_express"].max() < 1.2
    assert sv["quintic"].min() < 0.6


# ----------------------------------------------------------------------------------------------------
# the compiled path (what CUDA runs)


@pytest.mark.slow
def test_compiled_orthogonalize_equals_eager():
    """torch.compile of the batched Newton-Schulz (inductor on the CPU, about 20 s) gives the eager result."""
    torch._dynamo.reset()
    g = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(orthogonalize, dynamic=False, fullgraph=True)
    for name in ("quintic", "polar_express"):
        schedule = newton_schulz_schedule(name, 5)
        torch.testing.assert_close(compiled(g, schedule), orthogonalize(g, schedule), rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_batched_muon_on_cuda_follows_torch_muon():
    ref, new = twin_parameters()
    ref = [torch.nn.Parameter(p.detach().cuda()) for p in ref]
    new = [torch.nn.Parameter(p.detach().cuda()) for p in new]
    opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.01, adjust_lr_fn="original")
    opt_new = BatchedMuon(new, lr=0.02, weight_decay=0.01, adjust_lr_fn="original", compile=True)
    for s in range(4):
        g = torch.Generator().manual_seed(1000 + s)
        for p, q in zip(ref, new):
            grad = torch.randn(p.shape, generator=g).cuda()
            p.grad, q.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt_new.step()
    for p, q in zip(ref, new):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-4)


def newton_schulz_float64_reference(u: np.ndarray, steps: int) -> np.ndarray:
    """The quintic iteration written out in numpy float64: X0 = U / ||U||_F, X <- aX + (bA + cA^2)X, A = XX^T."""
    a, b, c = QUINTIC
    x = u / max(np.linalg.norm(u), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_orthogonalize_in_float64_is_the_iteration_to_float64_rounding(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = orthogonalize(g, newton_schulz_schedule("quintic", 5), dtype=torch.float64)
    want = newton_schulz_float64_reference(g.numpy() if shape[0] <= shape[1] else g.numpy().T, 5)
    want = want if shape[0] <= shape[1] else want.T
    # 5 steps of matmuls of width <= 10 on entries below 2 in size: rounding of order 1e-14; a bf16 pass is ~1e-3
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert got.dtype == torch.float64
    in_bf16 = orthogonalize(g, newton_schulz_schedule("quintic", 5))
    assert (in_bf16 - got).abs().max() > 1e-4  # the default really is bfloat16, and the test could tell


def test_batched_muon_ns_dtype_is_a_group_setting_checked_on_construction():
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = BatchedMuon([w], lr=0.02, ns_dtype="float64")
    assert opt.param_groups[0]["ns_dtype"] == "float64"
    with pytest.raises(ValueError, match="unknown ns_dtype 'float16'"):
        BatchedMuon([w], lr=0.02, ns_dtype="float16")
