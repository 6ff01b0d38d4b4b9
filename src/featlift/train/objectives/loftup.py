"""LoftUp's stage-2 training objective (Huang et al., ICCV 2025, ``train_loftup_stage2.py``): self-distillation
from an EMA teacher that sees crops at high resolution, plus FeatUp's multi-view reconstruction.

For an image at the training size ``S`` (view ``image``) with frozen backbone tokens ``f``, the student's
upsampling ``F = U(N(f), image)`` at ``S x S`` (``N``: the upsampler's ``feature_norm``), two of a fixed pool of
4 crops per step (each the ``S x S`` view of a box ``1/z`` of the side, zoom ``z`` = 2 or 4) and two of FeatUp's 8
fixed jitters, one crop and one jitter per round ``i`` (the official ``n_jitters: 2``):

    loss = sum_i max(0, rec_i) / 2  +  0.05 * TV(F)  +  20 * mean_i hr_i

- ``hr_i``: the affinity loss ``mean((A(F[box_i]) - A(resize(T_i)))²)`` where ``T_i = U_ema(N(f_crop_i),
  crop_i)`` is the EMA teacher's upsampling of the crop's own backbone tokens at ``S x S`` (no gradient),
  bilinearly resized to the box's size in ``F``, and ``A(X)`` is the ``[n x n]`` cosine-similarity matrix of
  the feature vectors of ``X`` inside the box's inner 80% (10% of each side dropped; the official
  ``compute_affinity_matrix_batch``, eps 1e-6 on the norms);
- ``rec_i``: FeatUp's uncertainty-weighted reconstruction ``mean(err / (2 s²) + log s)`` with
  ``err = (P·D(J_i(F)) - P·N(f_J_i))²``, ``D`` the learned attention downsampler (``k`` = the patch size), ``P``
  a fresh 64-d random projection, ``s`` the uncertainty scale of ``N(f_J_i)``; clamped at 0, as the official
  ``torch.clamp(rec_loss, min=0.0)`` (``use_featup: false``);
- ``TV(F)``: FeatUp's total variation ``(sum dy² + sum dx²) / (B C H W)`` of the whole upsampling.

The teacher (`EMATeacher`) is a copy of the student made when training starts, updated after every optimiser
step (`Objective.after_step`) as the official ``EMA(beta=0.99, update_every=10)`` (lucidrains' ema-pytorch):
its ``k``-th update (counted from 0) does nothing unless ``k`` is a multiple of 10; up to
``update_after`` it copies the student, after it moves every parameter ``t <- t - (1 - d)(t - s)`` with
``d = min(0.99, 1 - (1 + e)^(-2/3))``, ``e = k - update_after - 1`` (``d = 0`` for ``e <= 0``); the BatchNorm
buffers are copied from the student at each update. The distillation term is on from step ``update_after``
(1000: the official value when no stage-1 upsampler is loaded, which featlift's training starts from).
The teacher, downsampler and uncertainty scale are objective-owned modules (saved in the resumable training
state, so ``--resume`` restores them; the teacher's parameters are frozen: Adam skips them).

Validation (eval mode): ``val_affinity_mse``, the mean over the 4 crops of the affinity loss, and
``val_jitter_mse``, the mean over the 8 jitters of ``|D(J(F)) - N(f_J)|²`` per value.

Where it differs from the official stage 2 (config ``train_loftup_stage2.yaml``):

- crops and jitters are fixed pools of cached views (crop boxes on a 1/16 grid; the official draws a random
  crop of a 896 px image and a random pad/zoom jitter per round, and a random input size 224-518 per step);
- ``F`` is computed once per step (the official recomputes it per round);
- no SAM-mask terms (``sam_mask_hr_alpha: 0.5`` blends the teacher's features towards their means in SAM
  masks): the training data carry no masks; no stage 1 (which needs SAM masks as well);
- the downsampler's blur is FeatUp's 5x5 Gaussian (the official LoftUp copy uses a 5x5 box filter);
- Adam at ``--lr`` (official: AdamW, lr 1e-3) and no gradient clipping in the first 10 steps (official: norm 1e-4);
- the EMA update runs after the optimiser step (official: after the backward, before the step).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...upsamplers import Upsampler
from ..augment import jitter_features
from ..batches import Batch
from ..views import View
from .base import Objective, register_objective
from .featup import JITTERS
from .featup_downsampler import (
    AttentionDownsampler,
    UncertaintyScale,
    project,
    random_projection,
    weighted_error,
)

CROPS = (
    View("crop0", 2.0, crop=(0.0, 0.5, 0.5, 0.5)),
    View("crop1", 2.0, crop=(0.375, 0.125, 0.5, 0.5)),
    View("crop2", 4.0, crop=(0.125, 0.25, 0.25, 0.25)),
    View("crop3", 4.0, crop=(0.625, 0.5625, 0.25, 0.25)),
)
"""The fixed pool of high-resolution crops of every image (cached views): zoom 2 and 4 boxes."""
ROUNDS = 2  # the official n_jitters: one crop and one jitter per round
PROJECTION_DIMS = 64  # the official random_projection
TV_WEIGHT = 0.05
HR_WEIGHT = 20.0
AFFINITY_BORDER = 0.1  # compute_affinity_matrix_batch's alpha
AFFINITY_EPS = 1e-6
EMA_BETA = 0.99
EMA_EVERY = 10
EMA_POWER = 2 / 3
EMA_AFTER = 1000


class EMATeacher(nn.Module):
    """A frozen copy of the student and the count of its updates (a buffer, so the training state keeps it);
    see the module docstring for `update`."""

    def __init__(self, student: Upsampler, beta: float, every: int, after: int):
        super().__init__()
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.beta, self.every, self.after = float(beta), int(every), int(after)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def decay(self, update: int) -> float:
        elapsed = update - self.after - 1
        if elapsed <= 0:
            return 0.0
        return min(self.beta, max(0.0, 1 - (1 + elapsed) ** -EMA_POWER))

    @torch.no_grad()
    def update(self, student: Upsampler) -> None:
        update = int(self.updates)
        self.updates += 1
        if update % self.every:
            return
        decay = 0.0 if update <= self.after else self.decay(update)
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.sub_((mine - theirs.detach()) * (1.0 - decay))
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)


def affinity_matrix(features: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]`` cosine similarities of the feature vectors of ``[B, C, h, w]`` in its inner region
    (``AFFINITY_BORDER`` of each side dropped, as ``int(0.1 * h) : int(0.9 * h)``)."""
    batch, channels, height, width = features.shape
    rows = slice(int(AFFINITY_BORDER * height), int((1 - AFFINITY_BORDER) * height))
    cols = slice(int(AFFINITY_BORDER * width), int((1 - AFFINITY_BORDER) * width))
    flat = features[:, :, rows, cols].reshape(batch, channels, -1)
    flat = flat / (flat.norm(dim=1, keepdim=True) + AFFINITY_EPS)
    return flat.transpose(1, 2) @ flat


def total_variation(features: torch.Tensor) -> torch.Tensor:
    """FeatUp's TV loss: ``(sum of squared vertical + horizontal differences) / numel``."""
    vertical = (features[:, :, 1:] - features[:, :, :-1]).square().sum()
    horizontal = (features[:, :, :, 1:] - features[:, :, :, :-1]).square().sum()
    return (vertical + horizontal) / features.numel()


def crop_box(view: View, size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of an ``S x S``-view map of `size` that the crop `view` shows."""
    top, left, height, width = view.crop or (0.0, 0.0, 1.0, 1.0)
    rows, cols = size
    return (
        slice(round(top * rows), round(top * rows) + round(height * rows)),
        slice(round(left * cols), round(left * cols) + round(width * cols)),
    )


@register_objective("loftup")
class LoftUpObjective(Objective):
    """LoftUp's stage-2 objective; see the module docstring."""

    views = (View("image", 1.0), *JITTERS, *CROPS)
    sums = ("affinity_mse", "jitter_mse")
    stochastic = True
    own_loss = "affinity distillation from an EMA teacher on crops plus FeatUp reconstruction and TV"
    description = (
        "LoftUp stage 2: 20 x affinity MSE between the student's upsampling of the image, cropped, and an EMA "
        "teacher's upsampling of the crop's own features (2 of 4 fixed zoom-2/4 crops per step), plus FeatUp's "
        "uncertainty-weighted reconstruction of 64-d random projections through a learned attention downsampler "
        "(2 of 8 fixed jitters, each clamped at 0) and 0.05 x TV; no SAM-mask terms; Adam"
    )
    ema_after: int = EMA_AFTER
    ema_every: int = EMA_EVERY

    def __init__(self, loss: str = "cosine"):
        super().__init__(loss)
        self.teacher: EMATeacher | None = None
        self.downsampler: AttentionDownsampler | None = None
        self.uncertainty: UncertaintyScale | None = None

    def prepare(self, upsampler: Upsampler, channels: int) -> None:
        self.teacher = EMATeacher(upsampler, EMA_BETA, self.ema_every, self.ema_after)
        self.downsampler = AttentionDownsampler(channels, int(upsampler.native_output_size((1, 1))[0]))
        self.uncertainty = UncertaintyScale(channels)

    def modules(self) -> dict[str, nn.Module]:
        if self.teacher is None or self.downsampler is None or self.uncertainty is None:
            return {}
        return {"teacher": self.teacher, "downsampler": self.downsampler, "uncertainty": self.uncertainty}

    def after_step(self, upsampler: Upsampler) -> None:
        if self.teacher is not None:
            self.teacher.update(upsampler)

    def check_prepared(self, upsampler: Upsampler, batch: Batch) -> None:
        if self.teacher is None:
            self.prepare(upsampler, batch.features["image"].shape[1])
            for module in self.modules().values():
                module.to(batch.device)

    def normalized(self, upsampler: Upsampler, features: torch.Tensor) -> torch.Tensor:
        """Backbone tokens in the space the upsampler outputs (its input LayerNorm, when it has one)."""
        norm = getattr(upsampler, "feature_norm", None)
        return features if norm is None else norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def upsampled(self, upsampler: Upsampler, batch: Batch, view: str = "image") -> torch.Tensor:
        tokens = batch.features[view]
        return upsampler(tokens, batch.guide(view), upsampler.native_output_size(tuple(tokens.shape[-2:])))

    def affinity_loss(self, student: torch.Tensor, batch: Batch, view: View, per_image: bool) -> torch.Tensor:
        assert self.teacher is not None
        rows, cols = crop_box(view, tuple(student.shape[-2:]))
        region = student[:, :, rows, cols]
        with torch.no_grad():
            target = self.upsampled(self.teacher.model, batch, view.name)
        target = F.interpolate(target, size=tuple(region.shape[-2:]), mode="bilinear", align_corners=False)
        error = (affinity_matrix(region) - affinity_matrix(target)).square()
        return error.mean(dim=(1, 2)) if per_image else error.mean()

    def reconstruction(
        self, upsampler: Upsampler, student: torch.Tensor, batch: Batch, view: View
    ) -> torch.Tensor:
        assert self.downsampler is not None and self.uncertainty is not None
        target = self.normalized(upsampler, batch.features[view.name])
        down = self.downsampler(jitter_features(student, view), tuple(target.shape[-2:]))
        projection = random_projection(target.shape[0], target.shape[1], PROJECTION_DIMS, target)
        error = (project(down, projection) - project(target, projection)).square()
        return weighted_error(error, self.uncertainty(target))

    def distilling(self) -> bool:
        """Whether the teacher term is on: from the optimiser step ``ema_after`` on."""
        return self.teacher is not None and int(self.teacher.updates) >= self.ema_after

    def loss(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        self.check_prepared(upsampler, batch)
        student = self.upsampled(upsampler, batch)
        crops = torch.randperm(len(CROPS))[:ROUNDS].tolist()
        jitters = torch.randperm(len(JITTERS))[:ROUNDS].tolist()
        total = TV_WEIGHT * total_variation(student)
        distill = self.distilling()
        for crop, jitter in zip(crops, jitters, strict=True):
            rec = self.reconstruction(upsampler, student, batch, JITTERS[jitter]) / ROUNDS
            total = total + rec.clamp_min(0.0)
            if distill:
                total = total + HR_WEIGHT * self.affinity_loss(student, batch, CROPS[crop], False) / ROUNDS
        return total

    def validation_sums(self, upsampler: Upsampler, batch: Batch) -> torch.Tensor:
        self.check_prepared(upsampler, batch)
        assert self.downsampler is not None
        student = self.upsampled(upsampler, batch)
        affinity = sum(self.affinity_loss(student, batch, view, True).double() for view in CROPS) / len(CROPS)
        jitter = torch.zeros(len(batch), dtype=torch.float64, device=student.device)
        for view in JITTERS:
            target = self.normalized(upsampler, batch.features[view.name])
            down = self.downsampler(jitter_features(student, view), tuple(target.shape[-2:]))
            jitter += (down - target).double().square().mean(dim=(1, 2, 3)) / len(JITTERS)
        return torch.stack([affinity.sum(), jitter.sum()])

    def validation_metrics(self, sums: dict[str, float], images: int) -> dict[str, Any]:
        return {
            "val_affinity_mse": round(sums["affinity_mse"] / images, 6),
            "val_jitter_mse": round(sums["jitter_mse"] / images, 6),
        }
