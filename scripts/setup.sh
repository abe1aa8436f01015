#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, idempotently.
# torch is installed first and pinned, so that pip never resolves a multi-GB CUDA build for it.
# Usage: source scripts/setup.sh [extras]   (comma-separated: "dev" for the test tools, "hf" for public models,
#        "eval" for lm-eval, "slurm" for the SLURM executor; "dev,hf,eval,slurm" is what scripts/test.sh installs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
if [ -n "${1:-}" ]; then spec=".[${1}]"; else spec="."; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
export PATH="$PWD/.venv/bin:$PATH"
