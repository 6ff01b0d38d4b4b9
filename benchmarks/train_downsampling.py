"""Why featlift trains on antialiased downsamplings instead of the original LiFT's strided subsampling.

For N held-out images resized to S (default 448), compares the backbone features of img/2 made two ways:
featlift's antialiased bicubic resize of the original (what `featlift train` does, and what `featlift extract`
feeds the backbone at inference) and the original code's ``img[..., ::2, ::2]`` (aliased). Prints the mean
cosine between the two feature maps, and for each the cosine of its bilinear 2x upsampling to f(img).

    python benchmarks/train_downsampling.py --count 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from featlift import create_backbone
from featlift.commands.common import DEFAULT_BACKBONE
from featlift.images import collect_images
from featlift.train.data import TrainImage, load_pyramid, split_images

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet-sample"))
    parser.add_argument(
        "--weights", default=str(SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors")
    )
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument(
        "--seed", type=int, default=0, help="split seed: the images are the validation split of train"
    )
    args = parser.parse_args()

    backbone = create_backbone(args.backbone, weights=args.weights)
    images = [TrainImage(i.path, i.relative.as_posix(), "") for i in collect_images([args.images])]
    held_out = split_images(images, 0.1, args.seed)[1][: args.count]
    same, up_aa, up_strided = [], [], []
    with torch.no_grad():
        for image in held_out:
            full, half, _ = (p.float().div(255).unsqueeze(0) for p in load_pyramid(image, args.image_size))
            target = backbone(backbone.normalize(full))
            f_aa = backbone(backbone.normalize(half))
            f_strided = backbone(backbone.normalize(full[..., ::2, ::2]))
            same.append(cosine(f_aa, f_strided))
            size = target.shape[-2:]
            up_aa.append(cosine(F.interpolate(f_aa, size=size, mode="bilinear", align_corners=False), target))
            up_strided.append(
                cosine(F.interpolate(f_strided, size=size, mode="bilinear", align_corners=False), target)
            )
    n = len(held_out)
    print(f"{args.backbone}, {n} held-out images at {args.image_size} px, img/2 = {args.image_size // 2} px")
    print()
    print("| img/2 made by | cos(f(img/2), f(antialiased img/2)) | cos(bilinear 2x of f(img/2), f(img)) |")
    print("|---|---:|---:|")
    print(f"| bicubic, antialiased (featlift) | 1.0000 | {sum(up_aa) / n:.4f} |")
    print(f"| strided [::2, ::2] (original LiFT) | {sum(same) / n:.4f} | {sum(up_strided) / n:.4f} |")


if __name__ == "__main__":
    main()
