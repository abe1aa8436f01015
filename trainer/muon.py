"""Batched Muon: ``torch.optim.Muon``'s update, with one stacked Newton-Schulz per matrix shape.

Why it exists
-------------
``torch.optim.Muon`` orthogonalises its matrices one at a time (its ``foreach`` path raises "not
supported"), so a step of the 88M preset is 132 small Newton-Schulz chains of 15 matmuls each. On one
H100 (torch 2.11, batch 32 x 2048; docs/model.md) that step took about 65 ms, against about 5 ms for one
stacked, compiled Newton-Schulz per shape group, out of a training step of about 150 ms.
``benchmarks/bench_muon.py`` measures both implementations on any device (the CPU figures are in
docs/benchmarks.md). The library has no batched variant, so this module provides one and keeps the
maths of ``torch/optim/_muon.py`` (torch 2.13), so that ``optim.muon_lr`` keeps its meaning.

The update
----------
For a matrix ``W`` of shape ``(A, B) = (out, in)`` with gradient ``G`` and momentum buffer ``M``, at
learning rate ``lr``, momentum ``mu`` and weight decay ``lambda``:

::

    M <- mu M + (1 - mu) G                        torch's M.lerp_(G, 1 - mu)
    U <- mu M + (1 - mu) G   (Nesterov), else M   torch's G.lerp(M, mu)
    W <- (1 - lr lambda) W - lr s(A, B) NS(U)

with ``s = sqrt(max(1, A / B))`` (``adjust_lr_fn = "original"``, Keller Jordan's reference) or
``0.2 sqrt(max(A, B))`` (``"match_rms_adamw"``, Moonshot). Matrices of one shape are stacked into a
``(G, A, B)`` tensor and orthogonalised by one batched call of :func:`orthogonalize`; the momentum, the
weight decay and the weight update are ``torch._foreach_*`` calls over all matrices of the group.

The state is ``torch.optim.Muon``'s: one ``momentum_buffer`` per matrix, so the optimizer state dict has
the same shape and goes through :mod:`trainer.resume` without pickle. Under DDP every rank holds the same
averaged gradients and computes the same update, as with ``torch.optim.Muon``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Coefficients = tuple[tuple[float, float, float], ...]

QUINTIC: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic ``(a, b, c)``, applied at every step: ``torch.optim.Muon``'s default
(``DEFAULT_A, DEFAULT_B, DEFAULT_C`` in ``torch/optim/_muon.py``), from his ``muon.py``."""

POLAR_EXPRESS: Coefficients = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
"""The five per-step ``(a, b, c)`` of Polar Express (Amsel, Persson, Musco & Gower 2025, "The Polar
Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932),
as used by modded-nanogpt's ``train_gpt.py``. They are the paper's greedy minimax composition for
singular values in ``[1e-3, 1]`` (``optimal_composition(l=1e-3, num_iters=5, safety_factor_eps=2e-2,
cushion=0.02)`` in the authors' ``NoahAmsel/PolarExpress`` repository); tests/test_muon.py recomputes
them from that construction."""

COEFFICIENT_SETS = ("quintic", "polar_express")
ADJUST_LR_FNS = ("original", "match_rms_adamw")


@dataclass(frozen=True)
class NewtonSchulz:
    """One orthogonalisation schedule: per-step coefficients and the initial normalisation.

    The input is scaled to ``X_0 = U / max(norm_scale * ||U||_F + norm_offset, norm_floor)`` so that its
    spectral norm is at most 1, then ``X_{t+1} = a_t X_t + (b_t A_t + c_t A_t^2) X_t`` with
    ``A_t = X_t X_t^T`` (an odd quintic in the singular values of ``X_t``).
    """

    coefficients: Coefficients
    """``(a_t, b_t, c_t)`` for each step ``t``."""
    norm_scale: float
    norm_offset: float
    norm_floor: float


def newton_schulz_schedule(name: str, steps: int) -> NewtonSchulz:
    """The schedule of coefficient set ``name`` (``quintic`` or ``polar_express``) for ``steps`` steps.

    - ``quintic``: :data:`QUINTIC` at every step, ``X_0 = U / max(||U||_F, 1e-7)``: exactly
      ``torch.optim.Muon`` (its ``eps = 1e-7``).
    - ``polar_express``: the five triples of :data:`POLAR_EXPRESS`, ``X_0 = U / (1.02 ||U||_F + 1e-6)``:
      modded-nanogpt's normalisation, whose factor 1.02 guards against bfloat16 rounding pushing a
      singular value above 1. The set is built for exactly five steps, so ``steps`` must be 5.

    >>> newton_schulz_schedule("quintic", 2).coefficients
    ((3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315))
    """
    if name == "quintic":
        return NewtonSchulz((QUINTIC,) * steps, norm_scale=1.0, norm_offset=0.0, norm_floor=1e-7)
    if name == "polar_express":
        if steps != len(POLAR_EXPRESS):
            raise ValueError(
                f"the polar_express coefficients are computed for {len(POLAR_EXPRESS)} steps, not {steps}"
            )
        return NewtonSchulz(POLAR_EXPRESS, norm_scale=1.02, norm_offset=1e-6, norm_floor=0.0)
    raise ValueError(f"unknown Newton-Schulz coefficient set {name!r}; expected one of {COEFFICIENT_SETS}")


NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
"""Dtypes the orthogonalisation may run in (``optim.muon_ns_dtype``); bfloat16 is Muon's own."""


def orthogonalize(updates: Tensor, schedule: NewtonSchulz, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix of ``updates`` (..., A, B), in ``dtype``.

    Tall matrices (``A > B``) are transposed so that the Gram matrices are ``min(A, B)`` square, as in
    ``torch.optim.Muon``; each step is ``A = X X^T``, ``B = b A + c A A``, ``X = a X + B X`` (two
    ``baddbmm`` and one ``matmul``). Returns a tensor of the input's shape and dtype holding the
    result computed in ``dtype`` (bfloat16 by default, as Muon is published; float64 where a test needs the
    update to float64 rounding). With the ``quintic`` schedule and one matrix this is ``torch.optim.Muon``'s
    ``_zeropower_via_newtonschulz``; the result is ``U S' V^T`` with ``S'`` near 1 (roughly 0.7 to 1.2),
    not exactly ``U V^T`` (see Keller Jordan's Muon post).

    Examples
    --------
    >>> g = torch.randn(3, 16, 8)
    >>> s = torch.linalg.svdvals(orthogonalize(g, newton_schulz_schedule("quintic", 5)).double())
    >>> bool(((s > 0.5) & (s < 1.3)).all())
    True
    """
    x = updates.to(dtype)
    tall = updates.size(-2) > updates.size(-1)
    if tall:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    x = x / (norm * schedule.norm_scale + schedule.norm_offset).clamp(min=schedule.norm_floor)
    batched = x.ndim > 2
    addmm = torch.baddbmm if batched else torch.addmm
    for a, b, c in schedule.coefficients:
        gram = x @ x.mT  # (..., m, m), m = min(A, B)
        poly = addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    if tall:
        x = x.mT
    return x.to(updates.dtype)


def adjusted_lr(lr: float, shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """Muon's per-shape learning rate for a matrix of shape ``(A, B) = (out, in)``.

    ``original`` (and None): ``lr * sqrt(max(1, A / B))``; ``match_rms_adamw``:
    ``lr * 0.2 * sqrt(max(A, B))``. The same as ``torch.optim._muon._adjust_lr``.

    >>> adjusted_lr(0.02, (2048, 512), "original")
    0.04
    """
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; expected one of {ADJUST_LR_FNS}")


def shape_groups(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (shape, dtype, device), each group and the groups in first-seen order.

    >>> shape_groups([torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3)])
    [[0, 2], [1]]
    """
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(tuple(p.shape), p.dtype, p.device)].append(i)
    return list(groups.values())


class BatchedMuon(torch.optim.Optimizer):
    """Muon with one batched Newton-Schulz per shape group (see the module docstring for the maths).

    Parameters
    ----------
    params
        2-D parameters, or parameter groups (dicts); extra keys of a group are kept.
    lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn
        As in ``torch.optim.Muon`` (``lr`` a Python float).
    coefficients
        ``quintic`` (``torch.optim.Muon``'s) or ``polar_express`` (:func:`newton_schulz_schedule`).
    ns_dtype
        Dtype name of the orthogonalisation (:data:`NS_DTYPES`): ``bfloat16`` as ``torch.optim.Muon``.
    compile
        Orthogonalise through ``torch.compile(orthogonalize, dynamic=False, fullgraph=True)``: one
        compilation per matrix shape, fused elementwise work. Not a hyperparameter, so it is not stored
        in the state dict.

    Examples
    --------
    >>> w = torch.nn.Parameter(torch.randn(8, 4))
    >>> opt = BatchedMuon([w], lr=0.02, weight_decay=0.0)
    >>> (w**2).sum().backward()
    >>> opt.step()
    >>> sorted(opt.state[w])
    ['momentum_buffer']
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        coefficients: str = "quintic",
        adjust_lr_fn: str | None = None,
        ns_dtype: str = "bfloat16",
        *,
        compile: bool = False,
    ):
        if not isinstance(lr, float | int) or lr < 0:
            raise ValueError(f"lr must be a non-negative Python number, got {lr!r}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"momentum and weight_decay must be non-negative, got {momentum}, {weight_decay}"
            )
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}; expected one of {ADJUST_LR_FNS}")
        newton_schulz_schedule(coefficients, ns_steps)  # reject an unknown set or a wrong step count now
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"unknown ns_dtype {ns_dtype!r}; expected one of {sorted(NS_DTYPES)}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            coefficients=coefficients,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")
        self.compiled = compile
        self._orthogonalize: Callable[[Tensor, NewtonSchulz, torch.dtype], Tensor] = (
            torch.compile(orthogonalize, dynamic=False, fullgraph=True) if compile else orthogonalize
        )

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        params, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse or torch.is_complex(p):
                raise RuntimeError("Muon takes neither sparse gradients nor complex parameters")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        return params, grads, bufs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = self._gather(group)
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            schedule = newton_schulz_schedule(group["coefficients"], group["ns_steps"])
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            if wd != 0:  # multiplying by exactly 1 would change nothing but cost a pass over the weights
                torch._foreach_mul_(params, 1 - lr * wd)
            for idx in shape_groups(params):
                stacked = torch.stack([updates[i] for i in idx])  # (G, A, B)
                ortho = self._orthogonalize(stacked, schedule, NS_DTYPES[group["ns_dtype"]])  # (G, A, B)
                step_lr = adjusted_lr(lr, params[idx[0]].shape, group["adjust_lr_fn"])
                torch._foreach_add_([params[i] for i in idx], list(ortho.unbind(0)), alpha=-step_lr)
        return loss
