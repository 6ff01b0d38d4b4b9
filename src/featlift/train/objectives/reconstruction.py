"""What the JAFAR and AnyUp objectives share: their feature loss, and per-image random draws that a resumed
run repeats.

**The loss** (JAFAR's ``Cosine_MSE``, which AnyUp keeps unchanged), for a prediction and a target
``[B, C, h, w]`` seen as ``N = B*h*w`` feature vectors ``p_i``, ``t_i``:

    loss = mean_i (1 - cos(p_i, t_i)) + mean_{i,c} ((p_ic - m_i) / r_i - (t_ic - m_i) / r_i)^2

where ``m_i = min_c t_ic``, ``r_i = max_c t_ic - m_i + 1e-6``: the second term is the MSE after min-max
normalising both vectors with the *target's* channel range at that position (so it is the squared
difference divided by ``r_i^2``). The cosine is torch's ``CosineEmbeddingLoss`` with label 1:
``p.t / sqrt((|p|^2 + 1e-12) (|t|^2 + 1e-12))``. The two terms are weighted 1:1, as in both originals.
`reconstruction_terms` returns both terms per image (means over its positions), so validation can sum
them over images; the batch loss is their mean over images, which equals the originals' mean over all
``B*h*w`` positions because all images of a call have the same grid.

**Random draws.** The originals draw their augmentations (JAFAR's downscale factor, AnyUp's crops and
photometric augmentation) from a global generator; featlift's views are fixed and cached, and a draw picks
among them. A draw must be the same in an uninterrupted run and in one resumed after a kill, so it depends
only on (the training seed, the epoch, the image's pixels, what is drawn): `draw_generator`, with the seed
and epoch the loop puts on every training `Batch` (``batch.seed``, ``batch.epoch``; outside training, e.g.
in a hand-made batch, seed 0 and epoch 0). Every image is seen once per epoch (the last batch may wrap round
to repeat one, with the same draw).
"""

from __future__ import annotations

import hashlib

import torch

from ..batches import Batch
from .base import Objective

MIN_MAX_EPS = 1e-6  # the originals' epsilon in the target's channel range
COSINE_EPS = 1e-12  # torch CosineEmbeddingLoss's epsilon on the squared norms


def reconstruction_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image ``[B]``: the mean over positions of ``1 - cos`` and the mean over positions and channels
    of the target-range-normalised squared difference (see the module docstring)."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"prediction {list(pred.shape)} and target {list(target.shape)}: expected equal [B, C, h, w]"
        )
    pred, target = pred.float(), target.float()
    dot = (pred * target).sum(dim=1)
    norms = ((pred * pred).sum(dim=1) + COSINE_EPS) * ((target * target).sum(dim=1) + COSINE_EPS)
    cosine_term = (1.0 - dot / norms.sqrt()).mean(dim=(1, 2))
    low = target.amin(dim=1, keepdim=True)
    span = target.amax(dim=1, keepdim=True) - low + MIN_MAX_EPS
    mse_term = ((pred - target) / span).square().mean(dim=(1, 2, 3))
    return cosine_term, mse_term


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """JAFAR's and AnyUp's ``Cosine_MSE``: the scalar ``cosine term + normalised MSE`` over the batch."""
    cosine_term, mse_term = reconstruction_terms(pred, target)
    return (cosine_term + mse_term).mean()


def image_digest(pixels: torch.Tensor) -> str:
    """SHA-256 of one image's uint8 pixels ``[3, h, w]``: what identifies an image in a batch."""
    return hashlib.sha256(pixels.contiguous().cpu().numpy().tobytes()).hexdigest()


def draw_generator(seed: int, epoch: int, digest: str, what: str) -> torch.Generator:
    """A CPU generator for the draw `what` of the image with `digest` in `epoch` of a run seeded `seed`."""
    text = f"{seed}/{epoch}/{digest}/{what}"
    return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:15], 16))


class DrawnObjective(Objective):
    """An objective with per-image random draws (`draw_generators`) and JAFAR's loss, which ``--loss`` cannot
    replace."""

    own_loss = "cosine distance plus min-max-normalised MSE"

    def draw_generators(self, batch: Batch, pixels: torch.Tensor, what: str) -> list[torch.Generator]:
        """One generator per image of `pixels` (uint8 ``[B, 3, h, w]``, from `batch`) for the draw `what` in
        the batch's epoch."""
        seed, epoch = batch.seed or 0, batch.epoch or 0
        return [draw_generator(seed, epoch, image_digest(image), what) for image in pixels]
