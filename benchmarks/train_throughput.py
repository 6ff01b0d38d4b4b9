"""Training throughput of `featlift train` (images/s) with a cold and a warm backbone feature cache.

Runs the real training loop (`featlift.train.train`) for two epochs on the first N images of a folder,
with a fresh cache: epoch 1 computes the backbone features at S, S/2 and S/4 and caches them (cold),
epoch 2 reads them from the cache (warm). Throughput = training images per epoch / epoch seconds
(validation off). Also prints the cache size per image.

    python benchmarks/train_throughput.py --images ../shared/data/imagenet-sample --count 32 \\
        --weights ../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from featlift.commands.common import DEFAULT_BACKBONE
from featlift.images import collect_images
from featlift.train import TrainConfig, train
from featlift.train.cache import FeatureCache, cache_key
from featlift.train.objectives.lift import VIEWS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet-sample"))
    parser.add_argument(
        "--weights", default=str(SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors")
    )
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--count", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    items = collect_images([args.images])[: args.count]
    with tempfile.TemporaryDirectory(prefix="featlift-train-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for k, item in enumerate(items):
            os.symlink(item.path.resolve(), folder / f"{k:05d}{item.path.suffix.lower()}")
        config = TrainConfig(
            images=str(folder),
            out=str(Path(tmp) / "run"),
            backbone=args.backbone,
            weights=args.weights,
            epochs=2,
            batch_size=args.batch_size,
            image_size=args.image_size,
            val_fraction=0.0,
            device=args.device,
            progress=False,
        )
        result = train(config)
        cold, warm = result.history
        from featlift.backbones import create_backbone

        backbone = create_backbone(args.backbone, weights=args.weights)
        cache = FeatureCache(
            Path(tmp) / "run" / "cache",
            cache_key(backbone, args.image_size, VIEWS),
            tuple(view.name for view in VIEWS),
        )
        files, size = cache.size_bytes()

    steps = -(-len(items) // args.batch_size)
    seen = steps * args.batch_size  # the last batch is filled up by wrapping round
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"featlift train throughput: {args.backbone}, {len(items)} images at {args.image_size} px, batch {args.batch_size}, "
        f"device {device}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print()
    print("| feature cache | epoch seconds | images/s | backbone runs |")
    print("|---|---:|---:|---:|")
    for name, record in (("cold (1st epoch: backbone at S, S/2, S/4)", cold), ("warm (later epochs)", warm)):
        print(
            f"| {name} | {record['seconds']:.1f} | {seen / record['seconds']:.2f} | {record['cache_misses']} |"
        )
    print()
    print(
        f"cache: {files} files, {size / max(files, 1) / 1e6:.2f} MB per image (float16; S, S/2, S/4 feature maps)"
    )


if __name__ == "__main__":
    main()
