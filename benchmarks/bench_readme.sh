#!/usr/bin/env bash
# The speed and memory numbers of the README, in one go (CPU, $THREADS threads, default 2; ~10-25 min on a 2-core machine).
#   benchmarks/bench_readme.sh [OUT_DIR] [LIFT_CHECKPOINT]
# Without LIFT_CHECKPOINT the checkpoint featlift ships for DINOv2 ViT-S/14 is used.
# Writes OUT_DIR/{variants,rss,options,extract}/ with JSON + markdown, and OUT_DIR/load.txt (machine load).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-readme}
CKPT=${2:-}
PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-2}
WEIGHTS=../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors
LIFT=lift${CKPT:+:$CKPT}
mkdir -p "$OUT"
{ echo "before: $(date -u +%FT%TZ) $(uptime)"; } > "$OUT/load.txt"

# 1-3: LiFT vs backbone, backbone@S + LiFT vs backbone@2S, iterative LiFT (time, memory, FLOPs).
$PY -m featlift bench --weights "$WEIGHTS" --sizes 224 --threads "$THREADS" --batch-sizes 1,4 --repeats 10 --warmup 2 \
  --variants "none,bilinear,$LIFT,$LIFT:iters=2,$LIFT:iters=3,input-2x" --out "$OUT/variants"
echo "after bench: $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"

# Peak RSS of fresh processes per variant (loaded, and with one call at batch 1).
$PY -m featlift bench --weights "$WEIGHTS" --sizes 224 --threads "$THREADS" --batch-sizes 1 --repeats 1 --warmup 0 \
  --variants "none,bilinear,$LIFT,$LIFT:iters=2,$LIFT:iters=3,input-2x" --process-rss --out "$OUT/rss"
echo "after rss: $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"

# Each speed option side by side (time ratios and output error).
$PY benchmarks/speed_options.py --threads "$THREADS" --repeats 20 --compile ${CKPT:+--checkpoint "$CKPT"} --out "$OUT/options"
echo "after options: $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"

# 4: folder extraction end to end vs its parts alone (96 images).
$PY benchmarks/speed_extract.py --threads "$THREADS" --count 96 --rounds 3 --settings serial,workers0-writer,workers1-writer,workers2-writer ${CKPT:+--checkpoint "$CKPT"} --out "$OUT/extract"
echo "after: $(date -u +%FT%TZ) $(uptime)" >> "$OUT/load.txt"
cat "$OUT/load.txt"
