"""Batches of training images as objectives get them: the pixels and backbone features of their views.

`ImageBatches` loads the views an objective declares (`featlift.train.views`) for lists of image indices,
in DataLoader workers when asked, takes the backbone features from the cache where it has them and runs
the backbone (and fills the cache) for the rest. Features always pass through the cache dtype, so a cold
and a warm cache give the same inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..backbones import Backbone
from ..errors import FeatliftError
from .augment import color_jitter
from .cache import DTYPES, FeatureCache
from .data import TrainImage
from .views import View, load_views

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """The images of one step (or validation batch) that could be read, with everything of their views.

    ``pixels[name]``: uint8 ``[B, 3, h, w]`` on the CPU; ``features[name]``: the frozen backbone's float32
    ``[B, C, h/p, w/p]`` on the training device; ``positions``: each image's place in the batch as scheduled
    (unreadable images are left out); ``jitter_seeds``: per image, the seed of its ``--augment`` jitter, or
    None when guides are not jittered; ``seed`` and ``epoch``: the run's ``--seed`` and the step's epoch, for
    objectives whose random draws must repeat in a resumed run (None outside training steps).
    """

    pixels: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    positions: list[int]
    normalize: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    jitter_seeds: list[int] | None = None
    seed: int | None = None  # the run's --seed and the epoch of a training step (None outside training steps)
    epoch: int | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def guide(self, view: str, stream: int = 0) -> torch.Tensor:
        """The view's pixels as a guide image: float, normalised as the backbone's input, on the device.

        With ``--augment`` each image is photometrically jittered (`color_jitter`) with its seed plus
        `stream`; give each guide of an objective its own stream so that their jitters differ.
        """
        out = []
        for k, image in enumerate(self.pixels[view]):
            image = image.float().div(255.0)
            if self.jitter_seeds is not None:
                image = color_jitter(image, self.jitter_seeds[k] + stream)
            out.append(image)
        return self.normalize(torch.stack(out).to(self.device))


class _ViewDataset(Dataset):
    """Index -> (index, view pixels, cached features or None, error or None); runs in DataLoader workers."""

    def __init__(
        self,
        images: list[TrainImage],
        views: tuple[View, ...],
        image_size: int,
        seed: int,
        cache: FeatureCache | None,
    ):
        self.images = images
        self.views = views
        self.image_size = image_size
        self.seed = seed
        self.cache = cache

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        try:
            pixels = load_views(image, self.views, self.image_size, self.seed)
        except (OSError, FeatliftError) as exc:  # the file changed or vanished since the scan
            return index, None, None, str(exc)
        cached = self.cache.get(image.digest) if self.cache is not None else None
        return index, pixels, cached, None


def _collate(items):
    return items


class ImageBatches:
    """Loads batches of images and their views' backbone features (cache first, backbone for misses)."""

    def __init__(
        self,
        backbone: Backbone,
        images: list[TrainImage],
        views: tuple[View, ...],
        image_size: int,
        seed: int,
        cache: FeatureCache | None,
        cache_dtype: str,
        device: torch.device,
        workers: int,
    ):
        self.backbone = backbone
        self.views = views
        self.dataset = _ViewDataset(images, views, image_size, seed, cache)
        self.cache = cache
        self.dtype = DTYPES[cache_dtype]
        self.device = device
        self.workers = workers
        self.hits = self.misses = self.failed = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def reset_counts(self) -> None:
        self.hits = self.misses = self.failed = 0

    def iterate(self, batches: list[list[int]]) -> Iterator[Batch | None]:
        """One `Batch` per list of image indices; None for a batch none of whose images could be read."""
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        for items in loader:
            yield self._assemble(items)

    @torch.no_grad()
    def _assemble(self, items) -> Batch | None:
        positions = [k for k, item in enumerate(items) if item[1] is not None]
        good = [items[k] for k in positions]
        for _, _, _, error in items:
            if error is not None:
                self.failed += 1
                logger.warning("skipping image that can no longer be read: %s", error)
        if not good:
            return None
        missing = [i for i, item in enumerate(good) if item[2] is None]
        features: list[dict[str, torch.Tensor]] = [item[2] or {} for item in good]
        if missing:
            for view in self.views:
                pixels = (
                    torch.stack([good[i][1][view.name] for i in missing]).to(self.device).float().div_(255.0)
                )
                out = self.backbone(self.backbone.normalize(pixels)).to(self.dtype).cpu()
                for j, i in enumerate(missing):
                    features[i][view.name] = out[j].clone()
            if self.cache is not None:
                for i in missing:
                    self.cache.put(self.dataset.images[good[i][0]].digest, features[i])
        self.misses += len(missing)
        self.hits += len(good) - len(missing)
        names = [view.name for view in self.views]
        return Batch(
            pixels={name: torch.stack([item[1][name] for item in good]) for name in names},
            features={
                name: torch.stack([f[name] for f in features]).to(self.device).float() for name in names
            },
            positions=positions,
            normalize=self.backbone.normalize,
            device=self.device,
        )
