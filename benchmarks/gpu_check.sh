#!/usr/bin/env bash
# One prepared check of the GPU path, in under eight minutes: the device, a measured bf16 matmul peak,
# the gpu-marked tests, paper-88m training throughput (adamw, torch.optim.Muon and the batched Muon,
# QK-norm learned/none, batch 32 and 16 x 2048, MFU against the measured peak, peak memory), extraction
# against a bare forward pass, and a 1-process torchrun NCCL run. Every figure goes to one JSON file.
# On a machine without CUDA it runs end to end too: each CUDA-only part prints that it is skipped and
# the same plumbing runs at CPU scale. What each part does: benchmarks/gpu_check.py and docs/benchmarks.md.
#
# Usage:   bash benchmarks/gpu_check.sh [OUTPUT.json] [gpu_check.py options, e.g. --budget-s 600]
# Output:  OUTPUT.json, else $OUT/gpu_check.json when $OUT is set, else ./gpu_check.json
# Python:  $PYTHON, else .venv/bin/python when it exists, else python3 (it needs this package and a
#          CUDA build of torch installed: see docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out="${OUT:-.}/gpu_check.json"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out="$1"; shift; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case "$PYTHON" in */*) PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH"; export PATH ;; esac
exec "$PYTHON" benchmarks/gpu_check.py --out "$out" "$@"
