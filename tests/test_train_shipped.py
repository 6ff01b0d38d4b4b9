"""The shipped LiFT and NAF for the default backbone (real DINOv2 ViT-S/14 weights) load and beat bilinear.

Held-out images are the validation split of the shipped module's own training run (same folder, seed
and fraction, recorded in its config), so the module never saw them. Metric: mean cosine similarity to
the backbone's 448 px features of LiFT(img/2 at 224 px) and of bilinear upsampling of f(img/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import IMAGENET_SAMPLE, requires_shared

from featlift import build_pipeline, load_checkpoint
from featlift.checkpoint import read_checkpoint_config
from featlift.images import collect_images
from featlift.pretrained import find_shipped_checkpoint
from featlift.train.data import TrainImage, load_pyramid, split_images


def held_out_cosines(backbone, training_args: dict, upsample) -> tuple[list[float], list[float]]:
    """Mean cosine to f(img) of ``upsample(half_image, guide, coarse, target_size)`` and of bilinear upsampling
    of f(img/2), on the first 3 held-out images of the run `training_args` describe (``half_image`` in [0, 1],
    ``guide`` the normalised half image, ``coarse`` = f(img/2))."""
    images = [
        TrainImage(item.path, item.relative.as_posix(), "") for item in collect_images([IMAGENET_SAMPLE])
    ]
    _, held_out = split_images(images, training_args["val_fraction"], training_args["seed"])
    method_scores, bilinear_scores = [], []
    with torch.no_grad():
        for image in held_out[:3]:
            full, half, _ = (
                p.float().div(255).unsqueeze(0) for p in load_pyramid(image, training_args["image_size"])
            )
            target = backbone(backbone.normalize(full))
            size = tuple(target.shape[-2:])
            guide = backbone.normalize(half)
            coarse = backbone(guide)
            upsampled = upsample(half, guide, coarse, size)
            bilinear = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
            method_scores.append(F.cosine_similarity(upsampled, target, dim=1).mean().item())
            bilinear_scores.append(F.cosine_similarity(bilinear, target, dim=1).mean().item())
    return method_scores, bilinear_scores


@requires_shared
def test_shipped_lift_beats_bilinear_on_held_out_images(dinov2_backbone):
    backbone = dinov2_backbone
    shipped = find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet)
    assert shipped is not None, "no shipped LiFT checkpoint for the default backbone"
    module, config = load_checkpoint(shipped, backbone=backbone)  # would warn on a fingerprint mismatch
    assert config.backbone.fingerprint == backbone.fingerprint()
    assert config.upsampler_args["residual"] is True
    assert (
        config.training["final_val"]["val_cosine_lift"] > config.training["final_val"]["val_cosine_bilinear"]
    )

    if not IMAGENET_SAMPLE.is_dir():
        return
    lift_scores, bilinear_scores = held_out_cosines(
        backbone, config.training["args"], lambda half, guide, coarse, size: module(coarse, guide, size)
    )
    assert sum(lift_scores) / 3 > sum(bilinear_scores) / 3, (lift_scores, bilinear_scores)
    assert sum(a > b for a, b in zip(lift_scores, bilinear_scores, strict=True)) >= 2


@requires_shared
def test_shipped_naf_beats_bilinear_on_held_out_images(dinov2_backbone):
    """The shipped NAF, as `build_pipeline(..., upsampler="naf")` picks it: f(img/2) at 224 px upsampled to the
    448 px grid is closer to f(img) than bilinear, on held-out images of its own training run."""
    backbone = dinov2_backbone
    shipped = find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, "naf")
    assert shipped is not None, "no shipped NAF checkpoint for the default backbone"
    pipeline = build_pipeline(backbone, upsampler="naf")
    assert pipeline.checkpoint == str(shipped)
    config = read_checkpoint_config(shipped)
    assert config.backbone.fingerprint == backbone.fingerprint()
    final = config.training["final_val"]
    assert final["val_cosine_upsampler"] > final["val_cosine_bilinear"]

    if not IMAGENET_SAMPLE.is_dir():
        return

    def naf_through_the_pipeline(half, guide, coarse, size):
        pipeline.output_size = size
        return pipeline(half)  # as a user calls it: pixels in [0, 1], the backbone inside

    naf_scores, bilinear_scores = held_out_cosines(
        backbone, config.training["args"], naf_through_the_pipeline
    )
    assert sum(naf_scores) > sum(bilinear_scores), (naf_scores, bilinear_scores)
    assert sum(a > b for a, b in zip(naf_scores, bilinear_scores, strict=True)) >= 2
