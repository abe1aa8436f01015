"""Muon optimizer-step time: ``torch.optim.Muon`` against ``trainer.muon.BatchedMuon`` (not a test).

    python benchmarks/bench_muon.py                          # tiny and paper-88m matrices, on the CPU
    python benchmarks/bench_muon.py --device cuda --json     # on a GPU (the batched Newton-Schulz compiled)

For each preset, the hidden matrices that the trainer gives to Muon (``trainer.optim.param_groups``:
every ``nn.Linear`` weight in the blocks, 132 of them in ``paper-88m``) are built on the device with
random gradients, and one optimizer step of each implementation is timed: ``--repeats`` steps after
``--warmup`` untimed ones (the first compiles), the two implementations taking turns, the device
synchronised around each step, the median reported. Both implementations take the trainer's hyperparameters (``optim.muon_*`` of the preset,
``adjust_lr_fn="original"``). ``--compile`` decides whether the batched Newton-Schulz is compiled;
by default it is on CUDA and not on the CPU, as in the trainer. The largest difference between the
two implementations' updated weights after the timed steps is printed, beside the largest change of a
weight, as a check that they compute the same thing: both orthogonalise in bfloat16, so the difference is a
small fraction of the change, not zero.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from trainer.config import load_config
from trainer.distributed import resolve_device
from trainer.errors import TrainerError
from trainer.model import LLM
from trainer.muon import BatchedMuon, shape_groups
from trainer.optim import MUON_ADJUST_LR_FN, param_groups


def hidden_shapes(preset: str) -> list[tuple[int, int]]:
    """Shapes of the matrices the trainer gives to Muon for ``preset`` (counted on the meta device)."""
    cfg = load_config(preset, ["optim.name=muon"])
    with torch.device("meta"):
        model = LLM(cfg.model)
    return [tuple(p.shape) for _, p in param_groups(model, cfg.optim)["muon"]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    opts: dict[str, torch.optim.Optimizer], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` timed ``step()`` calls of every optimizer, after ``warmup`` untimed ones.

    The optimizers take turns, in alternating order, so that a change in the machine's load (the CPU
    figures come from a shared machine) falls on both alike.
    """
    times: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            opts[name].step()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def benchmark(preset: str, device: torch.device, warmup: int, repeats: int, compile_ns: bool) -> dict:
    """Both implementations' step times on ``preset``'s hidden matrices; see the module docstring."""
    optim = load_config(preset).optim
    shapes = hidden_shapes(preset)
    g = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(s, generator=g, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g, device=device) for s in shapes]
    hyper = dict(
        lr=optim.muon_lr,
        weight_decay=optim.muon_weight_decay,
        momentum=optim.muon_momentum,
        nesterov=optim.muon_nesterov,
        ns_steps=optim.muon_ns_steps,
        adjust_lr_fn=MUON_ADJUST_LR_FN,
    )
    result: dict = {
        "preset": preset,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matrices": len(shapes),
        "parameters": sum(a * b for a, b in shapes),
        "shape_groups": len(shape_groups(weights)),
        "compiled": compile_ns,
        "warmup": warmup,
        "repeats": repeats,
    }
    params = {impl: [torch.nn.Parameter(w.clone()) for w in weights] for impl in ("torch", "batched")}
    for impl in params:
        for p, gr in zip(params[impl], grads):
            p.grad = gr.clone()
    opts = {
        "torch": torch.optim.Muon(params["torch"], **hyper),
        "batched": BatchedMuon(
            params["batched"], **hyper, coefficients=optim.muon_coefficients, compile=compile_ns
        ),
    }
    times = time_steps(opts, device, warmup, repeats)
    for impl, t in times.items():
        result[f"{impl}_ms"] = 1000 * statistics.median(t)
        result[f"{impl}_ms_min"] = 1000 * min(t)
    result["speedup"] = result["torch_ms"] / result["batched_ms"]
    result["max_weight_difference"] = max(
        (a - b).abs().max().item() for a, b in zip(params["torch"], params["batched"])
    )
    # the scale of that difference: bfloat16 Newton-Schulz rounds the updates, not the weights
    result["max_weight_change"] = max((a - w).abs().max().item() for a, w in zip(params["torch"], weights))
    return result


def _report(r: dict) -> str:
    return (
        f"{r['preset']:>10}  {r['matrices']} matrices ({r['parameters'] / 1e6:.1f}M parameters, "
        f"{r['shape_groups']} shapes) on {r['device_name']} ({r['threads']} threads)\n"
        f"            torch.optim.Muon {r['torch_ms']:9.2f} ms/step   "
        f"BatchedMuon{' (compiled)' if r['compiled'] else ''} {r['batched_ms']:9.2f} ms/step   "
        f"speed-up {r['speedup']:.2f}x   (median of {r['repeats']}; max |weight difference| "
        f"{r['max_weight_difference']:.1e} of a max |weight change| {r['max_weight_change']:.1e})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", help="preset (repeatable; default: tiny and paper-88m)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the batched Newton-Schulz (default: on CUDA only, as the trainer)",
    )
    p.add_argument("--json", action="store_true", help="one JSON line per preset")
    args = p.parse_args(argv)
    if args.repeats <= 0 or args.warmup < 0:
        print("error: --repeats must be positive and --warmup non-negative", file=sys.stderr)
        return 1
    try:
        device = resolve_device(args.device)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    compile_ns = device.type == "cuda" if args.compile is None else args.compile
    for preset in args.preset or ["tiny", "paper-88m"]:
        r = benchmark(preset, device, args.warmup, args.repeats, compile_ns)
        print(json.dumps(r) if args.json else _report(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
