#!/usr/bin/env bash
# The demo on the embedded offline default: prepare the Bible corpus (Basic English + King James mix),
# train the `tiny` preset in the four configurations {muon, adamw} x {QK-norm learned, none}, extract the
# Q/K spectra of every checkpoint, print the participation-ratio table, run pruning surgery on each final
# checkpoint and write the report. Re-running it continues where it stopped (finished steps are skipped).
# Environment: DEMO_DIR (default demo), DEMO_TOKENS (training tokens per run, default the preset's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
DEMO_DIR=${DEMO_DIR:-demo}
DATA="$DEMO_DIR/data/bible-mix"
TOKENS_OPT=()
if [ -n "${DEMO_TOKENS:-}" ]; then TOKENS_OPT=(--tokens "$DEMO_TOKENS"); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -f "$DATA/meta.json" ]; then
    collapse-train prepare-data --out "$DATA"   # fixed eval batch: 8 x 512 tokens, the tiny preset's context
fi

runs=()
for optim in muon adamw; do
    for qk in learned none; do
        run="$DEMO_DIR/runs/tiny-${optim}-qk_${qk}"
        runs+=("$run")
        resume=()
        if [ -d "$run" ]; then resume=(--resume); fi
        collapse-train run tiny --data "$DATA" --out "$run" "${TOKENS_OPT[@]}" \
            --set optim.name="$optim" --set model.qk_norm="$qk" "${resume[@]}"
        collapse-spectra extract "$run"
    done
done

collapse-spectra metrics "${runs[@]/%//spectra.nc}" --metric pr_sv

for run in "${runs[@]}"; do
    final=$(ls "$run"/checkpoints/tokens_*.safetensors | sort | tail -n 1)
    if [ ! -f "$run/surgery.nc" ]; then
        collapse-spectra surgery "$final" --data "$DATA" --seeds 3 --fractions 0,0.25,0.5,0.75 --test-tokens 16384
    fi
done

collapse-spectra report "${runs[@]}" -o "$DEMO_DIR/report"
