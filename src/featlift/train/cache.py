"""On-disk cache of frozen-backbone features, so epochs after the first skip the backbone.

Layout: ``CACHE/<key>/<digest[:2]>/<digest>.safetensors`` with one tensor per view of the objective
(`featlift.train.views`), named as the view: the backbone's features ``[C, h/p, w/p]`` of the view's pixels
(for LiFT's objective ``s1``, ``s2``, ``s4``: the image at full, half and quarter size). ``<key>`` names the
backbone (name + weight fingerprint), layer (every tapped layer: ``layer3,6,9,11``), facet, image size, resize method, dtype, format version and the
views (`views_signature`), so objectives with other views never read each other's entries; ``<digest>`` is
the SHA-256 of the image file's bytes, so renamed or moved files still hit and edited files miss.

Files are written atomically (temporary file + rename in the same folder), so concurrent writers
(DDP ranks, two runs sharing a cache) are harmless: both write the same content and the last rename
wins; readers never see a partial file. A file that cannot be read, or lacks a view, is treated as a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..backbones import Backbone
from ..fileio import save_safetensors_atomic
from .views import RESIZE_METHOD, View, views_signature

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
FORMAT_1_VIEWS = "s1@1;s2@0.5;s4@0.25"
"""The views every cache entry held before objectives declared their own (LiFT's): their key has no views
part, so caches written then still hit."""
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_key(
    backbone: Backbone, image_size: int, views: tuple[View, ...], seed: int = 0, dtype: str = "float16"
) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", backbone.name)
    key = (
        f"{name}-{backbone.fingerprint()}-layer{backbone.layer_label}-{backbone.facet}-{image_size}px-{RESIZE_METHOD}"
        f"-{dtype}-v{CACHE_FORMAT}"
    )
    signature = views_signature(views, seed)
    if signature == FORMAT_1_VIEWS:
        return key
    return f"{key}-views{hashlib.sha256(signature.encode()).hexdigest()[:12]}"


class FeatureCache:
    """Backbone features of training images, one safetensors file per image content, one tensor per view."""

    def __init__(self, root: str | os.PathLike, key: str, names: tuple[str, ...], dtype: str = "float16"):
        self.root = Path(root)
        self.folder = self.root / key
        self.names = names
        self.dtype = DTYPES[dtype]

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> dict[str, torch.Tensor] | None:
        """View name -> feature map of an image, or None on a miss (or an unreadable file)."""
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            return {name: tensors[name] for name in self.names}
        except Exception as exc:  # a damaged file is recomputed, not fatal
            logger.warning("feature cache file %s is unreadable (%s); recomputing", path, exc)
            return None

    def put(self, digest: str, features: dict[str, torch.Tensor]) -> None:
        save_safetensors_atomic(
            {name: features[name].to(self.dtype) for name in self.names}, self.path(digest)
        )

    def size_bytes(self) -> tuple[int, int]:
        """(number of files, total bytes) under this key."""
        files = list(self.folder.glob("*/*.safetensors"))
        return len(files), sum(f.stat().st_size for f in files)
