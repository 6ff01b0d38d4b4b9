#!/usr/bin/env bash
# The leaderboard of the README: `featlift compare` for the real DINOv2 ViT-S/14 of ../shared over featlift's
# references (the tokens, bilinear, one and two passes of the shipped LiFT, the backbone on a 2x input), the shipped
# NAF and the official JAFAR, AnyUp and FeatUp-JBU checkpoints, joined (--include) by the cells of methods whose
# checkpoints are not shipped (benchmarks/compare_results/dinov2-uplift, dinov2-operators), at the settings of
# eval_peers.sh (224 px, every upsampler at 64x64; DAVIS-2016 the first 6 frames of each sequence; warp 20 ImageNet images + the stereo pair; VOC probe 120 train /
# 60 val, CamVid probe 60 / 30, 20 epochs; the VOC probe also under the CPU protocol), one thread.
# The cells cache (OUT/cells) is resumable: a killed run, or a later session, computes only the missing cells.
# Usage: benchmarks/compare_dinov2.sh [OUT_DIR]   (default benchmarks/compare_results/dinov2)
# Knobs: SHARED (default ../shared), PYTHON, THREADS (default 1), METHODS (override the list), TASKS,
# INCLUDE (comma-separated compare folders to join; default the UPLiFT and operator runs; INCLUDE= joins none).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/compare_results/dinov2}
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared}
PEERS=$OUT/checkpoints  # imported official checkpoints: git-ignored (../shared holds the originals)
mkdir -p "$PEERS"
for peer in "jafar jafar_vit_small_patch14_dinov2.lvd142m.pth" "anyup anyup_paper.pth" \
    "featup featup_jbu_dinov2_cocostuff.ckpt"; do
    read -r method file <<< "$peer"
    [[ -f "$PEERS/$method/config.json" ]] ||
        "$PYTHON" -m featlift import-peer "$method" "$SHARED/weights/peers/$file" --out "$PEERS/$method"
done
DEFAULT_METHODS="none,bilinear:size=64x64,lift,lift:iters=2,input-2x,naf:size=64x64"
DEFAULT_METHODS+=",jafar:$PEERS/jafar:size=64x64,anyup:$PEERS/anyup:size=64x64,featup-jbu:$PEERS/featup:size=64x64"
METHODS=${METHODS:-$DEFAULT_METHODS}
TASKS=${TASKS:-davis,warp,probe-camvid,probe-voc,probe-voc@cpu}
INCLUDE=${INCLUDE-benchmarks/compare_results/dinov2-uplift,benchmarks/compare_results/dinov2-operators}
INCLUDES=()
IFS=, read -ra folders <<< "$INCLUDE"
for folder in "${folders[@]}"; do  # never the output folder itself
    [[ "$folder" -ef "$OUT" ]] || INCLUDES+=(--include "$folder")
done
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
SETTINGS=(davis.max_frames=6 warp.limit=20 warp.stereo=true
    probe-voc.limit_train=120 probe-voc.limit_val=60 probe-voc.epochs=20
    probe-voc@cpu.limit_train=120 probe-voc@cpu.limit_val=60 probe-voc@cpu.epochs=20
    probe-camvid.limit_train=60 probe-camvid.limit_val=30 probe-camvid.epochs=20)
SETS=()
for setting in "${SETTINGS[@]}"; do  # only the selected tasks' (compare refuses settings of other tasks)
    [[ ",$TASKS," == *",${setting%%.*},"* ]] && SETS+=(--set "$setting")
done
start=$SECONDS
"$PYTHON" -m featlift compare --weights "$SHARED/weights/vit_small_patch14_dinov2.imgfocus.safetensors" \
    --device cpu --methods "$METHODS" --tasks "$TASKS" --data-root "$SHARED/data" --out "$OUT" "${SETS[@]}" "${INCLUDES[@]}"
echo "compare_dinov2.sh: $((SECONDS - start)) s"
