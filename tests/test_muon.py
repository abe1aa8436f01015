"""Batched Muon (trainer.muon) against torch.optim.Muon, its coefficient sets, and its compiled path."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.optim._muon as torch_muon_module
from helpers import bf16_newton_schulz_difference
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz  # private in torch 2.13

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

# The float64 comparisons below, and why they hold to 1e-12 (1e-10 for a model) while a bug breaks them by far
# more. Two implementations of the same arithmetic in float64 differ only in the order of their roundings (a
# batched matmul, a foreach update): 2**-53 = 1.1e-16 of each result, over a few dozen operations, carried by the
# Newton-Schulz steps with a slope of at most 3.4445**5 = 486 (at a singular value near 0): below 1e-12 on
# entries of at most 1.2, and a weight moves by lr * sqrt(max(1, A/B)) < 0.03 times that per step. A wrong rule
# moves weights by more than 1e-3 (test_a_different_hyperparameter_is_detected). torch.optim.Muon hard-codes
# bfloat16, so the `torch_muon_in_float64` fixture evaluates torch's own Newton-Schulz code in float64.


class _KeepsFloat64(torch.Tensor):
    """A tensor whose ``.bfloat16()`` is a float64 copy. torch's Newton-Schulz casts its input with ``.bfloat16()``
    (a copy, which it then divides in place) and computes in the dtype it got, so handed one of these it runs in
    float64."""

    def bfloat16(self, *args, **kwargs):
        return self.to(torch.float64, copy=True)


def torch_newton_schulz_in_float64(grad: torch.Tensor, *args) -> torch.Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz(grad, *args)``, its own code, evaluated in float64."""
    return torch_newton_schulz(grad.double().as_subclass(_KeepsFloat64), *args).as_subclass(torch.Tensor)


@pytest.fixture
def torch_muon_in_float64(monkeypatch):
    """torch.optim.Muon's step with its Newton-Schulz in float64 (the step looks the function up in its module)."""
    monkeypatch.setattr(torch_muon_module, "_zeropower_via_newtonschulz", torch_newton_schulz_in_float64)


def twin_parameters(
    seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * 0.05) for s in SHAPES]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def step_both(ref: list, new: list, opt_ref, opt_new, seed: int) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    for p, q in zip(ref, new):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
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
def test_updates_equal_torch_muon_on_mixed_shapes(hyper, torch_muon_in_float64):
    """Momentum, Nesterov, weight decay, the per-shape learning rate and the grouping by shape: torch's rules,
    to float64 rounding (the note above SHAPES)."""
    hyper = {"lr": 0.02, "weight_decay": 0.0, "adjust_lr_fn": "original", **hyper}
    ref, new = twin_parameters()
    opt_ref, opt_new = torch.optim.Muon(ref, **hyper), BatchedMuon(new, **hyper, ns_dtype="float64")
    for s in range(4):
        step_both(ref, new, opt_ref, opt_new, s)
    for p, q in zip(ref, new):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
        # the same float64 lerps of the same gradients: a few roundings of buffers below 5 in size
        torch.testing.assert_close(
            opt_new.state[q]["momentum_buffer"], opt_ref.state[p]["momentum_buffer"], rtol=0, atol=1e-14
        )


def test_a_different_hyperparameter_is_detected(torch_muon_in_float64):
    """The tolerance above is far below what a wrong rule gives: the test can fail."""
    ref, new = twin_parameters()
    opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    opt_new = BatchedMuon(
        new, lr=0.02, weight_decay=0.0, nesterov=False, adjust_lr_fn="original", ns_dtype="float64"
    )
    for s in range(4):
        step_both(ref, new, opt_ref, opt_new, s)
    assert max((p - q).abs().max().item() for p, q in zip(ref, new)) > 1e-3


def test_batched_muon_follows_torch_muon_on_the_tiny_model(torch_muon_in_float64):
    """Five training steps of the `tiny` preset in float64 with each implementation: the same weights to float64
    rounding (model, loss, gradients, clipping and AdamW in float64; five smooth steps keep the 1e-15 relative
    differences of the note above SHAPES below 1e-12)."""
    cfg = load_config("tiny", ["model.vocab_size=256", "optim.muon_weight_decay=0.01"])
    models, opts = [], []
    for impl, ns_dtype in (("torch", "bfloat16"), ("batched", "float64")):  # torch's: float64 by the fixture
        torch.manual_seed(0)
        model = LLM(cfg.model).double()
        models.append(model)
        optim = dataclasses.replace(cfg.optim, muon_impl=impl, muon_ns_dtype=ns_dtype)
        opts.append(Optimizers(model, optim, 5, "cpu"))
    assert [type(o.optimizers[0]).__name__ for o in opts] == ["Muon", "BatchedMuon"]
    initial = [p.detach().clone() for p in models[0].parameters()]
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
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    assert (
        max((a - b).abs().max().item() for a, b in zip(models[0].parameters(), initial)) > 1e-3
    )  # it trained


@pytest.mark.parametrize("shape", [(48, 24), (24, 40)])
def test_orthogonalize_one_matrix_is_torch_muons_newton_schulz(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    schedule = newton_schulz_schedule("quintic", 5)
    # the same arithmetic: equal to float64 rounding (the note above SHAPES)
    torch.testing.assert_close(
        orthogonalize(g, schedule, torch.float64), torch_newton_schulz_in_float64(g, QUINTIC, 5, 1e-7),
        rtol=0, atol=1e-12,
    )  # fmt: skip
    # and in bfloat16, as Muon runs: two bfloat16 evaluations (a Gaussian input, so the premise of the bound holds);
    # one step fewer or the other coefficient set moves entries by 0.3 of the largest, about three times the bound
    ours, theirs = (
        orthogonalize(g.float(), schedule),
        torch_newton_schulz(g.float(), QUINTIC, 5, 1e-7).float(),
    )
    bound = bf16_newton_schulz_difference() * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=bound)


def test_stacking_does_not_change_the_result():
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    schedule = newton_schulz_schedule("quintic", 5)
    stacked64, stacked16 = orthogonalize(g, schedule, torch.float64), orthogonalize(g.float(), schedule)
    for i in range(5):
        # float64: the same arithmetic, so the same numbers to rounding (the note above SHAPES); a norm taken over
        # the whole stack instead of each matrix would scale the singular values by about 1/sqrt(5)
        torch.testing.assert_close(
            stacked64[i], orthogonalize(g[i], schedule, torch.float64), rtol=0, atol=1e-12
        )
        # bfloat16: a batched and a plain matmul may round differently, two evaluations of a Gaussian input
        single = orthogonalize(g[i].float(), schedule)
        bound = bf16_newton_schulz_difference() * single.abs().max().item()
        torch.testing.assert_close(stacked16[i], single, rtol=0, atol=bound)


def bf16_twins_stay_within_the_rounding_bound(device: str, compile: bool) -> None:
    """Four steps of torch.optim.Muon and BatchedMuon, both orthogonalising in bfloat16 as in production, from the
    same float32 weights and gradients.

    The momentum buffers and the weight decay are the same float32 arithmetic; only the orthogonalised updates
    differ, each by at most ``bf16_newton_schulz_difference()`` of its largest entry (Gaussian gradients: the
    premise holds). A weight therefore differs by at most that fraction of the sum over the steps of the largest
    orthogonalised move of its matrix, plus float32 rounding of the weights (two roundings a step, 2**-24 each).
    A wrong learning-rate rule (sqrt(2) for a tall matrix) moves them by 0.4 of the moves, three times the bound.
    """
    ref, new = twin_parameters(dtype=torch.float32)
    ref = [torch.nn.Parameter(p.detach().to(device)) for p in ref]
    new = [torch.nn.Parameter(p.detach().to(device)) for p in new]
    lr, wd = 0.02, 0.01
    opt_ref = torch.optim.Muon(ref, lr=lr, weight_decay=wd, adjust_lr_fn="original")
    opt_new = BatchedMuon(new, lr=lr, weight_decay=wd, adjust_lr_fn="original", compile=compile)
    moves = [0.0] * len(ref)
    for s in range(4):
        before = [p.detach().clone() for p in ref]
        step_both(ref, new, opt_ref, opt_new, s)
        for i, (p, b) in enumerate(zip(ref, before)):
            moves[i] += (p.detach() - (1 - lr * wd) * b).abs().max().item()  # lr * sqrt(max(1, A/B)) * max|O|
    for p, q, moved in zip(ref, new, moves):
        bound = bf16_newton_schulz_difference() * moved + 8 * 2**-24 * p.abs().max().item()
        torch.testing.assert_close(q, p, rtol=0, atol=bound)


def test_batched_muon_follows_torch_muon_in_bfloat16():
    """The production setting on the CPU: eager batched (baddbmm) against torch's one matrix at a time (addmm)."""
    bf16_twins_stay_within_the_rounding_bound("cpu", compile=False)


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
    update = (
        u * torch.logspace(0, -3, 8, dtype=torch.float64)
    ) @ v.double().T  # (64, 32), rank 8, condition 1000
    # in float64: the maths of the sets, not bfloat16's rounding, which a spectrum over three decades amplifies
    # (it moves these singular values by up to 0.09). The singular values are then the composed polynomials at
    # s_i / (c ||s||): 0.80 to 1.13 for Polar Express (built for [1e-3, 1]; the smallest, 9.8e-4, lies just below),
    # 0.44 to 1.08 for the quintic
    sv = {
        name: torch.linalg.svdvals(orthogonalize(update, newton_schulz_schedule(name, 5), torch.float64))[:8]
        for name in ("quintic", "polar_express")
    }
    assert 0.75 < sv["polar_express"].min() and sv["polar_express"].max() < 1.2
    assert sv["quintic"].min() < 0.6


# ----------------------------------------------------------------------------------------------------
# the compiled path (what CUDA runs)


@pytest.mark.slow
def test_compiled_orthogonalize_equals_eager():
    """torch.compile of the batched Newton-Schulz (inductor on the CPU, about 30 s) gives the eager result: the same
    arithmetic to float64 rounding for both coefficient sets (the note above SHAPES), and in bfloat16, where inductor
    fuses the elementwise work and so rounds differently, two evaluations' difference of a Gaussian input."""
    torch._dynamo.reset()
    g = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    compiled = torch.compile(orthogonalize, dynamic=False, fullgraph=True)
    for name in ("quintic", "polar_express"):
        schedule = newton_schulz_schedule(name, 5)
        torch.testing.assert_close(
            compiled(g, schedule, torch.float64),
            orthogonalize(g, schedule, torch.float64),
            rtol=0,
            atol=1e-12,
        )
    schedule = newton_schulz_schedule("quintic", 5)
    eager = orthogonalize(g.float(), schedule)
    bound = bf16_newton_schulz_difference() * eager.abs().max().item()
    torch.testing.assert_close(compiled(g.float(), schedule), eager, rtol=0, atol=bound)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_batched_muon_on_cuda_follows_torch_muon():
    bf16_twins_stay_within_the_rounding_bound("cuda", compile=True)


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


# ----------------------------------------------------------------------------------------------------
# Stacked attention projections (optim.muon_qkvo)

# Two layers' [W_q; W_k; W_v; W_o] (d_model 32, 2 query heads and 1 key/value head of 16) and an MLP pair between
# them; the stacks are positions in this list. The MLP's down matrix has the shape of W_q and W_o, so the control's
# per-parameter learning rate must tell a stacked (32, 32) from a loose one.
QKVO_SHAPES = [
    (32, 32),
    (16, 32),
    (16, 32),
    (32, 32),
    (64, 32),
    (32, 32),
    (32, 32),
    (16, 32),
    (16, 32),
    (32, 32),
]
QKVO_STACKS = [[0, 1, 2, 3], [6, 7, 8, 9]]


def qkvo_twins(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64) * 0.05) for s in QKVO_SHAPES]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def reference_muon_step(params, grads, bufs, lr, mode, schedule) -> None:
    """The update of optim.muon_qkvo written out: per-parameter Nesterov momentum, then each stack's updates
    concatenated row-wise and orthogonalised as one (fused), or each block alone (separate, separate_stacked_lr),
    stepped by sqrt(max(1, rows / cols)) of the stack (fused, separate_stacked_lr) or of the block."""
    updates = []
    for g, buf in zip(grads, bufs):
        buf.mul_(0.95).add_(g, alpha=0.05)
        updates.append(0.95 * buf + 0.05 * g)
    stacked_of = {i: s for s in QKVO_STACKS for i in s}
    new_rows = {}
    if mode == "fused":
        for s in QKVO_STACKS:
            joint = orthogonalize(torch.cat([updates[i] for i in s]), schedule, torch.float64)
            for i, block in zip(s, joint.split([params[i].shape[0] for i in s])):
                new_rows[i] = block
    with torch.no_grad():
        for i, (p, u) in enumerate(zip(params, updates)):
            o = new_rows.get(i)
            if o is None:
                o = orthogonalize(u, schedule, torch.float64)
            rows = (
                sum(params[j].shape[0] for j in stacked_of[i])
                if i in stacked_of and mode != "separate"
                else p.shape[0]
            )
            p.add_(o, alpha=-lr * math.sqrt(max(1.0, rows / p.shape[1])))


@pytest.mark.parametrize("mode", ["separate", "fused", "separate_stacked_lr"])
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express_seed"])
def test_stacked_modes_follow_their_written_out_update(mode, coefficients):
    """Three steps against :func:`reference_muon_step`, both in float64: equal to rounding (the note above SHAPES;
    the stacked matrix is 96 x 32, its Gram matrix 32 x 32 as for the blocks)."""
    ref, new = qkvo_twins()
    schedule = newton_schulz_schedule(coefficients, 5)
    opt = BatchedMuon(
        new, lr=0.02, weight_decay=0.0, adjust_lr_fn="original", coefficients=coefficients,
        ns_dtype="float64", qkvo=mode, stacks=QKVO_STACKS,
    )  # fmt: skip
    bufs = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ref]
        for q, grad in zip(new, grads):
            q.grad = grad.clone()
        opt.step()
        reference_muon_step(ref, grads, bufs, 0.02, mode, schedule)
    for p, q in zip(ref, new):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    for q, buf in zip(new, bufs):  # the momentum stays per parameter, whatever the mode
        torch.testing.assert_close(opt.state[q]["momentum_buffer"], buf, rtol=0, atol=1e-14)


def test_the_three_modes_move_the_keys_differently():
    """Fusing changes W_k's step by more than the tolerance above, and the control changes it again: the test
    above can tell the modes apart. The joint orthogonal factor has orthonormal columns, so each block's update has
    singular values at most about 1 and W_k's (16 of 96 rows) are far below 1, where alone they are near 1."""
    moved = {}
    for mode in ("separate", "fused", "separate_stacked_lr"):
        _, params = qkvo_twins()
        before = params[1].detach().clone()
        opt = BatchedMuon(params, lr=0.02, weight_decay=0.0, adjust_lr_fn="original", ns_dtype="float64",
                          qkvo=mode, stacks=QKVO_STACKS)  # fmt: skip
        g = torch.Generator().manual_seed(7)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        moved[mode] = (params[1].detach() - before) / 0.02  # W_k's update per unit learning rate
    sv = {m: torch.linalg.svdvals(u) for m, u in moved.items()}
    assert sv["separate"].min() > 0.6 and sv["fused"].max() < 0.8 * math.sqrt(3)  # quintic: S' in (0.7, 1.2)
    torch.testing.assert_close(
        moved["separate_stacked_lr"], math.sqrt(3) * moved["separate"], rtol=1e-12, atol=0
    )
    assert (moved["fused"] - moved["separate_stacked_lr"]).abs().max() > 1e-2


def test_stacks_are_checked():
    params = [torch.nn.Parameter(torch.randn(s)) for s in QKVO_SHAPES]
    with pytest.raises(ValueError, match="unknown qkvo 'joint'"):
        BatchedMuon(params, qkvo="joint")
    with pytest.raises(ValueError, match=r"stack \[0, 0\]: indices must be distinct"):
        BatchedMuon(params, qkvo="fused", stacks=[[0, 0]])
    with pytest.raises(ValueError, match="equal column counts"):
        BatchedMuon(
            [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 4))], stacks=[[0, 1]]
        )
    opt = BatchedMuon(params, qkvo="fused", stacks=QKVO_STACKS)
    for i, p in enumerate(params):
        p.grad = None if i == 1 else torch.randn(p.shape)
    with pytest.raises(RuntimeError, match="some have a gradient and some do not"):
        opt.step()
