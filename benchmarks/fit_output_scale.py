"""Fit LiFT's ``output_scale`` of a checkpoint again, e.g. one trained before `featlift train` fitted it.

Rebuilds the checkpoint's own training split (its image folder, ``val_fraction`` and ``seed`` from
config.json) and fits the scale as ``featlift train`` does after every epoch: least squares to the
backbone's 2x features on `featlift.train.objectives.lift.calibration_images` of the training images, so the
held-out images stay unused for measuring the result (``benchmarks/output_scale.py``). For a checkpoint
with no training run, e.g. one imported from the original LiFT code, it fits on all images of ``--images``.
Writes the fitted scale back into the checkpoint (model.safetensors is rewritten unchanged; config.json
gains the argument and a record of the fit).

    python benchmarks/fit_output_scale.py CHECKPOINT [--images DIR] --weights W [--cache DIR]
"""

from __future__ import annotations

import argparse
import json

import torch

from featlift import create_backbone, load_checkpoint
from featlift.checkpoint import read_checkpoint_config, save_checkpoint
from featlift.train.cache import FeatureCache, cache_key
from featlift.train.data import scan_images, split_images
from featlift.train.objectives.lift import VIEWS, calibration_images, checkpoint_batches, fit_output_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--images", default=None, help="the training folder (default: the one in config.json)"
    )
    parser.add_argument("--weights", default=None, help="backbone weights file (default: timm's download)")
    parser.add_argument(
        "--cache", default=None, help="the training run's feature cache folder, to skip the backbone"
    )
    parser.add_argument(
        "--image-size", type=int, default=448, help="S when the checkpoint records none (default 448)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = read_checkpoint_config(args.checkpoint)
    training = dict(config.training or {})
    run_args = training.get("args") or {"images": args.images, "image_size": args.image_size}
    if not (args.images or run_args["images"]):
        parser.error("the checkpoint records no training run (e.g. imported): pass --images DIR")
    backbone = create_backbone(
        config.backbone.name, weights=args.weights, layer=config.backbone.layer, facet=config.backbone.facet
    )
    module, config = load_checkpoint(args.checkpoint, backbone=backbone)
    scan = scan_images(args.images or run_args["images"])
    if "val_fraction" in run_args:  # the run's own training split, as featlift train fits it
        train_images, _ = split_images(scan.images, run_args["val_fraction"], run_args["seed"])
        images, how = (
            calibration_images(train_images),
            "featlift.train.objectives.lift.calibration_images of the run's training split",
        )
    else:  # no training run recorded (an imported checkpoint): every image of --images
        images, how = scan.images, "all images of --images"
    cache = None
    if args.cache:
        dtype = run_args.get("cache_dtype", "float16")
        key = cache_key(backbone, run_args["image_size"], VIEWS, dtype=dtype)
        cache = FeatureCache(args.cache, key, tuple(view.name for view in VIEWS), dtype)
    before = module.output_scale
    module.output_scale = fit_output_scale(
        module, checkpoint_batches(backbone, images, run_args["image_size"], cache)
    )
    training["output_scale_fit"] = {
        "how": f"least squares to the backbone's 2x features on {how}, after training "
        "(benchmarks/fit_output_scale.py)",
        "images": len(images),
        "previous": before,
        "output_scale": module.output_scale,
    }
    save_checkpoint(args.checkpoint, module, backbone, training=training, normalization=config.normalization)
    print(json.dumps(training["output_scale_fit"], indent=2))


if __name__ == "__main__":
    main()
