"""The fast step's parts: attention-kernel choice, the batch prefetcher, and a step without host syncs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers import tiny_model_config

from trainer.config import TrainConfig, load_config
from trainer.data.dataset import batch_at
from trainer.distributed import DistInfo
from trainer.errors import TrainerError
from trainer.model import LLM
from trainer.optim import Optimizers
from trainer.step import BatchPrefetcher, Stepper, autocast_factory, sdpa_context

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# attention kernels


def loss_and_grads(
    backend: str, dtype: str, device: torch.device = CPU
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LLM(tiny_model_config()).to(device)  # GQA: 4 query heads over 2 key/value heads
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast_factory(device, dtype, backend)():
        loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_results(backends: list[str], dtype: str, tol: float, device: torch.device = CPU) -> None:
    ref_loss, ref_grads = loss_and_grads("math", dtype, device)
    for backend in backends:
        loss, grads = loss_and_grads(backend, dtype, device)
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        for name, g in grads.items():
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(
                g, ref_grads[name], rtol=0, atol=tol * scale, msg=lambda m, n=name, b=backend: f"{b} {n}: {m}"
            )


# How far two attention kernels may put the loss and each gradient (as a fraction of its largest entry). They
# share every other operation and differ inside attention, where the math kernel rounds the scores, the softmax
# and the output in the compute dtype and flash accumulates in float32. float32: at most 4 accumulations (scores,
# softmax sum, values, and their gradients) over at most T = 32 terms, each within 32 * 2**-24 of the summed
# magnitudes: 4 * 32 * 2**-24 = 7.6e-6, so 1e-5. bfloat16: a score rounded by 2**-8 |s| (|s| <= sqrt(8) for
# unit-RMS q and k of dimension 8) moves its softmax weight by up to 2 * 2.8 * 2**-8; with the softmax, output and
# three backward roundings of 2**-8 each, about 12 * 2**-8 = 0.047 of the gradient's scale. A wrong mask or GQA
# head mapping changes the gradients by their whole size.
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 12 * 2**-8)])
def test_the_kernel_choice_does_not_change_the_results(dtype, tol):
    """On the CPU the choice is between flash and math; every setting gives math's loss and gradients."""
    assert_same_results(["auto", "default", "flash"], dtype, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_kernel_choice_does_not_change_the_results_on_cuda():
    """bf16 on CUDA: auto (cuDNN first), default and flash against math; cuDNN and memory-efficient
    attention where they take these inputs (GQA via enable_gqa may leave them out: then they raise)."""
    device = torch.device("cuda")
    assert_same_results(["auto", "default", "flash"], "bfloat16", 12 * 2**-8, device)  # derived above
    for backend in ("cudnn", "efficient"):
        try:
            assert_same_results([backend], "bfloat16", 12 * 2**-8, device)
        except RuntimeError as e:  # "No available kernel": this kernel cannot take GQA inputs here
            assert "kernel" in str(e).lower(), e


def test_flash_and_math_are_both_used_on_the_cpu():
    """The comparison above compares two kernels: forcing one that cannot run is an error, not a fallback."""
    q = k = v = torch.randn(1, 2, 8, 4)
    for backend in ("flash", "math"):
        with sdpa_context(backend, CPU)():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with pytest.raises(RuntimeError):  # the efficient kernel exists on CUDA only
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_cuda_only_kernels_are_refused_on_the_cpu_naming_the_key():
    for backend in ("cudnn", "efficient"):
        with pytest.raises(TrainerError, match=f"train.sdpa_backend='{backend}' is a CUDA kernel"):
            sdpa_context(backend, CPU)
    assert sdpa_context("default", CPU) is contextlib.nullcontext
    assert autocast_factory(CPU, "float32", "default") is contextlib.nullcontext


# ----------------------------------------------------------------------------------------------------
# batches


def test_prefetched_batches_are_batch_at(monkeypatch):
    """Prefetched or not, micro-batch m of step s is batch_at(seed, s, m): resume stays exact."""
    tokens = np.arange(5000, dtype=np.uint16) % 317
    cfg = TrainConfig(batch_size=3, seq_len=16, grad_accum=2, seed=4)
    info = DistInfo(rank=1, world_size=2)
    batches = BatchPrefetcher(tokens, cfg, info, CPU)
    batches.ahead = True  # what CUDA does, exercised on the CPU
    order = [(5, 0), (5, 1), (6, 0), (6, 1), (9, 0)]  # (9, 0) was never prefetched: a resume, say
    for i, (step, micro) in enumerate(order):
        x, y = batches.get(step, micro)
        ex, ey = batch_at(
            tokens, seed=4, step=step, micro=micro, batch_size=3, seq_len=16, rank=1, world_size=2
        )
        assert torch.equal(x, ex) and torch.equal(y, ey), (step, micro)
        if i + 1 < len(order) and order[i + 1] == batches.following(step, micro):
            batches.prefetch(step, micro)
            assert batches._next is not None and batches._next[0] == order[i + 1]
    assert batches.following(5, 1) == (6, 0) and batches.following(5, 0) == (5, 1)


def test_nothing_is_prepared_ahead_on_the_cpu():
    batches = BatchPrefetcher(
        np.arange(500, dtype=np.uint16), TrainConfig(batch_size=2, seq_len=8), DistInfo(), CPU
    )
    batches.prefetch(0, 0)
    assert batches._next is None


# ----------------------------------------------------------------------------------------------------
# a step that does not wait for the device


def stepper(deferred: bool, tokens: np.ndarray, poison_at: int | None = None) -> Stepper:
    cfg = load_config(
        "tiny",
        [
            "model.vocab_size=64",
            "model.d_model=32",
            "model.n_layers=1",
            "train.batch_size=2",
            "train.seq_len=16",
            "train.grad_accum=2",
        ],
    )
    torch.manual_seed(0)
    model = LLM(cfg.model, loss_chunk_tokens=8)
    if poison_at is not None:
        forward, calls = model.forward, {"n": 0}

        def poisoned(idx, targets=None):
            calls["n"] += 1
            out = forward(idx, targets)
            return out * float("nan") if calls["n"] == poison_at else out

        model.forward = poisoned
    opt = Optimizers(model, cfg.optim, total_steps=20, device_type="cpu")
    return Stepper(
        model, model, opt, tokens, cfg, device=CPU, autocast=autocast_factory(CPU, "float32"), info=DistInfo(),
        deferred=deferred,
    )  # fmt: skip


class HostReads:
    """Counts reads of a tensor's value by the host (``item``, ``float``, ``bool``, ``tolist``...)."""

    METHODS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")

    def __init__(self, monkeypatch, ignore: set[int]):
        self.calls: list[str] = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original, **kwargs):
                if id(t) not in ignore:
                    self.calls.append(_name)
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def host_reads_during_steps(step: Stepper, steps: range, monkeypatch) -> list[str]:
    # AdamW's foreach path reads its step counters (CPU tensors on every device); nothing else may be read
    counters = {id(s["step"]) for o in step.optimizers.optimizers for s in o.state.values() if "step" in s}
    with monkeypatch.context() as m:
        reads = HostReads(m, ignore=counters)
        for s in steps:
            step(s)
    return reads.calls


def test_a_deferred_step_reads_nothing_back_until_results(monkeypatch):
    tokens = np.arange(4000, dtype=np.uint16) % 64
    step = stepper(deferred=True, tokens=tokens)
    step(0)  # creates the optimizer state
    assert [d for d, _, _ in step.results()] == [1]
    assert host_reads_during_steps(step, range(1, 4), monkeypatch) == []
    assert step.results(read=False) == []
    done = step.results(read=True)
    assert [d for d, _, _ in done] == [2, 3, 4] and all(np.isfinite([loss, g]).all() for _, loss, g in done)
    # the counter does see reads: a step that checks at once reads its loss and norm
    immediate = stepper(deferred=False, tokens=tokens)
    immediate(0)
    assert host_reads_during_steps(immediate, range(1, 2), monkeypatch) == ["__bool__"]


def test_deferred_and_immediate_steps_compute_the_same_run():
    tokens = np.arange(4000, dtype=np.uint16) % 64
    deferred, immediate = stepper(True, tokens), stepper(False, tokens)
    seen = []
    for s in range(4):
        deferred(s)
        immediate(s)
        seen += immediate.results(read=False)  # not deferred: every call reads
    assert seen == deferred.results()
    for a, b in zip(deferred.model.parameters(), immediate.model.parameters()):
        assert torch.equal(a, b)


def test_a_non_finite_step_is_skipped_when_read_at_once_and_applied_when_deferred():
    tokens = np.arange(4000, dtype=np.uint16) % 64
    for deferred in (False, True):
        step = stepper(deferred, tokens, poison_at=3)  # the first micro-batch of update 1
        step(0)
        before = [p.detach().clone() for p in step.model.parameters()]
        step(1)
        _, (d, loss, _) = step.results()
        assert d == 2 and np.isnan(loss)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, step.model.parameters()))
        assert unchanged is not deferred


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_device_sync_between_log_steps_on_cuda(tiny_data_dir, tiny_vocab):
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronising call: steps 2-5 must make none."""
    from trainer.data.dataset import TokenDataset

    device = torch.device("cuda")
    cfg = load_config(
        "tiny",
        [f"model.vocab_size={tiny_vocab}", "train.batch_size=4", "train.seq_len=64", "train.compile=false"],
    )
    torch.manual_seed(0)
    model = LLM(cfg.model, loss_chunk_tokens=cfg.train.loss_chunk_tokens).to(device)
    opt = Optimizers(model, cfg.optim, total_steps=10, device_type="cuda")
    step = Stepper(
        model, model, opt, TokenDataset.open(tiny_data_dir).split("train"), cfg, device=device,
        autocast=autocast_factory(device, "auto", cfg.train.sdpa_backend), info=DistInfo(),
    )  # fmt: skip
    assert step.deferred
    step(0)  # first calls: allocator, optimizer state, compilation of the Newton-Schulz
    step(1)
    step.results()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(2, 6):
            step(s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [d for d, _, _ in step.results()] == [3, 4, 5, 6]
