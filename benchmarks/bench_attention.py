"""Attention kernels: forward + backward time of each ``train.sdpa_backend`` at a model's shapes (not a test).

    python benchmarks/bench_attention.py --preset paper-88m --device cuda --batch-size 32
    python benchmarks/bench_attention.py --preset tiny --device cpu --json

Times ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=...)`` and its backward on
random (B, H, T, D) queries and (B, Hkv, T, D) keys and values of the preset's shapes (one layer), under
``trainer.step.sdpa_context`` for every setting: the median of ``--repeats`` after ``--warmup``. A kernel
that cannot take the inputs on this device reports the error instead of a time, so the output shows
which kernel ``auto`` can fall through to (``auto`` takes the first of cuDNN, flash, efficient, math that
runs). The largest difference of each output and gradient from the math kernel's, as a fraction of that
tensor's largest entry, is printed as a check.

With grouped-query attention the model calls SDPA with ``enable_gqa=True``, which (PyTorch's issue
tracker, pytorch/pytorch#181528) only the flash kernel takes; the rows ``<kernel>+expand_kv`` time the
alternative, keys and values repeated to the query heads first (``repeat_interleave``), the input that
lets cuDNN and the memory-efficient kernel run, so that a GPU run shows whether that would pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from trainer.config import load_config
from trainer.distributed import resolve_device
from trainer.errors import TrainerError
from trainer.step import sdpa_context

SETTINGS = ("cudnn", "flash", "efficient", "math", "auto", "default")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(
    preset: str, device: torch.device, batch: int, seq_len: int | None, warmup: int, repeats: int
) -> dict:
    """One row per setting: ``ms`` (forward + backward) and ``max_rel_diff_from_math``, or ``error``."""
    cfg = load_config(preset).model
    T = min(seq_len or cfg.context_length, cfg.context_length)
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, H, T, D, generator=g, device=device, dtype=dtype)  # (B, H, T, D)
    k = torch.randn(batch, Hkv, T, D, generator=g, device=device, dtype=dtype)  # (B, Hkv, T, D)
    v = torch.randn(batch, Hkv, T, D, generator=g, device=device, dtype=dtype)
    grad = torch.randn(batch, H, T, D, generator=g, device=device, dtype=dtype)

    def run(expand: bool) -> tuple[torch.Tensor, ...]:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        if expand:  # (B, Hkv, T, D) -> (B, H, T, D): query head h reads key/value head h // (H / Hkv)
            ke, ve = kk.repeat_interleave(H // Hkv, dim=1), vv.repeat_interleave(H // Hkv, dim=1)
            out = F.scaled_dot_product_attention(qq, ke, ve, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=H != Hkv)
        out.backward(grad)
        return out.detach(), qq.grad, kk.grad, vv.grad

    cases = [(s, False) for s in SETTINGS]
    if H != Hkv:
        cases += [(s, True) for s in ("cudnn", "flash", "efficient")]
    rows: dict[str, dict] = {}
    reference = None
    for setting, expand in sorted(cases, key=lambda c: c != ("math", False)):  # math first: the reference
        name = f"{setting}+expand_kv" if expand else setting
        try:
            context = sdpa_context(setting, device)
            with context():
                outputs = run(expand)
                for _ in range(warmup):
                    run(expand)
                times = []
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    run(expand)
                    _sync(device)
                    times.append(time.perf_counter() - start)
        except (RuntimeError, TrainerError) as e:  # the kernel cannot take these inputs here: say why
            rows[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        reference = reference or outputs
        # relative to each tensor's largest entry: rounding scales with the size of the numbers
        diff = max(
            ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip(outputs, reference)
        )
        rows[name] = {"ms": 1000 * statistics.median(times), "max_rel_diff_from_math": diff}
    return {
        "preset": preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"batch": batch, "heads": H, "kv_heads": Hkv, "seq_len": T, "head_dim": D},
        "repeats": repeats,
        "settings": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="preset whose attention shapes are timed (default: tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences (default: 4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r = benchmark(args.preset, device, args.batch_size, args.seq_len, args.warmup, args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    s = r["shape"]
    print(
        f"{r['preset']} attention on {r['device_name']}, {r['dtype']}: batch {s['batch']}, heads {s['heads']}/"
        f"{s['kv_heads']}, {s['seq_len']} tokens, head dim {s['head_dim']} (forward + backward, one layer)"
    )
    for setting, row in r["settings"].items():
        if "error" in row:
            print(f"  {setting:>9}: cannot run here ({row['error']})")
        else:
            print(
                f"  {setting:>9}: {row['ms']:8.2f} ms   max |difference| from math {row['max_rel_diff_from_math']:.1e}"
                " of the largest entry"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
