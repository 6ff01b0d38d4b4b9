"""Freshly initialised checkpoints of trained methods, for speed and memory measurements only.

Speed and memory do not depend on the weights, and `featlift bench`, `upsampler_scaling.py` and the evaluators
take a trained method only with a checkpoint. This writes ``OUT/NAME`` for each method, for the given backbone
(methods that serve any backbone record it as "any").

    python benchmarks/fresh_checkpoints.py --out FRESH [--methods naf,uplift,...] [--weights F]
"""

from __future__ import annotations

import argparse

import torch

from featlift.backbones import create_backbone
from featlift.checkpoint import BackboneSpec, save_checkpoint
from featlift.upsamplers import available_upsamplers, get_upsampler_class

DEFAULT_WEIGHTS = "../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every trained method)")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    args = parser.parse_args()
    backbone = create_backbone(args.backbone, weights=args.weights)
    names = args.methods.split(",") if args.methods else available_upsamplers()
    for name in names:
        cls = get_upsampler_class(name)
        if not cls.trainable:
            continue
        torch.manual_seed(0)
        module = cls.from_features(backbone.channels, backbone.patch_size)
        spec = BackboneSpec.any() if cls.capabilities.backbones == "any" else backbone
        path = save_checkpoint(f"{args.out}/{name}", module, spec, normalization=backbone.normalization)
        print(f"{name}: {sum(p.numel() for p in module.parameters()):,} parameters -> {path}")


if __name__ == "__main__":
    main()
