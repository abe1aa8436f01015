#!/usr/bin/env bash
# The demo on the embedded offline default: prepare the Bible corpus (Basic English + King James mix),
# train the `tiny` preset in the four configurations {muon, adamw} x {QK-norm learned, none} with dense
# checkpoints (plan+log, about 40, for phase detection), extract the Q/K spectra of every checkpoint, print
# the participation-ratio table, run pruning surgery on each final checkpoint, score the final checkpoints on
# local lm-eval tasks cut from the held-out test split, and write the report. Re-running it continues where
# it stopped (finished steps are skipped).
# Environment: DEMO_DIR (default demo), DEMO_TOKENS (training tokens per run, default the preset's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh eval   # lm-eval for the downstream evals
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
            --set optim.name="$optim" --set model.qk_norm="$qk" \
            --set train.milestones=plan+log --set train.n_log_milestones=48 "${resume[@]}"
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

# downstream evals: a cloze and a four-way choice task from the held-out test split (near chance at this size)
if [ ! -f "$DEMO_DIR/tasks/bible_mix_choice.yaml" ]; then
    collapse-spectra eval-tasks "$DATA" -o "$DEMO_DIR/tasks"
fi
collapse-spectra eval "$DEMO_DIR/runs" --tasks bible_mix_cloze,bible_mix_choice \
    --include-path "$DEMO_DIR/tasks" --num-fewshot bible_mix_choice=10

collapse-spectra report "${runs[@]}" -o "$DEMO_DIR/report"
