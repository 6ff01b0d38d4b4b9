#!/usr/bin/env bash
# The official JAFAR, AnyUp and FeatUp-JBU checkpoints (and a featlift-trained JAFAR) next to bilinear and LiFT on
# the dense tasks of eval_tasks.sh, on the real DINOv2 ViT-S/14 at 224 px, every upsampler at a 64x64 output
# (4x the 16x16 tokens, the grid of lift:iters=2). Sized to finish in about an hour on a 2-core CPU, one thread:
#   - VOC 2012 probe: the first 120 train / 60 val images of ../shared/data/voc2012, 20 epochs;
#   - warp: 20 ImageNet images + the stereo pair;  DAVIS-2016: the first 6 frames of each sequence;
#   - CamVid probe: the first 60 train / 30 val images, 20 epochs.
# Usage: benchmarks/eval_peers.sh [OUT_DIR]   (default benchmarks/peer_eval_results)
# Knobs: SHARED (default ../shared), PYTHON; TRAINED: featlift-trained checkpoints to add, comma-separated
#   METHOD:FOLDER (e.g. "anyup:runs/anyup,featup-jbu:runs/jbu"; JAFAR_TRAINED=FOLDER adds jafar:FOLDER);
#   ONLY_TRAINED=1 evaluates only those, at the same settings (the other rows are already in OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-benchmarks/peer_eval_results}
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared}
PEERS=$OUT/checkpoints
mkdir -p "$PEERS"
"$PYTHON" -m featlift import-peer jafar "$SHARED/weights/peers/jafar_vit_small_patch14_dinov2.lvd142m.pth" --out "$PEERS/jafar"
"$PYTHON" -m featlift import-peer anyup "$SHARED/weights/peers/anyup_paper.pth" --out "$PEERS/anyup"
"$PYTHON" -m featlift import-peer featup "$SHARED/weights/peers/featup_jbu_dinov2_cocostuff.ckpt" --out "$PEERS/featup"

PEER_VARIANTS="jafar:$PEERS/jafar:size=64x64,anyup:$PEERS/anyup:size=64x64,featup-jbu:$PEERS/featup:size=64x64"
TRAINED_VARIANTS=""
TRAINED=${TRAINED:-}${JAFAR_TRAINED:+${TRAINED:+,}jafar:$JAFAR_TRAINED}
IFS=, read -ra TRAINED_SPECS <<< "$TRAINED"
for spec in "${TRAINED_SPECS[@]}"; do TRAINED_VARIANTS+="${TRAINED_VARIANTS:+,}$spec:size=64x64"; done
if [[ -n "${ONLY_TRAINED:-}" ]]; then
    if [[ -z "$TRAINED_VARIANTS" ]]; then echo "eval_peers.sh: ONLY_TRAINED=1 needs TRAINED=METHOD:FOLDER,..." >&2; exit 2; fi
    VOC_VARIANTS=$TRAINED_VARIANTS OTHER_VARIANTS=$TRAINED_VARIANTS
else
    VOC_VARIANTS="none,bilinear:size=64x64,lift,lift:iters=2,$PEER_VARIANTS${TRAINED_VARIANTS:+,$TRAINED_VARIANTS}"
    OTHER_VARIANTS="none,bilinear:size=64x64,lift:iters=2,$PEER_VARIANTS${TRAINED_VARIANTS:+,$TRAINED_VARIANTS}"
fi
export THREADS=1 PROBE_EPOCHS=20 SHARED PYTHON
VARIANTS="$VOC_VARIANTS" TASKS="probe-voc" PROBE_TRAIN=120 PROBE_VAL=60 bash benchmarks/eval_tasks.sh "$OUT"
VARIANTS="$OTHER_VARIANTS" TASKS="warp davis probe-camvid" DAVIS_FRAMES=6 \
    WARP_IMAGES=20 PROBE_TRAIN=60 PROBE_VAL=30 bash benchmarks/eval_tasks.sh "$OUT"
