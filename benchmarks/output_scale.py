"""How close LiFT's features come to the backbone's own denser features, in direction and in scale.

For held-out images of the shipped module's training run (its validation split, which neither training
nor the fit of ``output_scale`` uses: that is fitted on training images), compares one and two passes
from the 224 px input with the backbone's features on the 448 px and 896 px image: mean cosine, ratio
of mean feature norms, and relative L2 error (mean |pred - target| / mean |target|), for bilinear
upsampling, LiFT with ``output_scale`` 1 (as trained by the cosine loss) and LiFT with its fitted scale.

    python benchmarks/output_scale.py [--count 20] [--weights W] [--images DIR] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from featlift import create_backbone, load_checkpoint
from featlift.images import image_to_tensor, load_image
from featlift.pretrained import find_shipped_checkpoint
from featlift.train.data import scan_images, split_images
from featlift.upsamplers import LiFT

BASE = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="held-out images to use (default 20)")
    parser.add_argument(
        "--weights", default="../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors"
    )
    parser.add_argument("--images", default="../shared/data/imagenet-sample")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped module")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = create_backbone("vit_small_patch14_dinov2.lvd142m", weights=args.weights).eval()
    checkpoint = args.checkpoint or find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet)
    fitted, config = load_checkpoint(checkpoint, backbone=backbone)
    unscaled = LiFT(**{**config.upsampler_args, "output_scale": 1.0})
    unscaled.load_state_dict(fitted.state_dict())
    run = config.training["args"]
    _, held_out = split_images(scan_images(args.images).images, run["val_fraction"], run["seed"])

    def features(path, size):
        normalized = backbone.normalize(image_to_tensor(load_image(path), (size, size))[None])
        return normalized, backbone(normalized)

    methods = {
        "bilinear": None,
        "LiFT, output_scale 1": unscaled.eval(),
        f"LiFT, output_scale {fitted.output_scale}": fitted.eval(),
    }
    sums: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for image in held_out[: args.count]:
            guide, coarse = features(image.path, BASE)
            targets = {1: features(image.path, 2 * BASE)[1], 2: features(image.path, 4 * BASE)[1]}
            for name, module in methods.items():
                for passes, target in targets.items():
                    if module is None:
                        pred = F.interpolate(
                            coarse, scale_factor=2**passes, mode="bilinear", align_corners=False
                        )
                    else:
                        pred = module(coarse, guide, tuple(target.shape[-2:]))  # passes from the size
                    target_norm = target.norm(dim=1).mean()
                    values = torch.stack(
                        [
                            F.cosine_similarity(pred, target, dim=1).mean(),
                            pred.norm(dim=1).mean() / target_norm,
                            (pred - target).norm(dim=1).mean() / target_norm,
                        ]
                    )
                    sums[(name, passes)] = sums.get((name, passes), 0) + values
    count = min(args.count, len(held_out))
    print(
        f"{count} held-out images, {BASE} px input; targets: the backbone on the {2 * BASE} / {4 * BASE} px image"
    )
    print("| upsampler | passes | cosine | norm ratio | relative L2 error |")
    print("|---|---|---|---|---|")
    for (name, passes), total in sums.items():
        cosine, ratio, error = (total / count).tolist()
        print(f"| {name} | {passes} | {cosine:.4f} | {ratio:.3f} | {error:.3f} |")


if __name__ == "__main__":
    main()
