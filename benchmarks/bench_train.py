"""Training throughput: tokens/s, peak memory and MFU of the model + optimizers built from a config.

The measured step is the training loop's step without its data pipeline: forward and backward
under the trainer's autocast (``train.dtype``: ``auto`` = bfloat16 on CUDA, float32 on the CPU),
``grad_accum`` micro-batches, gradient clipping, the learning-rate schedule, and the optimizer
step. Tokens are uniform random ids of the model's vocabulary, generated on the device before
timing, so no dataset is needed and the numbers are an upper bound on what a data-fed run reaches.

MFU = tokens/s * ``count_flops_per_token(cfg, seq_len)`` / peak FLOP/s, where the FLOPs per token are
6 N + 12 L d T (PaLM appendix B; N counts every matmul weight, the LM head included). The peak is
``--peak-tflops`` (default 989, an H100 SXM's dense bf16 tensor-core peak, on CUDA; no default on
the CPU, where MFU is printed only if a peak is given).

Examples
--------
::

    python benchmarks/bench_train.py --preset tiny --device cpu --steps 20
    python benchmarks/bench_train.py --preset paper-88m --set model.qk_norm=none --batch-size 16 --compile
    python benchmarks/bench_train.py --preset tiny --set optim.name=adamw --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from trainer.config import RunConfig, load_config
from trainer.distributed import resolve_device
from trainer.errors import TrainerError
from trainer.model import LLM, count_flops_per_token
from trainer.optim import Optimizers, clip_grad_norm
from trainer.train import autocast_factory

H100_BF16_DENSE_TFLOPS = 989.0
N_DATA_BATCHES = 4  # distinct random batches cycled through (enough that no step repeats the previous one)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(
    cfg: RunConfig,
    device: torch.device,
    steps: int,
    warmup: int,
    compile_model: bool,
    peak_tflops: float | None,
) -> dict[str, float | int | str | None]:
    """Run ``warmup`` untimed and ``steps`` timed optimizer steps; return the measurements.

    Returns a dict with ``tokens_per_s``, ``step_ms``, ``peak_memory_bytes`` (CUDA: the allocator's
    peak during the timed steps; CPU: the process's maximum resident set size), ``n_params``,
    ``flops_per_token``, ``mfu`` (``None`` without a peak), and ``loss_first``/``loss_last`` (a
    sanity check that the model trains).
    """
    t = cfg.train
    torch.manual_seed(t.seed)
    model = LLM(cfg.model).to(device)
    n_params = model.num_params()
    opt = Optimizers(model, cfg.optim, total_steps=warmup + steps, device_type=device.type)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer: TF32 for float32 work outside autocast
    step_model = torch.compile(model) if compile_model else model
    autocast = autocast_factory(device, t.dtype)  # the trainer's own precision policy
    autocast_name = (
        "bfloat16" if t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda") else "float32"
    )

    g = torch.Generator(device=device).manual_seed(t.seed)
    shape = (N_DATA_BATCHES, t.grad_accum, t.batch_size, t.seq_len + 1)
    data = torch.randint(0, cfg.model.vocab_size, shape, generator=g, device=device)  # (N, A, B, T+1)

    losses: list[float] = []

    def train_step(step: int) -> None:
        opt.set_lr(step)
        micro = data[step % N_DATA_BATCHES]  # (A, B, T+1)
        total = torch.zeros((), device=device)
        for i in range(t.grad_accum):
            x, y = micro[i, :, :-1], micro[i, :, 1:]  # (B, T) inputs, next-token targets
            with autocast():
                loss = step_model(x, y)
            (loss / t.grad_accum).backward()
            total += loss.detach()
        # both read back to the host every step, as in the training loop (it checks them for divergence)
        clip_grad_norm(model, cfg.optim.grad_clip)
        losses.append(total.item() / t.grad_accum)
        opt.step()
        opt.zero_grad()

    for step in range(warmup):
        train_step(step)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(step)
    _sync(device)
    elapsed = time.perf_counter() - start

    tokens = steps * t.grad_accum * t.batch_size * t.seq_len
    tokens_per_s = tokens / elapsed
    flops_per_token = count_flops_per_token(cfg.model, t.seq_len)
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    mfu = tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "autocast": autocast_name,
        "compile": compile_model,
        "optimizer": cfg.optim.name,
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
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


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
    p.add_argument(
        "--peak-tflops",
        type=float,
        help=f"peak FLOP/s of the device in TFLOP/s for MFU (default: {H100_BF16_DENSE_TFLOPS:g} on CUDA, none on CPU)",
    )
    p.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    return p.parse_args(argv)


def _report(r: dict) -> str:
    mem = r["peak_memory_bytes"] / 2**20
    mem_kind = (
        "torch.cuda.max_memory_allocated" if r["device"].startswith("cuda") else "max RSS of the process"
    )
    mfu = (
        f"{100 * r['mfu']:.2f}% of {r['peak_tflops']:g} TFLOP/s"
        if r["mfu"] is not None
        else "unknown (no --peak-tflops)"
    )
    return "\n".join(
        [
            f"device        {r['device_name']} ({r['device']}), autocast {r['autocast']}, compile {r['compile']}",
            f"model         {r['n_params']:,} parameters, {r['flops_per_token']:,} training FLOPs/token",
            f"batch         {r['batch_size']} x {r['seq_len']} tokens x {r['grad_accum']} accumulation, "
            f"optimizer {r['optimizer']}",
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
    try:
        cfg = load_config(args.preset, overrides)
        device = resolve_device(args.device)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = H100_BF16_DENSE_TFLOPS
    compile_model = cfg.train.compile if args.compile is None else args.compile
    result = benchmark(cfg, device, args.steps, args.warmup, compile_model, peak)
    print(json.dumps(result) if args.json else _report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
