"""Optimizer grouping, schedules, clipping, and the resume round trip of the optimizer state."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch
from helpers import tiny_model_config
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz  # private in torch 2.13

from trainer.config import ConfigError, ModelConfig, OptimConfig, load_config
from trainer.errors import TrainerError
from trainer.model import LLM
from trainer.muon import NS_DTYPES, QUINTIC, BatchedMuon, newton_schulz_schedule, orthogonalize
from trainer.optim import MUON_ADJUST_LR_FN, Optimizers, clip_grad_norm, lr_multiplier, param_groups

SMALL = tiny_model_config(context_length=16)


def build(cfg: ModelConfig = SMALL, seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    return LLM(cfg)


def batch(step: int, cfg: ModelConfig = SMALL) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    return x[:, :-1], x[:, 1:]  # (B, T) inputs and next-token targets


def train_step(model: LLM, opt: Optimizers, step: int, max_norm: float = 1.0) -> float:
    opt.set_lr(step)
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch(step, model.cfg))
    model(x, y).backward()
    norm = clip_grad_norm(model, max_norm).item()
    opt.step()
    opt.zero_grad()
    return norm


def names(groups: dict[str, list[tuple[str, Any]]], key: str) -> list[str]:
    return [n for n, _ in groups[key]]


# ----------------------------------------------------------------------------------------------------
# grouping


def test_muon_grouping_on_tiny():
    model = LLM(load_config("tiny").model)
    groups = param_groups(model, OptimConfig(name="muon"))
    assert set(groups) == {"muon", "adamw_decay", "adamw_no_decay"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    grouped = [n for key in groups for n in names(groups, key)]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter exactly once
    muon = set(names(groups, "muon"))
    per_layer = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up", "mlp.down"]
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(4) for m in per_layer}
    assert all(p.ndim == 2 for _, p in groups["muon"])
    assert names(groups, "adamw_decay") == ["embed.weight"]
    no_decay = set(names(groups, "adamw_no_decay"))
    norms = ["attn_norm", "mlp_norm", "attn.q_norm", "attn.k_norm"]
    assert no_decay == {f"blocks.{i}.{m}.weight" for i in range(4) for m in norms} | {"norm.weight"}
    assert all(p.ndim == 1 for _, p in groups["adamw_no_decay"])


def test_adamw_grouping_on_tiny():
    model = LLM(load_config("tiny").model)
    groups = param_groups(model, OptimConfig(name="adamw"))
    assert set(groups) == {"adamw_decay", "adamw_no_decay"}
    muon = param_groups(model, OptimConfig(name="muon"))
    assert names(groups, "adamw_decay") == ["embed.weight"] + names(muon, "muon")
    assert names(groups, "adamw_no_decay") == names(muon, "adamw_no_decay")


def test_swiglu_gate_untied_head_and_frozen_gamma():
    cfg = dataclasses.replace(SMALL, mlp="swiglu", tie_embeddings=False, qk_norm="frozen")
    model = build(cfg)
    groups = param_groups(model, OptimConfig(name="muon"))
    assert "blocks.1.mlp.gate.weight" in names(groups, "muon")
    assert names(groups, "adamw_decay") == [
        "embed.weight",
        "lm_head.weight",
    ]  # the head is not a hidden matrix
    grouped = {n for key in groups for n in names(groups, key)}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.attn.{m}.weight" for i in range(2) for m in ("q_norm", "k_norm")}
    assert not grouped & frozen
    assert grouped | frozen == {n for n, _ in model.named_parameters()}


def test_grouping_sees_through_compile_wrapper():
    model = build()
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert param_groups(wrapped, OptimConfig()) == param_groups(model, OptimConfig())


def test_unknown_parameter_kind_is_an_error():
    model = build()
    model.blocks[0].extra = torch.nn.Conv1d(2, 2, 3, bias=False)
    with pytest.raises(TrainerError, match=r"blocks\.0\.extra\.weight"):
        param_groups(model, OptimConfig())


@pytest.mark.parametrize(("impl", "kind"), [("torch", torch.optim.Muon), ("batched", BatchedMuon)])
def test_optimizers_hyperparameters(impl, kind):
    cfg = OptimConfig(
        name="muon",
        muon_impl=impl,
        lr=1e-3,
        muon_lr=0.05,
        muon_momentum=0.9,
        muon_nesterov=False,
        muon_ns_steps=3,
        muon_weight_decay=0.01,
        weight_decay=0.2,
        norm_weight_decay=0.05,
        betas=(0.8, 0.9),
        eps=1e-10,
    )
    opt = Optimizers(build(), cfg, total_steps=10, device_type="cpu")
    muon, adamw = opt.optimizers
    assert isinstance(muon, kind) and isinstance(adamw, torch.optim.AdamW)
    (g,) = muon.param_groups
    assert (g["name"], g["lr"], g["momentum"], g["nesterov"], g["ns_steps"], g["weight_decay"]) == (
        "muon",
        0.05,
        0.9,
        False,
        3,
        0.01,
    )
    assert g["adjust_lr_fn"] == MUON_ADJUST_LR_FN == "original"
    if impl == "batched":
        assert g["coefficients"] == "quintic" and not muon.compiled  # compiled on CUDA only
    decay, no_decay = adamw.param_groups
    assert (decay["name"], decay["lr"], decay["weight_decay"]) == ("adamw_decay", 1e-3, 0.2)
    assert (no_decay["name"], no_decay["lr"], no_decay["weight_decay"]) == ("adamw_no_decay", 1e-3, 0.05)
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-10
    assert decay["foreach"] is True and not decay["fused"]  # CPU: multi-tensor kernels

    (adamw_only,) = Optimizers(build(), dataclasses.replace(cfg, name="adamw"), 10, "cpu").optimizers
    assert isinstance(adamw_only, torch.optim.AdamW)
    assert [g["lr"] for g in adamw_only.param_groups] == [1e-3, 1e-3]  # adamw_lr for everything


def test_muon_steps_the_matrices_and_adamw_the_rest():
    model = build()
    opt = Optimizers(model, OptimConfig(name="muon"), total_steps=5, device_type="cpu")
    groups = param_groups(model, OptimConfig(name="muon"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(0)
    model(x, y).backward()
    muon, adamw = opt.optimizers

    muon.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names(groups, "muon"))

    adamw.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters()}  # the learned QK gains moved too


@pytest.mark.parametrize(
    ("impl", "ns_dtype"), [("torch", "bfloat16"), ("batched", "bfloat16"), ("batched", "float64")]
)
def test_one_muon_step_is_an_orthogonalised_update(impl, ns_dtype):
    """One step from zero momentum moves W by lr * sqrt(max(1, A/B)) * NS5(U), U the Nesterov update of the
    gradient G: the implementation's own Newton-Schulz on U, with the learning rate of the shape; and NS5(U) has
    the singular vectors of G, each singular value s mapped by the quintic iteration applied to s / ||G||_F."""
    model = build()
    cfg = OptimConfig(
        name="muon", muon_lr=0.02, muon_weight_decay=0.0, muon_impl=impl, muon_ns_dtype=ns_dtype
    )
    opt = Optimizers(model, cfg, total_steps=5, device_type="cpu")
    w = model.blocks[
        0
    ].mlp.up.weight  # (d_ff, d_model) = (64, 32): tall, so "original" scales the lr by sqrt(2)
    before = w.detach().clone()
    x, y = batch(0)
    model(x, y).backward()
    grad = w.grad.detach().clone()
    opt.optimizers[0].step()
    lr = 0.02 * math.sqrt(64 / 32)
    update = (
        before.double() - w.detach().double()
    ) / lr  # the difference of two float32 numbers, exact in float64

    # the Nesterov update from zero momentum, by the optimizers' own float32 ops (buf = 0 lerp G, U = G lerp buf),
    # through the same Newton-Schulz kernel on the same input: the same numbers bit for bit, so only the float32
    # rounding of W - lr * O remains (the product and the sum, each 2**-24 of numbers below max|W| + lr)
    nesterov = grad.lerp(torch.zeros_like(grad).lerp_(grad, 1 - cfg.muon_momentum), cfg.muon_momentum)
    schedule = newton_schulz_schedule("quintic", 5)
    if impl == "torch":
        kernel = torch_newton_schulz(nesterov, QUINTIC, 5, 1e-7)
    else:
        kernel = orthogonalize(nesterov[None], schedule, NS_DTYPES[ns_dtype])[
            0
        ]  # stacked, as the step calls it
    rounding = 2 * 2**-24 * (before.abs().max().item() + lr) / lr
    torch.testing.assert_close(update, kernel.double(), rtol=0, atol=rounding)
    # a learning rate without the sqrt(2) of the shape, or another adjust_lr_fn, is 13% to 41% of the update off

    rank = x.numel()  # 24 tokens: the gradient has rank 24 < 32
    s_update = torch.linalg.svdvals(update)[:rank]
    assert (
        0.5 < s_update.min() and s_update.max() < 1.3
    )  # roughly orthogonal (the quintic maps into [0.68, 1.2])
    if ns_dtype == "float64":  # the maths, to float64 rounding and the float32 rounding above
        s_grad = torch.linalg.svdvals(grad.double())[:rank]
        expected = s_grad / grad.double().norm()
        for _ in range(5):  # Keller Jordan's quintic coefficients, as in torch.optim.Muon
            expected = 3.4445 * expected - 4.7750 * expected**3 + 2.0315 * expected**5
        expected = expected.sort(descending=True).values  # the polynomial is not monotone on (0, 1)
        # Weyl: a singular value moves by at most the spectral norm of the perturbation, at most its Frobenius
        # norm, sqrt(64 * 32) times its largest entry; the float32 roundings of O and of W - lr * O
        bound = math.sqrt(64 * 32) * (rounding + 2**-24 * 1.2)
        torch.testing.assert_close(s_update, expected, rtol=0, atol=bound)


# ----------------------------------------------------------------------------------------------------
# schedules


def test_constant_schedule():
    cfg = OptimConfig(schedule="constant")
    assert [lr_multiplier(s, 10, cfg) for s in (0, 5, 9, 10, 20)] == [1.0] * 5
    warm = dataclasses.replace(cfg, warmup_frac=0.2)  # 2 warmup steps
    assert [lr_multiplier(s, 10, warm) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_cosine_schedule_corners():
    cfg = OptimConfig(schedule="cosine", warmup_frac=0.1, min_lr_frac=0.1)  # 10 warmup steps of 100
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)  # (0 + 1) / 10: the first step moves
    assert lr_multiplier(9, 100, cfg) == 1.0  # warmup ends at the peak
    assert lr_multiplier(10, 100, cfg) == 1.0  # cosine starts at the peak
    assert lr_multiplier(55, 100, cfg) == pytest.approx(0.55)  # halfway down: (1 + min) / 2
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(1000, 100, cfg) == pytest.approx(0.1)  # clamped past the end
    values = [lr_multiplier(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert lr_multiplier(0, 100, dataclasses.replace(cfg, warmup_frac=0.0)) == 1.0


def test_wsd_schedule_corners():
    cfg = OptimConfig(schedule="wsd", warmup_frac=0.1, decay_frac=0.2, min_lr_frac=0.0)
    total = 100  # warmup 0..9, stable 10..79, decay 80..99 -> 0 at 100
    assert lr_multiplier(4, total, cfg) == pytest.approx(0.5)
    assert (
        lr_multiplier(10, total, cfg) == lr_multiplier(79, total, cfg) == lr_multiplier(80, total, cfg) == 1.0
    )
    assert lr_multiplier(90, total, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, total, cfg) == pytest.approx(0.05)
    assert lr_multiplier(100, total, cfg) == 0.0
    floor_ = dataclasses.replace(cfg, min_lr_frac=0.2)
    assert lr_multiplier(90, total, floor_) == pytest.approx(0.6)
    assert lr_multiplier(100, total, floor_) == pytest.approx(0.2)
    no_decay = dataclasses.replace(cfg, decay_frac=0.0)
    assert lr_multiplier(99, total, no_decay) == lr_multiplier(100, total, no_decay) == 1.0


def test_schedule_rejects_bad_input():
    with pytest.raises(ConfigError, match="optim.decay_frac"):
        lr_multiplier(0, 10, OptimConfig(schedule="wsd", warmup_frac=0.5, decay_frac=0.6))
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(0, 0, OptimConfig())
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(-1, 10, OptimConfig())
    with pytest.raises(TrainerError, match="optimizer steps"):
        Optimizers(build(), OptimConfig(), total_steps=0, device_type="cpu")


def test_set_lr_applies_the_schedule_to_every_group():
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, schedule="cosine", warmup_frac=0.5, min_lr_frac=0.0)
    opt = Optimizers(build(), cfg, total_steps=4, device_type="cpu")  # 2 warmup steps, then cosine over 2
    assert opt.set_lr(0) == pytest.approx({"muon": 0.01, "adamw_decay": 5e-4, "adamw_no_decay": 5e-4})
    assert opt.set_lr(3) == pytest.approx({"muon": 0.01, "adamw_decay": 5e-4, "adamw_no_decay": 5e-4})
    lrs = opt.set_lr(2)
    assert lrs == {"muon": 0.02, "adamw_decay": 1e-3, "adamw_no_decay": 1e-3}
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.02, 1e-3, 1e-3]


# ----------------------------------------------------------------------------------------------------
# clipping


def test_clip_grad_norm_returns_the_norm_before_clipping():
    model = build()
    x, y = batch(0)
    model(x, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))

    measured = clip_grad_norm(model, 0.0)  # 0: measure only
    assert isinstance(measured, torch.Tensor) and measured.ndim == 0  # a device tensor: no host sync
    assert measured.item() == pytest.approx(norm, rel=1e-5)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)

    assert norm > 1e-3
    assert clip_grad_norm(model, norm / 4).item() == pytest.approx(norm, rel=1e-5)
    after = math.sqrt(
        sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None)
    )
    assert after == pytest.approx(norm / 4, rel=1e-4)
    with pytest.raises(ValueError):
        clip_grad_norm(model, -1.0)


# ----------------------------------------------------------------------------------------------------
# resume: state_dict round trip through safetensors + JSON, as the resume code stores it


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace every tensor by a reference into ``tensors``; the rest must be JSON-able as is."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {str(k): _split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    assert obj is None or isinstance(obj, bool | int | float | str), f"{path}: {type(obj)} is not JSON-able"
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        return (
            tensors[obj["__tensor__"]]
            if set(obj) == {"__tensor__"}
            else {k: _join(v, tensors) for k, v in obj.items()}
        )
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def through_disk(sd: dict[str, Any]) -> dict[str, Any]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_split(sd, tensors, "opt"))
    return _join(json.loads(skeleton), load_safetensors(save_safetensors(tensors)))


@pytest.mark.parametrize(("name", "impl"), [("muon", "torch"), ("muon", "batched"), ("adamw", "batched")])
def test_state_dict_round_trip_gives_an_identical_next_step(name, impl):
    cfg = OptimConfig(
        name=name,
        muon_impl=impl,
        schedule="cosine",
        warmup_frac=0.2,
        weight_decay=0.1,
        norm_weight_decay=0.05,
        muon_weight_decay=0.01,
    )
    model = build()
    opt = Optimizers(model, cfg, total_steps=10, device_type="cpu")
    for step in range(3):
        train_step(model, opt, step)

    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = through_disk(opt.state_dict())

    resumed = build(seed=123)  # different init: everything must come from the saved state
    resumed.load_state_dict(saved_model)
    resumed_opt = Optimizers(resumed, cfg, total_steps=10, device_type="cpu")
    resumed_opt.load_state_dict(saved_opt)

    for step in range(3, 5):
        train_step(model, opt, step)
        train_step(resumed, resumed_opt, step)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n

    # without the optimizer state the same steps differ (the test can fail)
    fresh = build(seed=123)
    fresh.load_state_dict(saved_model)
    fresh_opt = Optimizers(fresh, cfg, total_steps=10, device_type="cpu")
    for step in range(3, 5):
        train_step(fresh, fresh_opt, step)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize(("impl", "kind"), [("torch", "Muon"), ("batched", "BatchedMuon")])
def test_state_dict_is_plain_data(impl, kind):
    model = build()
    opt = Optimizers(model, OptimConfig(name="muon", muon_impl=impl), total_steps=4, device_type="cpu")
    train_step(model, opt, 0)
    sd = opt.state_dict()
    assert sd["kinds"] == [kind, "AdamW"]
    _split(sd, {}, "opt")  # asserts every leaf is a tensor or a JSON scalar
    muon_state = sd["optimizers"][0]
    assert muon_state["param_groups"][0]["param_names"][0] == "blocks.0.attn.q_proj.weight"
    assert all(set(s) == {"momentum_buffer"} for s in muon_state["state"].values())


def test_load_state_dict_rejects_another_run():
    model = build()
    opt = Optimizers(model, OptimConfig(name="muon"), total_steps=4, device_type="cpu")
    train_step(model, opt, 0)
    adamw = Optimizers(build(), OptimConfig(name="adamw"), total_steps=4, device_type="cpu")
    with pytest.raises(TrainerError, match="this run uses"):
        adamw.load_state_dict(opt.state_dict())
    other = Optimizers(build(dataclasses.replace(SMALL, mlp="swiglu")), OptimConfig(), 4, "cpu")
    with pytest.raises(TrainerError, match="other parameters"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_on_cuda_and_resume_on_the_cpu():
    model = build().cuda()
    opt = Optimizers(model, OptimConfig(name="muon"), total_steps=6, device_type="cuda")
    assert all(g["fused"] for g in opt.optimizers[-1].param_groups)
    for step in range(2):
        train_step(model, opt, step)
    saved_model = {k: v.cpu() for k, v in model.state_dict().items()}
    saved_opt = through_disk(opt.state_dict())

    cpu_model = build(seed=1)
    cpu_model.load_state_dict(saved_model)
    cpu_opt = Optimizers(cpu_model, OptimConfig(name="muon"), total_steps=6, device_type="cpu")
    cpu_opt.load_state_dict(saved_opt)
    groups = cpu_opt.optimizers[-1].param_groups
    assert all(g["foreach"] and not g["fused"] for g in groups)  # this machine's execution flags are kept
    state = cpu_opt.optimizers[-1].state[cpu_model.embed.weight]
    assert state["exp_avg"].device.type == "cpu" and state["step"].item() == 2
    train_step(cpu_model, cpu_opt, 2)
    train_step(model, opt, 2)
    for a, b in zip(model.parameters(), cpu_model.parameters()):
        assert torch.allclose(a.cpu(), b, atol=1e-3)  # the same step on two devices, up to bf16 Newton-Schulz
