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

Stacked matrices (``optim.muon_qkvo``)
-------------------------------------
The source documents' model keeps a layer's four attention projections in one parameter ``[W_q; W_k; W_v; W_o]``
(rows ``q + 2 kv + o``, columns ``d_model``), so their Muon orthogonalises the stack as one matrix and scales its
step by the stack's ``sqrt(max(1, rows / cols))`` (``sqrt(3)`` at their 88M and at ``tiny``). ``fused`` does the
same with our separate parameters: the momentum stays per parameter (momentum is elementwise, so stacking the
Nesterov updates after it gives the stack's update exactly), the updates are concatenated row-wise, orthogonalised
together (stacks of one shape in one batched call) and split back. W_k's step is then a block of a (nearly)
orthogonal matrix, not itself orthogonal. ``separate_stacked_lr`` keeps each block's own orthogonalisation but
takes the stack's learning-rate factor.

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

COEFFICIENT_SETS = ("quintic", "polar_express", "polar_express_seed")
QKVO_MODES = ("separate", "fused", "separate_stacked_lr")
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
    - ``polar_express_seed``: the same triples, ``X_0 = U / (1.01 ||U||_F + 1e-7)``: the normalisation of the
      source documents' ``optimizers/muon.py`` (vukrosic/attention-keys-analysis).

    >>> newton_schulz_schedule("quintic", 2).coefficients
    ((3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315))
    """
    if name == "quintic":
        return NewtonSchulz((QUINTIC,) * steps, norm_scale=1.0, norm_offset=0.0, norm_floor=1e-7)
    if name in ("polar_express", "polar_express_seed"):
        if steps != len(POLAR_EXPRESS):
            raise ValueError(
                f"the {name} coefficients are computed for {len(POLAR_EXPRESS)} steps, not {steps}"
            )
        if name == "polar_express_seed":
            return NewtonSchulz(POLAR_EXPRESS, norm_scale=1.01, norm_offset=1e-7, norm_floor=0.0)
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
    qkvo, stacks
        ``stacks`` lists groups of positions in a parameter group's ``params`` whose matrices (equal column
        counts) form one matrix stacked row-wise, e.g. a layer's ``[W_q; W_k; W_v; W_o]``. ``qkvo``: ``separate``
        ignores them; ``fused`` orthogonalises each stack as one matrix and steps its blocks by the stack's
        learning-rate factor; ``separate_stacked_lr`` orthogonalises each block on its own but with the stack's
        factor (the control that separates the step size from the joint orthogonalisation). Both are group
        keys, so a group may carry its own.
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
        qkvo: str = "separate",
        stacks: Sequence[Sequence[int]] = (),
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
        if qkvo not in QKVO_MODES:
            raise ValueError(f"unknown qkvo {qkvo!r}; expected one of {QKVO_MODES}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            coefficients=coefficients,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            qkvo=qkvo,
            stacks=[list(stack) for stack in stacks],
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")
            _check_stacks(group)
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
            ns_dtype = NS_DTYPES[group["ns_dtype"]]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            if wd != 0:  # multiplying by exactly 1 would change nothing but cost a pass over the weights
                torch._foreach_mul_(params, 1 - lr * wd)
            stacks = self._stacks(group, params)
            step_lrs = [adjusted_lr(lr, p.shape, group["adjust_lr_fn"]) for p in params]
            if group["qkvo"] == "separate_stacked_lr":
                for stack in stacks:  # each block steps as far as the stack it would be fused into
                    for i in stack:
                        step_lrs[i] = adjusted_lr(
                            lr, stacked_shape([params[j] for j in stack]), group["adjust_lr_fn"]
                        )
            fused = group["qkvo"] == "fused"
            if fused:
                self._step_fused(stacks, params, updates, lr, schedule, ns_dtype, group["adjust_lr_fn"])
            in_stack = {i for stack in stacks for i in stack} if fused else set()
            loose = [i for i in range(len(params)) if i not in in_stack]
            for idx in shape_groups([params[i] for i in loose]):
                idx = [loose[j] for j in idx]
                stacked = torch.stack([updates[i] for i in idx])  # (G, A, B)
                ortho = list(self._orthogonalize(stacked, schedule, ns_dtype).unbind(0))  # G x (A, B)
                for step_lr in dict.fromkeys(step_lrs[i] for i in idx):  # one call when all agree
                    same = [j for j, i in enumerate(idx) if step_lrs[i] == step_lr]
                    torch._foreach_add_(
                        [params[idx[j]] for j in same], [ortho[j] for j in same], alpha=-step_lr
                    )
        return loss

    def _stacks(self, group: dict[str, Any], params: list[Tensor]) -> list[list[int]]:
        """The group's stacks as positions in ``params`` (its parameters that have a gradient); none under
        ``separate``. A stack whose blocks have no gradient at all is skipped; one with only some is an error."""
        if group["qkvo"] == "separate":
            return []
        position = {id(p): i for i, p in enumerate(params)}
        out = []
        for stack in group["stacks"]:
            found = [position.get(id(group["params"][j])) for j in stack]
            if all(f is None for f in found):
                continue
            if any(f is None for f in found):
                raise RuntimeError(f"stacked parameters {list(stack)}: some have a gradient and some do not")
            out.append(found)
        return out

    def _step_fused(
        self,
        stacks: list[list[int]],
        params: list[Tensor],
        updates: list[Tensor],
        lr: float,
        schedule: NewtonSchulz,
        ns_dtype: torch.dtype,
        adjust_lr_fn: str | None,
    ) -> None:
        """Orthogonalise each stack's updates as one matrix (rows concatenated; stacks of one shape batched) and
        step its blocks by the stack's learning rate."""
        by_shape: dict[tuple[int, int], list[list[int]]] = defaultdict(list)
        for stack in stacks:
            by_shape[stacked_shape([params[i] for i in stack])].append(stack)
        for shape, group_stacks in by_shape.items():
            joint = torch.stack(
                [torch.cat([updates[i] for i in stack]) for stack in group_stacks]
            )  # (G, R, C)
            ortho = self._orthogonalize(joint, schedule, ns_dtype)  # (G, R, C)
            blocks, targets = [], []
            for stack, matrix in zip(group_stacks, ortho.unbind(0)):
                blocks += matrix.split([params[i].shape[0] for i in stack])  # each (rows_i, C)
                targets += [params[i] for i in stack]
            torch._foreach_add_(targets, blocks, alpha=-adjusted_lr(lr, shape, adjust_lr_fn))


def _check_stacks(group: dict[str, Any]) -> None:
    """Refuse stacks that name a parameter twice, one outside the group, or blocks of unequal widths."""
    if group["qkvo"] not in QKVO_MODES:
        raise ValueError(f"unknown qkvo {group['qkvo']!r}; expected one of {QKVO_MODES}")
    seen: set[int] = set()
    for stack in group["stacks"]:
        outside = any(not 0 <= j < len(group["params"]) for j in stack)
        if not stack or outside or len(set(stack)) < len(stack) or seen.intersection(stack):
            raise ValueError(f"stack {list(stack)}: indices must be distinct positions in the group's params")
        seen.update(stack)
        stacked_shape([group["params"][j] for j in stack])


def stacked_shape(blocks: Sequence[Tensor]) -> tuple[int, int]:
    """Shape ``(sum of rows, cols)`` of the matrices ``blocks`` stacked row-wise (all must have equal columns).

    >>> stacked_shape([torch.zeros(4, 8), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(8, 8)])
    (16, 8)
    """
    cols = {b.shape[1] for b in blocks}
    if len(cols) != 1:
        raise ValueError(
            f"stacked blocks need equal column counts, got shapes {[tuple(b.shape) for b in blocks]}"
        )
    return sum(b.shape[0] for b in blocks), cols.pop()
