"""Optimizers, learning-rate schedules and gradient clipping.

The maths lives in plain functions (:func:`param_groups`, :func:`lr_multiplier`,
:func:`clip_grad_norm`); :class:`Optimizers` is a thin container over PyTorch's own
``torch.optim.Muon`` and ``torch.optim.AdamW`` that the training loop treats as one optimizer.

``optim.name = "muon"``
    Muon (``optim.muon_impl``: ``torch.optim.Muon``, or :class:`trainer.muon.BatchedMuon`, the same
    update batched over matrices of one shape) on every 2-D hidden matrix (each ``nn.Linear`` weight inside the blocks:
    q/k/v/o projections, MLP up/gate/down) at ``optim.muon_lr``; AdamW at ``optim.lr`` on the token
    embedding and an untied LM head (weight decay ``optim.weight_decay``) and on every norm gain,
    QK-norm gamma included (weight decay ``optim.norm_weight_decay``).
``optim.name = "adamw"``
    AdamW at ``optim.lr`` on everything (the plan's "use adamw_lr for everything"): matrices and
    embeddings with ``optim.weight_decay``, gains with ``optim.norm_weight_decay``.

Muon's learning-rate adjustment
-------------------------------
``torch.optim.Muon`` rescales its learning rate per matrix of shape (A, B) = (out, in) through
``adjust_lr_fn``. We use ``"original"``, ``lr * sqrt(max(1, A / B))``: Keller Jordan's reference
``muon.py``, which the source documents' code copied, so their Muon learning rate (0.024) means the
same thing here. ``"match_rms_adamw"`` (Moonshot, ``0.2 * lr * sqrt(max(A, B))``) is meant to reuse
AdamW learning rates and would silently change the meaning of ``optim.muon_lr`` by a factor of
``0.2 * sqrt(max(A, B))`` (about 4.5 to 9 at the 88M preset's widths).

``optim.muon_qkvo`` (``fused``, ``separate_stacked_lr``) hands the batched Muon each layer's
``[W_q; W_k; W_v; W_o]`` as a stack (:func:`qkvo_stacks`); see :mod:`trainer.muon` for what it does with them.

PyTorch's Muon keeps its momentum as an exponential moving average (``buf.lerp_(g, 1 - mu)``) where
the reference keeps a plain sum (``buf = mu * buf + g``); the Nesterov update of the former is the
latter's times ``1 - mu``, and the Newton-Schulz step divides by the Frobenius norm first, so the
orthogonalised updates are the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError, OptimConfig
from trainer.errors import TrainerError
from trainer.muon import BatchedMuon

MUON_ADJUST_LR_FN = "original"
"""``adjust_lr_fn`` passed to ``torch.optim.Muon`` (see the module docstring for why)."""

# Flags that describe how an optimizer runs on this machine, not what it has learnt: a resumed run
# keeps its own (a state saved with fused CUDA AdamW must load into foreach CPU AdamW and back).
_EXECUTION_FLAGS = ("fused", "foreach", "capturable", "differentiable")

# Prefixes that torch.compile (``_orig_mod.``) and DDP/FSDP (``module.``) put in front of parameter
# names; stripped so that group names match the checkpoint's keys however the model is wrapped.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _canonical_name(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def param_groups(model: nn.Module, cfg: OptimConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Assign every trainable parameter of ``model`` to exactly one optimizer group.

    Parameters
    ----------
    model
        The model, possibly wrapped by ``torch.compile`` or DDP (wrapper prefixes are stripped
        from the returned names).
    cfg
        The optimizer config; ``cfg.name`` picks the grouping.

    Returns
    -------
    dict
        Group name -> list of ``(parameter name, parameter)`` in module order. Under ``muon`` the
        keys are ``muon``, ``adamw_decay`` and ``adamw_no_decay``; under ``adamw`` only the last two.
        Parameters with ``requires_grad=False`` (a frozen QK-norm gamma) are in no group.

    Notes
    -----
    Rules, by module type rather than by name so that a new block layout cannot slip through:
    1-D parameters (every RMSNorm gain, QK-norm gamma included) -> ``adamw_no_decay``;
    ``nn.Embedding`` weights -> ``adamw_decay``; ``nn.Linear`` weights inside ``blocks`` -> ``muon``
    (``adamw_decay`` under ``adamw``); any other ``nn.Linear`` weight (an untied LM head) ->
    ``adamw_decay``. Anything else raises :class:`TrainerError` instead of being guessed.

    Examples
    --------
    >>> from trainer.config import ModelConfig
    >>> from trainer.model import LLM
    >>> model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))
    >>> groups = param_groups(model, OptimConfig(name="muon"))
    >>> [name for name, _ in groups["muon"]][:2]
    ['blocks.0.attn.q_proj.weight', 'blocks.0.attn.k_proj.weight']
    >>> [name for name, _ in groups["adamw_decay"]]
    ['embed.weight']
    """
    if cfg.name == "muon":
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "muon": [],
            "adamw_decay": [],
            "adamw_no_decay": [],
        }
    elif cfg.name == "adamw":
        groups = {"adamw_decay": [], "adamw_no_decay": []}
    else:
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a parameter shared by two modules is optimised once
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            name = _canonical_name(f"{module_name}.{local_name}" if module_name else local_name)
            if p.ndim < 2:
                group = "adamw_no_decay"
            elif isinstance(module, nn.Embedding):
                group = "adamw_decay"
            elif isinstance(module, nn.Linear) and p.ndim == 2:
                hidden = "blocks" in name.split(".")
                group = "muon" if hidden and cfg.name == "muon" else "adamw_decay"
            else:
                raise TrainerError(
                    f"parameter {name} {tuple(p.shape)} of a {type(module).__name__} has no optimizer group; "
                    "extend trainer.optim.param_groups"
                )
            groups[group].append((name, p))
    return groups


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning-rate multiplier (peak = 1) for optimizer step ``step`` of ``total_steps``.

    With ``W = floor(warmup_frac * total_steps)`` warmup steps (every schedule honours them):

    - steps ``0 .. W-1``: linear warmup ``(step + 1) / W``, so the first step already moves and
      step ``W - 1`` is at the peak;
    - ``constant``: 1 after warmup;
    - ``cosine``: ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p = (step - W) / (total_steps - W)``;
    - ``wsd``: 1 until the last ``D = floor(decay_frac * total_steps)`` steps, then linear from 1 at
      step ``total_steps - D`` to ``min`` at ``total_steps`` (``decay_frac = 0``: no decay);

    where ``min = min_lr_frac``. Steps at or past ``total_steps`` get the final value (``min`` for
    ``cosine`` and ``wsd``). The training loop takes steps ``0 .. total_steps - 1``.

    Examples
    --------
    >>> cfg = OptimConfig(schedule="wsd", warmup_frac=0.1, decay_frac=0.2, min_lr_frac=0.0)
    >>> [lr_multiplier(s, 10, cfg) for s in (0, 1, 5, 8, 9, 10)]
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    >>> lr_multiplier(50, 100, OptimConfig(schedule="cosine", min_lr_frac=0.1))
    0.55
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    warmup = math.floor(cfg.warmup_frac * total_steps)
    decay = math.floor(cfg.decay_frac * total_steps) if cfg.schedule == "wsd" else 0
    if warmup + decay > total_steps:
        raise ConfigError(
            f"optim.warmup_frac={cfg.warmup_frac} + optim.decay_frac={cfg.decay_frac} exceed the whole run"
        )
    if step < warmup:
        return (step + 1) / warmup
    floor_ = cfg.min_lr_frac
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return floor_ + (1.0 - floor_) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = total_steps - decay
        if decay == 0 or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay)
        return 1.0 - (1.0 - floor_) * progress
    raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r}")


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to ``max_norm`` and return the norm before clipping.

    ``max_norm = 0`` disables clipping but still measures the norm (the loop logs it). Parameters
    without a gradient are skipped. Returns a 0-d float32 tensor on the gradients' device, without
    synchronising with it: the training loop reads it only at its log steps.
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be non-negative, got {max_norm}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters(), torch.zeros(())).device)
    if max_norm == 0:
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=2.0)


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
"""A layer's attention projections in the order the source documents' model stacks them."""


def qkvo_stacks(names: list[str]) -> list[list[int]]:
    """Positions in ``names`` of each layer's ``[W_q; W_k; W_v; W_o]``, the stacks of ``optim.muon_qkvo``.

    Raises :class:`TrainerError` when a layer lacks one of the four (e.g. a frozen projection), because its
    stack would silently be another matrix.

    >>> qkvo_stacks([f"blocks.0.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] +
    ...             ["blocks.0.mlp.up.weight"])
    [[0, 1, 2, 3]]
    """
    where = {name: i for i, name in enumerate(names)}
    layers = dict.fromkeys(name.split(".attn.")[0] for name in names if ".attn." in name)  # module order
    stacks = []
    for layer in layers:
        wanted = [f"{layer}.attn.{proj}.weight" for proj in QKVO]
        missing = [w for w in wanted if w not in where]
        if missing:
            raise TrainerError(f"optim.muon_qkvo: {', '.join(missing)} not among the Muon parameters")
        stacks.append([where[w] for w in wanted])
    return stacks


def _muon(
    params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, device_type: str
) -> torch.optim.Optimizer:
    """The Muon optimizer of ``optim.muon_impl`` over the hidden matrices (one group named ``muon``)."""
    group = {"params": params, "name": "muon", "base_lr": cfg.muon_lr}
    common = dict(
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=MUON_ADJUST_LR_FN,
    )
    if cfg.muon_impl == "torch":
        return torch.optim.Muon([group], **common)
    if cfg.muon_impl == "batched":
        # compiled on CUDA, where fewer, fused kernels are the point (65 ms -> 5 ms on one H100); on the CPU
        # the step is matmul-bound and a compilation per shape costs seconds (benchmarks/bench_muon.py)
        compile_ns = device_type == "cuda"
        return BatchedMuon(
            [group],
            **common,
            coefficients=cfg.muon_coefficients,
            ns_dtype=cfg.muon_ns_dtype,
            qkvo=cfg.muon_qkvo,
            stacks=qkvo_stacks([name for name, _ in params]) if cfg.muon_qkvo != "separate" else (),
            compile=compile_ns,
        )
    raise ConfigError(f"optim.muon_impl: unknown implementation {cfg.muon_impl!r}")


class Optimizers:
    """The run's optimizers (``[Muon, AdamW]`` or ``[AdamW]``), stepped and scheduled together.

    Parameters
    ----------
    model
        The model (possibly compiled or DDP-wrapped); its trainable parameters are grouped by
        :func:`param_groups`.
    cfg
        Optimizer config.
    total_steps
        Optimizer steps in the run, for the schedule.
    device_type
        ``"cuda"`` selects fused AdamW and the compiled Newton-Schulz of the batched Muon; anything else
        the multi-tensor (foreach) AdamW and the eager batched Muon.

    Notes
    -----
    Every torch parameter group carries two extra keys: ``name`` (the :func:`param_groups` key)
    and ``base_lr`` (its peak learning rate), which :meth:`set_lr` multiplies by the schedule. The
    learning rate for step 0 is set on construction.

    Examples
    --------
    >>> from trainer.config import ModelConfig
    >>> from trainer.model import LLM
    >>> model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))
    >>> opt = Optimizers(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02), total_steps=10, device_type="cpu")
    >>> [type(o).__name__ for o in opt.optimizers]
    ['BatchedMuon', 'AdamW']
    >>> opt.set_lr(0)
    {'muon': 0.02, 'adamw_decay': 0.001, 'adamw_no_decay': 0.001}
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, total_steps: int, device_type: str):
        if total_steps <= 0:
            raise TrainerError(f"the run has {total_steps} optimizer steps; it needs at least one")
        lr_multiplier(0, total_steps, cfg)  # reject a schedule that cannot fit before building anything
        self.cfg = cfg
        self.total_steps = total_steps
        groups = param_groups(model, cfg)
        self.optimizers: list[torch.optim.Optimizer] = []
        if groups.get("muon"):
            self.optimizers.append(_muon(groups["muon"], cfg, device_type))
        adamw_groups = [
            {
                "params": groups["adamw_decay"],
                "name": "adamw_decay",
                "base_lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            },
            {
                "params": groups["adamw_no_decay"],
                "name": "adamw_no_decay",
                "base_lr": cfg.lr,
                "weight_decay": cfg.norm_weight_decay,
            },
        ]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        if adamw_groups:
            fused = device_type == "cuda"
            self.optimizers.append(
                torch.optim.AdamW(
                    adamw_groups,
                    lr=cfg.lr,
                    betas=cfg.betas,
                    eps=cfg.eps,
                    weight_decay=cfg.weight_decay,
                    fused=True if fused else None,
                    foreach=None if fused else True,
                )
            )
        if not self.optimizers:
            raise TrainerError("the model has no trainable parameters")
        self.set_lr(0)

    def _groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        """Step every optimizer (gradients must already be reduced and clipped)."""
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``: frees the memory and skips a fill)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr(self, step: int) -> dict[str, float]:
        """Set every group's learning rate for optimizer step ``step``; return ``{group name: lr}``."""
        mult = lr_multiplier(step, self.total_steps, self.cfg)
        lrs = {}
        for group in self._groups():
            group["lr"] = group["base_lr"] * mult
            lrs[group["name"]] = group["lr"]
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """Plain optimizer state: ``{"kinds": [class names], "optimizers": [torch state dicts]}``.

        Leaves are tensors (moments, momentum buffers, AdamW's step counters) or JSON-able
        scalars, strings and lists, so the resume code can store the tensors in safetensors and
        the rest as JSON, without pickle. Each torch state dict's groups carry ``param_names``.
        """
        return {
            "kinds": [type(opt).__name__ for opt in self.optimizers],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, also after a JSON round trip (string state keys, lists
        for tuples). Raises :class:`TrainerError` if it was saved for other optimizers or other
        parameters. The execution flags (fused/foreach) of this machine are kept."""
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if list(sd.get("kinds", ())) != kinds:
            raise TrainerError(f"optimizer state is for {sd.get('kinds')}, this run uses {kinds}")
        for opt, saved in zip(self.optimizers, sd["optimizers"]):
            current = opt.state_dict()["param_groups"]
            saved_groups = saved["param_groups"]
            for mine, theirs in zip(current, saved_groups):
                same_params = mine.get("param_names") == theirs.get("param_names")
                if mine.get("name") != theirs.get("name") or not same_params:
                    raise TrainerError(
                        f"optimizer state group {theirs.get('name')!r} holds other parameters than this model's "
                        f"group {mine.get('name')!r}; was it saved for another model or optimizer config?"
                    )
            if len(current) != len(saved_groups):
                raise TrainerError(
                    f"{type(opt).__name__} state has {len(saved_groups)} groups, this run has {len(current)}"
                )
            # this run's values stand in for hyperparameters added since the state was saved (the config
            # check has already shown they have their defaults); the saved ones win everywhere else
            fixed_groups = [
                {**mine, **theirs, **{k: mine[k] for k in _EXECUTION_FLAGS if k in mine}}
                for mine, theirs in zip(current, saved_groups)
            ]
            state = {int(k): v for k, v in saved["state"].items()}
            opt.load_state_dict({"state": state, "param_groups": fixed_groups})
