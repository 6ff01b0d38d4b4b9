"""FeatUp's JBU training objective (Fu et al., ICLR 2024, ``train_jbu_upsampler.py``): multi-view consistency.

For an image resized to ``S`` (view ``image``) with frozen backbone tokens ``f`` and its upsampling
``F = U(f, image)`` at the upsampler's native size (16x the grid for ``featup-jbu``), and a jitter ``J`` (reflect
pad, zoom, crop, flip) of the image whose backbone tokens are ``f_J``:

    loss = mean over 5 of the 8 jitters drawn per step of  mean(err / (2 s²) + log s),
    err = (P·D(J(F)) - P·N(f_J))²,   s = Scale(N(f_J))

- ``J(F)``: the same jitter applied to the upsampled map (`featlift.train.augment.jitter_features`);
- ``D``: FeatUp's learned attention downsampler back to the token grid (`featup_downsampler.AttentionDownsampler`,
  5x5 Gaussian blur, ``k x k`` patches with ``k`` the upsampler's factor, softmax attention per patch);
- ``P``: a fresh random projection to 30 dimensions per jitter and image (unit-norm Gaussian columns);
- ``N``: FeatUp's ChannelNorm when the upsampler applies it to its input (``featup-jbu``'s ``use_norm``), so the
  targets live in the space the upsampler outputs;
- ``s``: FeatUp's uncertainty scale (``ScaleNet``, its config's ``outlier_detection: True``).

The downsampler and the scale are trained jointly with the upsampler (``Objective.modules``: one Adam over all
three, saved in the resumable training state) but are not part of the saved upsampler. Validation: the mean over
the 8 jitters of the unprojected squared error ``|D(J(F)) - N(f_J)|²`` per value (``val_jitter_mse``), in eval
mode. ``--loss`` is not used: FeatUp's distance is the squared error above.

Where it differs from FeatUp's training (config ``jbu_upsampler.yaml``):

- jitters: a fixed pool of 8 per image (so their backbone features are cached views), of FeatUp's kinds: reflect
  pad 1/16 of the side (FeatUp: 20 px of 224), zoom 1, 1.5 or 2 (FeatUp: 1 or uniform in [1, 2]), crop offsets
  on a 1/16 grid, 4 of 8 flipped; each view is resized from the source image (FeatUp zooms the 224 px image
  bilinearly). 5 of the 8 are used per step, as FeatUp's ``n_jitters: 5``;
- the jitter is applied to the feature map with the image's geometry (FeatUp applies the image's pixel offsets
  to the 16x map, which for DINOv2's 256 px map of a 224 px image is off by the size ratio);
- ``F`` is computed once per step (FeatUp recomputes it for each jitter, with fresh dropout);
- the CRF regulariser (weight 0.001 in the config) is left out; TV and entropy have weight 0 there too;
- Adam (FeatUp: NAdam, lr 1e-3) and no gradient clipping in the first 10 steps (FeatUp clips to norm 1e-4);
- the downsampler's logit mask is off in validation (FeatUp applies it always).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...upsamplers import Upsampler
from ...upsamplers.featup_jbu import channel_norm
from ..augment import jitter_features
from ..batches import Batch
from ..views import View
from .base import Objective, register_objective
from .featup_downsampler import (
    AttentionDownsampler,
    UncertaintyScale,
    project,
    random_projection,
    weighted_error,
)

PAD = 1 / 16
JITTERS = (
    View("jitter0", 1.0, pad=PAD, crop=(-1 / 16, 1 / 16, 1.0, 1.0), flip=True),
    View("jitter1", 1.0, pad=PAD, crop=(1 / 16, -1 / 16, 1.0, 1.0)),
    View("jitter2", 1.5, pad=PAD, crop=(-1 / 16, 5 / 16, 2 / 3, 2 / 3), flip=True),
    View("jitter3", 2.0, pad=PAD, crop=(3 / 8, 1 / 16, 0.5, 0.5)),
    View("jitter4", 2.0, pad=PAD, crop=(-1 / 16, 0.5, 0.5, 0.5), flip=True),
    View("jitter5", 1.5, pad=PAD, crop=(0.25, 0.0, 2 / 3, 2 / 3)),
    View("jitter6", 1.0, flip=True),
    View("jitter7", 1.0, pad=PAD, crop=(1 / 16, 1 / 16, 1.0, 1.0)),
)
"""The fixed jitter pool of every image (cached views); see the module docstring."""
JITTERS_PER_STEP = 5
PROJECTION_DIMS = 30


def upsampling_factor(upsampler: Upsampler) -> int:
    """How many output pixels per token the upsampler's native output has (16 for featup-jbu, 2 for LiFT)."""
    return int(upsampler.native_output_size((1, 1))[0])


def target_features(upsampler: Upsampler, features: torch.Tensor) -> torch.Tensor:
    """The backbone tokens in the space the upsampler outputs: ChannelNorm'd when it normalises its input."""
    return channel_norm(features) if getattr(upsampler, "use_norm", False) else features


@register_objective("featup")
class FeatUpObjective(Objective):
    """FeatUp's multi-view JBU objective; see the module docstring."""

    views = (View("image", 1.0), *JITTERS)
    sums = ("jitter_mse",)
    stochastic = True
    description = (
        "FeatUp multi-view consistency: mean over 5 of 8 fixed jitters (reflect pad, zoom, crop, flip; cached views) "
        "of the uncertainty-weighted squared error between 30-d random projections of the attention-downsampled "
        "jittered upsampling of f(img) and of ChannelNorm(f(jittered img)); learned attention downsampler and "
        "uncertainty scale trained jointly (not saved with the upsampler); no CRF term; Adam"
    )

    own_loss = "uncertainty-weighted squared error of random projections"

    checkpoint_jitters = True
    """Recompute each jitter's graph in backward (`torch.utils.checkpoint`): training memory holds one jitter's
    graph instead of all of them, at the cost of a second forward of the cheap downsampling path; the loss and the
    gradients are unchanged. The README's training section has the measured memory."""

    def __init__(self, loss: str = "cosine"):
        super().__init__(loss)
        self.downsampler: AttentionDownsampler | None = None
        self.uncertainty: UncertaintyScale | None = None

    def prepare(self, upsampler: Upsampler, channels: int) -> None:
        factor = upsampling_factor(upsampler)
        self.downsampler = AttentionDownsampler(channels, factor)
        self.uncertainty = UncertaintyScale(channels)

    def modules(self) -> dict[str, nn.Module]:
        if self.downsampler is None or self.uncertainty is None:
            return {}
        return {"downsampler": self.downsampler, "uncertainty": self.uncertainty}

    def check_prepared(self, upsampler: Upsampler, batch: Batch) -> None:
        if self.downsampler is None or self.uncertainty is None:
            self.prepare(upsampler, batch.features["image"].shape[1])
            for module in self.modules().values():
                module.to(batch.device)

    def upsampled(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        tokens = batch.features["image"]
        return upsampler(tokens, batch.guide("image"), upsampler.native_output_size(tuple(tokens.shape[-2:])))

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        self.check_prepared(upsampler, batch)
        assert self.downsampler is not None and self.uncertainty is not None
        upsampled = self.upsampled(upsampler, batch)
        chosen = torch.randperm(len(JITTERS))[:JITTERS_PER_STEP].tolist()
        total = upsampled.new_zeros(())
        for index in chosen:
            view = JITTERS[index]
            target = target_features(upsampler, batch.features[view.name])
            projection = random_projection(target.shape[0], target.shape[1], PROJECTION_DIMS, target)
            if self.checkpoint_jitters and torch.is_grad_enabled():
                # Each jitter's graph (jittered, blurred and unfolded copies of the 16x map: ~1 GB per 224 px image
                # at C=384) is recomputed in backward instead of kept, so only one jitter's is alive at a time.
                # The dropout draws inside are replayed from the saved RNG state: loss and gradients are unchanged.
                term = checkpoint(self.jitter_loss, upsampled, target, projection, view, use_reentrant=False)
            else:
                term = self.jitter_loss(upsampled, target, projection, view)
            total = total + term / len(chosen)
        return total

    def jitter_loss(
        self, upsampled: torch.Tensor, target: torch.Tensor, projection: torch.Tensor, view: View
    ) -> torch.Tensor:
        """The uncertainty-weighted projected error of one jitter (see the module docstring)."""
        assert self.downsampler is not None and self.uncertainty is not None
        down = self.downsampler(jitter_features(upsampled, view), tuple(target.shape[-2:]))
        error = (project(down, projection) - project(target, projection)).square()
        return weighted_error(error, self.uncertainty(target))

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        self.check_prepared(upsampler, batch)
        assert self.downsampler is not None
        upsampled = self.upsampled(upsampler, batch)
        per_image = torch.zeros(len(batch), dtype=torch.float64, device=upsampled.device)
        for view in JITTERS:
            target = target_features(upsampler, batch.features[view.name])
            down = self.downsampler(jitter_features(upsampled, view), tuple(target.shape[-2:]))
            per_image += (down - target).double().square().mean(dim=(1, 2, 3)) / len(JITTERS)
        return per_image.sum().reshape(1)

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {"val_jitter_mse": round(sums["jitter_mse"] / images, 6)}
