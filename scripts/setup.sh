#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, idempotently.
# torch is installed first and pinned, so that pip never resolves a multi-GB CUDA build for it.
# Usage: source scripts/setup.sh [extras]   (comma-separated: "dev" for the test tools, "hf" for public models,
#        "eval" for lm-eval, "slurm" for the SLURM executor, "tensorboard" for TensorBoard scalars,
#        "dask" for lazy many-cube reading; "dev,hf,eval,slurm,tensorboard,dask" is what scripts/test.sh installs)
# A stamp in .venv records what was installed (pyproject.toml's hash and the extras): when it matches, pip is
# not run again, so re-running the demo or the tests starts at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ -n "${1:-}" ]; then spec=".[${1}]"; else spec="."; fi
stamp=".venv/.collapse-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==2.13.0 $spec"
# an install with more extras also serves a request for fewer: "dev,hf" is covered by "dev,hf,eval,slurm,tensorboard,dask"
covered=false
if [ -f "$stamp" ]; then
    read -r have_hash have_torch have_spec < "$stamp" || true
    if [ "$have_hash $have_torch" = "$(echo "$want" | cut -d' ' -f1-2)" ]; then
        covered=true
        for extra in $(echo "${1:-}" | tr ',' ' '); do
            case ",${have_spec#.[}" in *",${extra}]"* | *",${extra},"*) ;; *) covered=false ;; esac
        done
    fi
fi
if [ "$covered" != true ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
    echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
