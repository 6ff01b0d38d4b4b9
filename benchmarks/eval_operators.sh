#!/usr/bin/env bash
# The dynamic operators CARAFE, SAPA, FADE and DySample trained as featlift upsamplers for DINOv2 ViT-S/14 under
# the shipped LiFT's budget and objective (LiFT's 2x self-supervised objective, 8 epochs, S = 448, batch 8, seed 0,
# the 630/70 split of ../shared/data/imagenet-sample; the feature cache of the shipped LiFT's views serves them
# all), then DAVIS-2016 and warp next to bilinear and LiFT at the settings of eval_peers.sh (224 px, every
# upsampler at 64x64 = two 2x passes; DAVIS: the first 6 frames of each sequence; warp: 20 images + the pair).
# Usage: benchmarks/eval_operators.sh [RUNS_DIR] [OUT_DIR]  (defaults runs/operators, benchmarks/operator_eval_results)
# Knobs: SHARED (default ../shared), CACHE (feature cache, default runs/cache), OPERATORS (each NAME or
#   NAME:key=value... with constructor settings, e.g. fade:gating=false; its run folder is the spec with : and = as -),
#   TASKS, PYTHON,
#   BASELINES (the variants beside them, default bilinear:size=64x64,lift:iters=2; empty for none).
# A run folder that exists is resumed (a finished one is left as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-runs/operators}
OUT=${2:-benchmarks/operator_eval_results}
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared}
CACHE=${CACHE:-runs/cache}
OPERATORS=${OPERATORS:-dysample carafe sapa fade}
WEIGHTS="$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors"
VARIANTS=${BASELINES-bilinear:size=64x64,lift:iters=2}
for op in $OPERATORS; do
    RUN="$RUNS/$(tr ':=' '--' <<<"$op")"
    RESUME=()
    if [[ -d "$RUN" ]]; then RESUME=(--resume); fi  # a finished run: "nothing to do"; an interrupted one goes on
    OMP_NUM_THREADS=${THREADS:-1} "$PYTHON" -m featlift train "$SHARED/data/imagenet-sample" --weights "$WEIGHTS" \
        --upsampler "$op" --out "$RUN" --epochs 8 --batch-size 8 --image-size 448 --val-fraction 0.1 \
        --seed 0 --cache "$CACHE" --device cpu --no-progress "${RESUME[@]}"
    VARIANTS+="${VARIANTS:+,}${op%%:*}:$RUN:iters=2"
done
export THREADS=${THREADS:-1} SHARED PYTHON
VARIANTS="$VARIANTS" TASKS="${TASKS:-davis warp}" DAVIS_FRAMES=6 WARP_IMAGES=20 bash benchmarks/eval_tasks.sh "$OUT"
