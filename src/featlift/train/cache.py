"""On-disk cache of frozen-backbone features, so epochs after the first skip the backbone.

Layout: ``CACHE/<key>/<digest[:2]>/<digest>.safetensors`` with tensors ``s1``, ``s2``, ``s4``: the
features ``[C, S/p, S/p]``, ``[C, S/2p, S/2p]``, ``[C, S/4p, S/4p]`` of the image at full, half and
quarter size. ``<key>`` names the backbone (name + weight fingerprint), layer, facet, image size,
resize method, dtype and format version; ``<digest>`` is the SHA-256 of the image file's bytes, so
renamed or moved files still hit and edited files miss.

Files are written atomically (temporary file + rename in the same folder), so concurrent writers
(DDP ranks, two runs sharing a cache) are harmless: both write the same content and the last rename
wins; readers never see a partial file. A file that cannot be read is treated as a miss.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..backbones import ViTBackbone
from ..fileio import save_safetensors_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SCALE_KEYS = ("s1", "s2", "s4")
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_key(backbone: ViTBackbone, image_size: int, resize: str, dtype: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", backbone.name)
    return f"{name}-{backbone.fingerprint()}-layer{backbone.layer}-{backbone.facet}-{image_size}px-{resize}-{dtype}-v{CACHE_FORMAT}"


class FeatureCache:
    """Backbone features of training images, one safetensors file per image content."""

    def __init__(self, root: str | os.PathLike, key: str, dtype: str = "float16"):
        self.root = Path(root)
        self.folder = self.root / key
        self.dtype = DTYPES[dtype]

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, digest: str) -> list[torch.Tensor] | None:
        """The three feature maps of an image, or None on a miss (or an unreadable file)."""
        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            out = [tensors[k] for k in SCALE_KEYS]
        except Exception as exc:  # a damaged file is recomputed, not fatal
            logger.warning("feature cache file %s is unreadable (%s); recomputing", path, exc)
            return None
        return out

    def put(self, digest: str, features: list[torch.Tensor]) -> None:
        save_safetensors_atomic(
            {k: f.to(self.dtype) for k, f in zip(SCALE_KEYS, features, strict=True)}, self.path(digest)
        )

    def size_bytes(self) -> tuple[int, int]:
        """(number of files, total bytes) under this key."""
        files = list(self.folder.glob("*/*.safetensors"))
        return len(files), sum(f.stat().st_size for f in files)
