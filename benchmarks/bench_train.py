"""Training throughput: tokens/s, peak memory and MFU of the trainer's own step for a config (not a test).

The measured step is the training loop's: ``trainer.step.Stepper`` with the trainer's model (its loss
chunked as ``train.loss_chunk_tokens`` says), optimizers (``optim.muon_impl`` picks the Muon),
forward context (``train.dtype``: ``auto`` = bfloat16 on CUDA, float32 on the CPU; the attention
kernels of ``train.sdpa_backend``), batch prefetcher, gradient clipping and learning-rate schedule.
Its batches are drawn by ``trainer.data.dataset.batch_at`` from a random token array held in memory, so no
dataset is needed. As in the loop on CUDA, the device is read (and waited for) only once per
measurement, after the timed steps; on the CPU every step is read.

MFU = tokens/s * ``count_flops_per_token(cfg, seq_len)`` / peak FLOP/s, where the FLOPs per token are
6 N + 12 L d T (PaLM appendix B; N counts every matmul weight, the LM head included). The peak is
``--peak-tflops``, or with ``--measure-peak`` the measured rate of a large matmul on the device
(:func:`measure_peak_tflops`: bfloat16 on CUDA, float32 on the CPU), which is what the MFU of
``benchmarks/gpu_check.sh`` is relative to.

Examples
--------
::

    python benchmarks/bench_train.py --preset tiny --device cpu --steps 20
    python benchmarks/bench_train.py --preset tiny --set optim.muon_impl=torch --json
    python benchmarks/bench_train.py --preset tiny --variants adamw,muon-torch,muon-batched
    python benchmarks/bench_train.py --preset paper-88m --set model.qk_norm=none --batch-size 32 --measure-peak
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from trainer.config import RunConfig, load_config
from trainer.distributed import DistInfo, resolve_device
from trainer.errors import TrainerError
from trainer.model import LLM, count_flops_per_token
from trainer.optim import Optimizers
from trainer.step import Stepper, autocast_factory

RANDOM_TOKENS = 1 << 22  # the random "train split": 4M tokens, enough that batches do not repeat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, size: int | None = None, repeats: int = 10) -> dict:
    """The measured matmul rate of ``device``: the median of ``repeats`` ``(n, n) @ (n, n)`` products.

    bfloat16 with ``n = 8192`` on CUDA (the dtype the model's matmuls run in under autocast), float32
    with ``n = 2048`` on the CPU. Returns ``{"peak_tflops", "dtype", "size", "repeats"}``; ``2 n^3``
    FLOPs per product.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, clocks
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "peak_tflops": 2 * n**3 / statistics.median(times) / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "size": n,
        "repeats": repeats,
    }


VARIANTS = {
    "adamw": ["optim.name=adamw"],
    "muon-torch": ["optim.name=muon", "optim.muon_impl=torch"],
    "muon-batched": ["optim.name=muon", "optim.muon_impl=batched"],
}
"""``--variants`` names: the optimizer set-ups compared on one compiled model."""


def build_model(cfg: RunConfig, device: torch.device, compile_model: bool) -> tuple[LLM, torch.nn.Module]:
    """The trainer's model for ``cfg`` on ``device`` (seeded), and what the step runs through."""
    torch.manual_seed(cfg.train.seed)
    model = LLM(cfg.model, loss_chunk_tokens=cfg.train.loss_chunk_tokens).to(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer: TF32 for float32 work outside autocast
    return model, torch.compile(model) if compile_model else model


def benchmark(
    cfg: RunConfig,
    device: torch.device,
    steps: int,
    warmup: int,
    compile_model: bool,
    peak_tflops: float | None,
    built: tuple[LLM, torch.nn.Module] | None = None,
) -> dict[str, float | int | str | None]:
    """Run ``warmup`` untimed and ``steps`` timed optimizer steps; return the measurements.

    ``built`` is a :func:`build_model` pair to reuse (its weights are used as they are), so that several
    optimizer set-ups share one compilation. Returns a dict with ``tokens_per_s``, ``step_ms``,
    ``peak_memory_bytes`` (CUDA: the allocator's peak during the timed steps; CPU: the process's maximum
    resident set size), ``n_params``, ``flops_per_token``, ``mfu`` (``None`` without a peak), the
    settings that shape the step, and ``loss_first``/``loss_last`` (a sanity check that the model trains).
    """
    t = cfg.train
    model, step_model = built or build_model(cfg, device, compile_model)
    n_params = model.num_params()
    opt = Optimizers(model, cfg.optim, total_steps=warmup + steps, device_type=device.type)
    autocast = autocast_factory(device, t.dtype, t.sdpa_backend)  # the trainer's own forward context
    autocast_name = (
        "bfloat16" if t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda") else "float32"
    )
    dtype = np.uint16 if cfg.model.vocab_size <= 1 << 16 else np.uint32
    tokens = np.random.default_rng(t.seed).integers(0, cfg.model.vocab_size, RANDOM_TOKENS, dtype=dtype)
    step = Stepper(model, step_model, opt, tokens, cfg, device=device, autocast=autocast, info=DistInfo())

    for s in range(warmup):
        step(s)
    first = step.results()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    timed = step.results()  # on CUDA the one read of the device, as at a log step
    _sync(device)
    elapsed = time.perf_counter() - start
    losses = [loss for _, loss, _ in first + timed]

    tokens_done = steps * t.grad_accum * t.batch_size * t.seq_len
    tokens_per_s = tokens_done / elapsed
    flops_per_token = count_flops_per_token(cfg.model, t.seq_len)
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    mfu = tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "autocast": autocast_name,
        "compile": compile_model,
        "optimizer": cfg.optim.name,
        "muon_impl": cfg.optim.muon_impl if cfg.optim.name == "muon" else None,
        "muon_coefficients": cfg.optim.muon_coefficients if cfg.optim.name == "muon" else None,
        "qk_norm": cfg.model.qk_norm,
        "loss_chunk_tokens": t.loss_chunk_tokens,
        "sdpa_backend": t.sdpa_backend,
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "grad_accum": t.grad_accum,
        "steps": steps,
        "warmup": warmup,
        "n_params": n_params,
        "flops_per_token": flops_per_token,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / steps,
        "peak_memory_bytes": peak_memory,
        "peak_tflops": peak_tflops,
        "mfu": mfu,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }


def benchmark_variants(
    preset: str,
    overrides: list[str],
    variants: list[str],
    device: torch.device,
    steps: int,
    warmup: int,
    compile_model: bool | None,
    peak_tflops: float | None,
) -> list[dict]:
    """:func:`benchmark` for each optimizer set-up of ``variants`` (:data:`VARIANTS`) on one model.

    The model is built and compiled once, its initial weights restored before each set-up, so the
    compilation is paid once (in the first set-up's warm-up) and every set-up starts from the same
    weights. The model's config must not depend on the variant (only ``optim.*`` does).
    """
    cfgs = [load_config(preset, [*overrides, *VARIANTS[v]]) for v in variants]
    compile_model = cfgs[0].train.compile if compile_model is None else compile_model
    built = build_model(cfgs[0], device, compile_model)
    initial = {k: v.clone() for k, v in built[0].state_dict().items()}
    results = []
    for name, cfg in zip(variants, cfgs):
        built[0].load_state_dict(initial)
        result = benchmark(cfg, device, steps, warmup, compile_model, peak_tflops, built=built)
        results.append({"variant": name, **result})
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous set-up's optimizer state is garbage now
    return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="preset name or TOML file (default: tiny)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default: 20)")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first, incl. compilation (default: 5)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile (default: train.compile)",
    )
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: train.seq_len)")
    peak = p.add_mutually_exclusive_group()
    peak.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device in TFLOP/s, for MFU")
    peak.add_argument(
        "--measure-peak", action="store_true", help="measure the peak with a large matmul first, for MFU"
    )
    p.add_argument(
        "--variants",
        help=f"comma-separated optimizer set-ups run on one compiled model, one result each ({', '.join(VARIANTS)}); "
        "default: the config's own",
    )
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON line per result")
    return p.parse_args(argv)


def _report(r: dict) -> str:
    mem = r["peak_memory_bytes"] / 2**20
    mem_kind = (
        "torch.cuda.max_memory_allocated" if r["device"].startswith("cuda") else "max RSS of the process"
    )
    mfu = (
        f"{100 * r['mfu']:.2f}% of {r['peak_tflops']:.3g} TFLOP/s"
        if r["mfu"] is not None
        else "unknown (no --peak-tflops or --measure-peak)"
    )
    optimizer = r["optimizer"] + (f" ({r['muon_impl']}, {r['muon_coefficients']})" if r["muon_impl"] else "")
    return "\n".join(
        [
            f"device        {r['device_name']} ({r['device']}), autocast {r['autocast']}, compile {r['compile']}, "
            f"attention {r['sdpa_backend']}, loss chunks {r['loss_chunk_tokens']}",
            f"model         {r['n_params']:,} parameters, {r['flops_per_token']:,} training FLOPs/token, "
            f"QK-norm {r['qk_norm']}",
            f"batch         {r['batch_size']} x {r['seq_len']} tokens x {r['grad_accum']} accumulation, "
            f"optimizer {optimizer}",
            f"steps         {r['warmup']} warmup + {r['steps']} timed, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
            f"throughput    {r['tokens_per_s']:,.0f} tokens/s ({r['step_ms']:.1f} ms/step)",
            f"peak memory   {mem:,.1f} MiB ({mem_kind})",
            f"MFU           {mfu}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.seq_len is not None:
        overrides.append(f"train.seq_len={args.seq_len}")
    if args.steps <= 0 or args.warmup < 0:
        print("error: --steps must be positive and --warmup non-negative", file=sys.stderr)
        return 1
    variants = args.variants.split(",") if args.variants else []
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown --variants {unknown}; expected some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 1
    try:
        cfg = load_config(args.preset, overrides)
        device = resolve_device(args.device)
        autocast_factory(device, cfg.train.dtype, cfg.train.sdpa_backend)  # a kernel the device lacks
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = measure_peak_tflops(device)["peak_tflops"] if args.measure_peak else args.peak_tflops
    if variants:
        results = benchmark_variants(
            args.preset, overrides, variants, device, args.steps, args.warmup, args.compile, peak
        )
    else:
        compile_model = cfg.train.compile if args.compile is None else args.compile
        results = [benchmark(cfg, device, args.steps, args.warmup, compile_model, peak)]
    for result in results:
        print(json.dumps(result) if args.json else _report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
