"""Extraction time per checkpoint against a bare forward pass of the same batch (not a test).

    python benchmarks/bench_extract.py --preset tiny
    python benchmarks/bench_extract.py --preset paper-88m --seqs 8 --seq-len 512 --repeats 1
    python benchmarks/bench_extract.py --preset paper-88m --device cuda --json

Builds a randomly initialised model of a preset, a random batch, and times (best of ``--repeats``,
after one warm-up):

- ``forward``: ``model(ids)`` under ``torch.no_grad()``, the full network with its LM head;
- ``capture``: ``spectra.extract.capture.capture_qk`` with a no-op reduction (hooks and copies only;
  the pass stops after the last layer's read-out, so it skips the last MLP and the LM head);
- ``extract``: ``spectra.extract.run.spectra_for_checkpoint``, everything one checkpoint costs in
  ``collapse-spectra extract`` except reading the file.

It also compares the two SVD routes of ``spectra.extract.svd.token_spectra`` on one layer's stacked
activations (all sites, queries and keys): time and largest disagreement with ``numpy.linalg.svd``
relative to each matrix's largest singular value.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from spectra.extract.capture import capture_qk
from spectra.extract.load import Checkpoint, eval_batch_sha256
from spectra.extract.run import spectra_for_checkpoint
from spectra.extract.svd import token_spectra
from trainer.config import load_config
from trainer.model import LLM


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, allocator, first-touch of the weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def svd_routes(model: LLM, ids: torch.Tensor, repeats: int, verbose: bool = True) -> dict[str, float]:
    lq = capture_qk(model, ids, layers=[0])[0]
    stack = torch.cat([*(lq.q[s] for s in lq.sites), *(lq.k[s] for s in lq.sites)])  # (matrices, N, D)
    x64 = stack.double().numpy()
    ref_u = np.linalg.svd(x64, compute_uv=False)
    ref_c = np.linalg.svd(x64 - x64.mean(axis=1, keepdims=True), compute_uv=False)
    if verbose:
        print(
            f"SVD routes on one layer: {stack.shape[0]} matrices of {stack.shape[1]} x {stack.shape[2]}, float64"
        )
    result = {}
    for method in ("qr", "svd"):
        seconds = best_of(lambda m=method: token_spectra(stack, method=m), repeats)
        got = token_spectra(stack, method=method)
        err_u = np.max(np.abs(got.uncentered.numpy() - ref_u) / ref_u[:, :1])
        err_c = np.max(np.abs(got.centered.numpy() - ref_c) / ref_c[:, :1])
        result.update({f"{method}_ms": seconds * 1e3, f"{method}_max_rel_error": float(max(err_u, err_c))})
        if verbose:
            print(
                f"  {method:>3}: {seconds * 1e3:8.1f} ms   max |error| / sigma_1 vs numpy: {err_u:.1e} (uncentred), {err_c:.1e} (centred)"
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="trainer preset (tiny, paper-88m, ...)")
    parser.add_argument("--seqs", type=int, default=8, help="sequences in the batch")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="tokens per sequence (capped at the context)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run_cfg = load_config(args.preset)
    cfg = run_cfg.model
    seq_len = min(args.seq_len, cfg.context_length)
    torch.manual_seed(0)
    model = LLM(cfg).to(args.device).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.seqs, seq_len))
    ckpt = Checkpoint(
        path=Path(f"<random {args.preset}>"),
        model=model,
        model_config=cfg,
        run_config=run_cfg.to_dict(),
        metadata={
            "model_config": json.dumps(run_cfg.to_dict()["model"], sort_keys=True),
            "run_config": run_cfg.to_json(),
        },
        step=0,
        tokens=0,
        run_name=args.preset,
        eval_batch_sha256=eval_batch_sha256(ids),
        data_dir=None,
    )
    dev_ids = ids.to(args.device)

    def forward() -> None:
        with torch.no_grad():
            model(dev_ids)
        if dev_ids.is_cuda:
            torch.cuda.synchronize()

    def capture() -> None:
        capture_qk(model, ids, reduce=lambda lq: None)
        if dev_ids.is_cuda:
            torch.cuda.synchronize()

    description = (
        f"preset {args.preset}: {model.num_params() / 1e6:.1f}M parameters, {cfg.n_layers} layers, "
        f"heads {cfg.n_heads}/{cfg.n_kv_heads}, head_dim {cfg.resolved_head_dim}; batch {args.seqs} x {seq_len} "
        f"= {args.seqs * seq_len} tokens; device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    if not args.json:
        print(description)
    t_forward = best_of(forward, args.repeats)
    t_capture = best_of(capture, args.repeats)
    t_extract = best_of(lambda: spectra_for_checkpoint(ckpt, ids, device=args.device), args.repeats)
    if args.json:
        result = {
            "preset": args.preset,
            "device": args.device,
            "seqs": args.seqs,
            "seq_len": seq_len,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "forward_s": t_forward,
            "capture_s": t_capture,
            "extract_s": t_extract,
            "ratio": t_extract / t_forward,
            "svd_routes": svd_routes(model, ids, args.repeats, verbose=False),
        }
        print(json.dumps(result))
        return
    print(f"forward pass (full model, LM head): {t_forward:8.3f} s")
    print(f"capture only (no SVD):              {t_capture:8.3f} s")
    print(f"extraction per checkpoint:          {t_extract:8.3f} s")
    print(f"ratio extraction / forward:         {t_extract / t_forward:8.2f}x")
    svd_routes(model, ids, args.repeats)


if __name__ == "__main__":
    main()
