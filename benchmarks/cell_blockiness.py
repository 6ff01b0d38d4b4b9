"""Blockiness of 2x upsampled features: do the four output pixels of one token's cell vary like their neighbours?

For each variant, the features of N images at twice the token grid; the mean cosine similarity of horizontally
and vertically adjacent output pixels, split into pairs inside one 2x2 cell (rows/columns 2j, 2j+1) and pairs
across a cell border (2j+1, 2j+2). A smooth interpolator (bilinear) gives about equal numbers; nearest gives 1
inside; a method whose four sub-pixels cannot differ by their position in the cell (e.g. FADE with an image stem:
its kernels change inside a cell only through the guide's content) shows inside > across.

    python benchmarks/cell_blockiness.py --images ../shared/data/imagenet-sample --limit 20 \
        --variant bilinear,nearest,lift,fade:RUN_DIR [--size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from featlift.backbones import create_backbone
from featlift.evaluate.runner import load_inputs
from featlift.images import collect_images
from featlift.variants import parse_variants

DEFAULT_WEIGHTS = "../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors"


def adjacent_cosines(features: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of adjacent pixel pairs of ``[B, C, 2h, 2w]`` features: (inside a 2x2 cell, across cells)."""
    unit = F.normalize(features.float(), dim=1)
    horizontal = (unit[..., :, 1:] * unit[..., :, :-1]).sum(1)  # pair (x, x+1) at index x
    vertical = (unit[..., 1:, :] * unit[..., :-1, :]).sum(1)
    inside = torch.cat([horizontal[..., :, 0::2].flatten(), vertical[..., 0::2, :].flatten()])
    across = torch.cat([horizontal[..., :, 1::2].flatten(), vertical[..., 1::2, :].flatten()])
    return inside.mean().item(), across.mean().item()


class _Nearest:
    spec = "nearest"

    def __init__(self, backbone):
        self.backbone = backbone

    def __call__(self, images, sources=None):
        tokens = self.backbone(self.backbone.normalize(images))
        return F.interpolate(tokens, scale_factor=2, mode="nearest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument(
        "--variant", required=True, help="comma-separated variant specs; `nearest` is built in"
    )
    parser.add_argument(
        "--size", type=int, default=224, help="input size (default 224: 16x16 tokens -> 32x32)"
    )
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = create_backbone(args.backbone, weights=args.weights)
    grid = args.size // backbone.patch_size
    specs = args.variant.split(",")
    sized = [s if s == "nearest" or "size=" in s else f"{s}:size={2 * grid}x{2 * grid}" for s in specs]
    built = iter(parse_variants([s for s in sized if s != "nearest"], backbone))
    variants = [_Nearest(backbone) if s == "nearest" else next(built) for s in sized]
    paths = [item.path for item in collect_images([args.images])][: args.limit]
    print(
        f"{len(paths)} images from {Path(args.images)}, {args.size} px, {grid}x{grid} tokens -> {2 * grid}x{2 * grid}"
    )
    print("| variant | adjacent cosine inside a cell | across cells | inside - across |")
    print("|---|---|---|---|")
    for variant in variants:
        totals = torch.zeros(2)
        for path in paths:
            images, sources = load_inputs([path], (args.size, args.size), with_sources=True)
            features = variant(images, sources)
            assert features.shape[-2:] == (2 * grid, 2 * grid), features.shape
            totals += torch.tensor(adjacent_cosines(features))
        inside, across = (totals / len(paths)).tolist()
        print(f"| {variant.spec} | {inside:.4f} | {across:.4f} | {inside - across:+.4f} |")


if __name__ == "__main__":
    main()
