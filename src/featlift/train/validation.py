"""An objective's validation sums over a set of images, each DDP rank its share, totalled over the ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..upsamplers import Upsampler
from .batches import ImageBatches
from .distributed import DistInfo, all_reduce_sum

if TYPE_CHECKING:
    from .objectives.base import Objective

BATCH_SIZE = 8


@torch.no_grad()
def validation_totals(
    objective: Objective, upsampler: Upsampler, loader: ImageBatches, info: DistInfo
) -> tuple[dict[str, float], int]:
    """(objective's ``sums`` name -> total over the loader's images, number of images that could be read)."""
    images = list(range(len(loader)))[info.rank :: info.world_size]
    count = len(objective.sums)
    totals = torch.zeros(count + 1, dtype=torch.float64)
    modules = [upsampler, *objective.modules().values()]
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    batches = [images[i : i + BATCH_SIZE] for i in range(0, len(images), BATCH_SIZE)]
    for batch in loader.iterate(batches):
        if batch is None:
            continue
        totals[:count] += objective.validation_sums(upsampler, batch).cpu()
        totals[count] += len(batch)
    for module, mode in zip(modules, was_training, strict=True):
        module.train(mode)
    values = all_reduce_sum(totals, info).tolist()
    return dict(zip(objective.sums, values[:count], strict=True)), int(values[count])


def validate(
    objective: Objective, upsampler: Upsampler, loader: ImageBatches, info: DistInfo
) -> dict[str, Any]:
    """The objective's validation metrics over the loader's images and their number; {} for an objective that
    declares no validation sums or when no image could be read."""
    if not objective.sums:
        return {}
    sums, images = validation_totals(objective, upsampler, loader, info)
    if images == 0:
        return {}
    return {**objective.validation_metrics(sums, images), "val_images": images}
