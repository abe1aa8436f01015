#!/usr/bin/env bash
# The demo on the embedded offline default, as a study: the six configurations of the plan (A1 ... C2) on the
# Bible corpus (standard: both translations mixed; C1 simple: Basic English; C2 complex: King James; one
# shared tokenizer), 2 seeds each, each configuration's learning rate chosen by a 3-point sweep
# (trainer/study/files/demo.toml: `tiny` at 4 x 256 tokens, 81,920 tokens per main run, 20,480 per sweep run);
# then the spectra of every checkpoint, pruning surgery on each final checkpoint, two local downstream evals
# (a cloze and a 4-way choice task cut from the held-out test text: near chance at this size), and the report.
# Re-running it continues where it stopped; after it finished, it takes seconds.
# Environment: DEMO_DIR (default demo), DEMO_JOBS (runs at a time, default 2), DEMO_WATCH=1 (watch the study as
# it trains: `collapse-train study --watch` measures each main run's checkpoints as they land, on the CPU, and
# writes TensorBoard scalars; in another terminal: tensorboard --logdir demo/study/tensorboard).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WATCH=()
EXTRAS=eval   # lm-eval for the downstream evals
if [ "${DEMO_WATCH:-0}" = 1 ]; then WATCH=(--watch); EXTRAS=eval,tensorboard; fi
source scripts/setup.sh "$EXTRAS"
DEMO_DIR=${DEMO_DIR:-demo}
JOBS=${DEMO_JOBS:-2}
DATA="$DEMO_DIR/data"
STUDY="$DEMO_DIR/study"
REPORT="$DEMO_DIR/report"

# 1. the three datasets, one tokenizer (the fixed eval batch: 8 x 512 tokens of each validation split)
if [ ! -f "$DATA/bible-mix/meta.json" ]; then
    collapse-train prepare-data --out "$DATA/bible-mix" --no-progress
fi
for part in bbe kjv; do
    if [ ! -f "$DATA/bible-$part/meta.json" ]; then
        collapse-train prepare-data --out "$DATA/bible-$part" --source "bible:$part" \
            --tokenizer "$DATA/bible-mix" --no-progress
    fi
done

# 2. the study: sweeps, then 6 configurations x 2 seeds at the chosen learning rates (DEMO_WATCH=1: watched)
collapse-train study demo --out "$STUDY" --data-root "$DATA" --jobs "$JOBS" ${WATCH[@]+"${WATCH[@]}"}

# 3. spectra of every checkpoint of every main run, two runs at a time (nothing left to do after a watch)
collapse-spectra extract "$STUDY" --jobs "$JOBS" --no-progress

# 4. surgery on each final checkpoint (gamma, svd, random x 3 draws; 8,192 test tokens)
for run in "$STUDY"/runs/*/; do
    run=${run%/}
    if [ ! -f "$run/surgery.nc" ]; then
        final=$(ls "$run"/checkpoints/tokens_*.safetensors | sort | tail -n 1)
        collapse-spectra surgery "$final" --seeds 3 --fractions 0,0.25,0.5,0.75 --test-tokens 8192 --no-progress
    fi
done

# 5. downstream evals of each final checkpoint: 200 documents per task, 0-shot (already scored: skipped)
if [ ! -f "$DEMO_DIR/tasks/bible_mix_choice.yaml" ]; then
    collapse-spectra eval-tasks "$DATA/bible-mix" -o "$DEMO_DIR/tasks"
fi
collapse-spectra eval "$STUDY" --tasks bible_mix_cloze,bible_mix_choice --include-path "$DEMO_DIR/tasks" \
    --limit 200 --num-fewshot 0 --no-progress

# 6. the report, unless it is newer than everything it reads
newer=$(find "$STUDY" \( -name spectra.nc -o -name surgery.nc -o -name sweep.json -o -name evals.json \) \
    -newer "$REPORT/report.html" \
    2>/dev/null | head -n 1 || true)
if [ ! -f "$REPORT/report.html" ] || [ -n "$newer" ]; then
    collapse-spectra report "$STUDY" -o "$REPORT"
else
    echo "$REPORT/report.html (up to date)"
fi
