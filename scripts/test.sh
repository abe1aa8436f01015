#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, import contracts, docs build, pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh dev,hf,eval,slurm,tensorboard,dask   # the optional integrations the tests exercise: transformers, lm-eval, submitit, tensorboard, dask
echo "== ruff"; ruff check trainer spectra cli tests benchmarks
echo "== import contracts"; lint-imports
echo "== docs"; NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
# a one-node SLURM for tests/test_slurm_cluster.py, where it can be had (root on Debian, as CI runs); one line
# either way, and never a failure here: without a cluster those tests skip and say why (-rs)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then echo "== slurm"; bash scripts/slurm-up.sh || true; fi
echo "== pytest"; OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} pytest -q -rs "$@"
