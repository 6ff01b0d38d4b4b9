"""An interactive feature explorer: one self-contained HTML page comparing feature variants on images.

For every image and every `FeatureVariant` the page holds the features, quantised to 8 bits per channel
after a per-channel affine map (``value ~= code * scale + offset``, so each decoded value is within
``scale / 2`` of what was encoded), base64 in the page; hovering or clicking a point shows, for every
variant side by side, the cosine similarity of the feature of the cell under the point with every cell
(computed by the page's JavaScript), beside a joint PCA-to-RGB view computed here. The page loads no
script, style sheet, font or image from anywhere: it opens offline.

The budget (`max_bytes_per_image`) bounds what each image adds to the page: the serialised JSON entry of
the image (its photo, every variant's codes, scales, offsets and PCA picture, all base64). The encoding is
chosen by one rule (`choose_encoding`): keep every variant's own grid and all its channels if that fits;
else project every variant onto its first K principal directions of the uncentred features (a truncated
SVD, so dot products, hence cosine similarities, are those of the best rank-K approximation), with K the
largest of 256, 128, 64, 32, 16 that fits; and if 16 components still do not fit, average-pool the
largest grids by 2 per side until they do. What was embedded (grid, channels, components, bits, bytes,
the kept energy and the measured similarity error) is returned, shown on the page and printed by the CLI.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import FeatliftError
from .fileio import atomic_path
from .variants import FeatureVariant
from .viz import pca_rgb, short_label, variant_features

BITS = 8
LEVELS = 2**BITS - 1
COMPONENT_LADDER = (256, 128, 64, 32, 16)
MIN_COMPONENTS = COMPONENT_LADDER[-1]
DEFAULT_MAX_MB_PER_IMAGE = 4.0
MEGABYTE = 1_000_000
DEFAULT_PANEL = 256
SIMILARITY_QUERIES = 64
BASIS_SAMPLES = 65536
PAGE_TEMPLATE = "explorer_page.html"
DATA_MARKER = "/*FEATLIFT_EXPLORER_DATA*/null"
COLORMAP = "jet"
_ENTRY_BYTES_FIELD = 32  # room for the '"entryBytes":N,' the page adds to each entry


@dataclass
class QuantisedFeatures:
    """Features ``[N, K]`` (cell-major, row by row) as 8-bit codes with a per-component affine map.

    ``decode()`` gives ``codes * scale + offset``; every decoded value lies within ``scale / 2`` (per
    component) of the value that was encoded.
    """

    codes: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [K]
    offset: np.ndarray  # float32 [K]

    def decode(self) -> np.ndarray:
        return self.codes.astype(np.float32) * self.scale + self.offset

    @property
    def max_error(self) -> float:
        """The bound on ``|decoded - encoded|`` over every component: half the largest step."""
        return float(self.scale.max()) / 2 if self.scale.size else 0.0


def quantise(values: torch.Tensor | np.ndarray) -> QuantisedFeatures:
    """`values` ``[N, K]`` -> 8-bit codes, each column mapped affinely from its own [min, max] onto 0..255.

    A constant column gets scale 1 and codes 0 (decoded exactly to its value).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"values must be [N, K], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise FeatliftError("features contain NaN or infinite values; cannot quantise them")
    low = array.min(0) if len(array) else np.zeros(array.shape[1])
    high = array.max(0) if len(array) else np.zeros(array.shape[1])
    step = (high - low) / LEVELS
    step[step <= 0] = 1.0
    scale = step.astype(np.float32)
    offset = low.astype(np.float32)
    codes = np.rint((array - offset.astype(np.float64)) / scale.astype(np.float64))
    return QuantisedFeatures(np.clip(codes, 0, LEVELS).astype(np.uint8), scale, offset)


def principal_basis(cells: torch.Tensor, components: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal ``[C, K]``: the first `components` right singular vectors of the uncentred ``[N, C]`` cells.

    Fitted on at most `BASIS_SAMPLES` cells (a seeded draw). Uncentred, so ``(x @ B) . (y @ B)`` is the dot
    product of the rank-K approximations of x and y, and cosine similarities of projected cells approximate
    those of the cells themselves.
    """
    if cells.shape[0] > BASIS_SAMPLES:
        generator = torch.Generator().manual_seed(seed)
        cells = cells[torch.randperm(cells.shape[0], generator=generator)[:BASIS_SAMPLES]]
    data = cells.double()
    gram = data.T @ data
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[:, -components:].flip(1).float()


def pool_to_cells(features: torch.Tensor, max_cells: int) -> torch.Tensor:
    """`features` ``[C, h, w]`` average-pooled by 2 per side (ceil) until ``h * w <= max_cells``."""
    height, width = features.shape[1:]
    while height * width > max_cells and (height > 1 or width > 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    if (height, width) == tuple(features.shape[1:]):
        return features
    return F.adaptive_avg_pool2d(features[None], (height, width))[0]


def cosine_maps(cells: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine similarity ``[Q, N]`` of the cells at indices `queries` with every one of the ``[N, K]`` cells."""
    cells = np.asarray(cells, dtype=np.float64)
    norms = np.linalg.norm(cells, axis=1)
    unit = cells / np.where(norms > 0, norms, 1.0)[:, None]
    return unit[queries] @ unit.T


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo_jpeg(image: Image.Image, panel: int) -> tuple[bytes, tuple[int, int]]:
    width = max(1, int(panel))
    height = max(1, round(width * image.height / image.width))
    buffer = io.BytesIO()
    image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=85
    )
    return buffer.getvalue(), (width, height)


@dataclass
class EmbeddedVariant:
    """What the page holds for one variant on one image."""

    label: str
    source_grid: tuple[int, int]  # the variant's own (h, w)
    grid: tuple[int, int]  # the embedded (h, w)
    channels: int  # the variant's feature channels C
    components: int  # K embedded per cell (== channels when the channels themselves are embedded)
    projected: bool  # True: K principal components; False: the C channels
    quantised: QuantisedFeatures
    kept_energy: float  # sum of squares of the projection / of the (pooled) features; 1.0 unprojected
    similarity_error: float  # measured: max |cos(embedded) - cos(features)| over SIMILARITY_QUERIES queries
    pca_png: bytes  # the joint PCA-to-RGB view, at `grid`

    @property
    def code_bytes(self) -> int:
        return int(self.quantised.codes.nbytes)

    def describe(self) -> str:
        what = (
            f"{self.components} PCA components of {self.channels}"
            if self.projected
            else f"{self.channels} channels"
        )
        grid = f"{self.grid[0]}x{self.grid[1]}"
        if self.grid != self.source_grid:
            grid += f" (pooled from {self.source_grid[0]}x{self.source_grid[1]})"
        return (
            f"{short_label(self.label)}: {grid}, {what}, {BITS} bits, {self.code_bytes:,} B of codes, "
            f"max quantisation error {self.quantised.max_error:.3g}, energy kept {self.kept_energy:.1%}, "
            f"similarity error {self.similarity_error:.3g}"
        )

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "title": short_label(self.label),
            "sourceGrid": list(self.source_grid),
            "grid": list(self.grid),
            "channels": self.channels,
            "components": self.components,
            "projected": self.projected,
            "bits": BITS,
            "codeBytes": self.code_bytes,
            "maxError": self.quantised.max_error,
            "keptEnergy": self.kept_energy,
            "similarityError": self.similarity_error,
            "codes": _b64(self.quantised.codes.tobytes()),
            "scale": _b64(self.quantised.scale.astype("<f4").tobytes()),
            "offset": _b64(self.quantised.offset.astype("<f4").tobytes()),
            "pca": _b64(self.pca_png),
        }


@dataclass
class EmbeddedImage:
    """What the page holds for one image: its photo and every variant."""

    name: str
    size: tuple[int, int]  # the original (width, height)
    photo_jpeg: bytes
    photo_size: tuple[int, int]
    variants: list[EmbeddedVariant] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "size": list(self.size),
            "photo": _b64(self.photo_jpeg),
            "photoSize": list(self.photo_size),
            "variants": [v.to_json() for v in self.variants],
        }

    @property
    def embedded_bytes(self) -> int:
        """What this image adds to the page: the length of its serialised JSON entry."""
        return len(_dumps(self.to_json()))


def _dumps(data) -> str:
    # "<" never appears raw, so no label or file name can close the page's <script> element
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def pca_views(features: Sequence[torch.Tensor], seed: int = 0) -> list[bytes]:
    """PNGs of the first three principal components of the ``[C, h, w]`` maps as RGB, one basis for all."""
    return [_png(rgb) for rgb in pca_rgb(features, joint=True, seed=seed)]


def encode_variants(
    labels: Sequence[str],
    features: Sequence[torch.Tensor],
    components: int | None,
    max_cells: int | None,
    seed: int = 0,
    pca_pngs: Sequence[bytes] | None = None,
) -> list[EmbeddedVariant]:
    """Embed each ``[C, h, w]`` map: pooled to at most `max_cells` cells (None: its own grid), projected onto
    `components` principal directions when that is fewer than its channels (None: its channels), quantised.

    `pca_pngs`: the joint PCA views of the pooled maps when already made (`pca_views`)."""
    pooled = [pool_to_cells(f.float(), max_cells) if max_cells else f.float() for f in features]
    pngs = pca_pngs if pca_pngs is not None else pca_views(pooled, seed)
    out = []
    generator = np.random.default_rng(seed)
    for label, original, feats, png in zip(labels, features, pooled, pngs, strict=True):
        channels, height, width = feats.shape
        cells = feats.reshape(channels, -1).T.contiguous()  # [N, C], row-major cells
        projected = components is not None and components < channels
        if projected:
            basis = principal_basis(cells, components, seed)
            values = cells @ basis
            total = float(cells.double().pow(2).sum())
            kept = min(1.0, float(values.double().pow(2).sum()) / total) if total > 0 else 1.0
        else:
            values, kept = cells, 1.0
        quantised = quantise(values)
        count = cells.shape[0]
        queries = generator.choice(count, size=min(SIMILARITY_QUERIES, count), replace=False)
        error = float(
            np.abs(cosine_maps(quantised.decode(), queries) - cosine_maps(cells.numpy(), queries)).max()
        )
        out.append(
            EmbeddedVariant(
                label=label,
                source_grid=(int(original.shape[1]), int(original.shape[2])),
                grid=(height, width),
                channels=channels,
                components=values.shape[1],
                projected=projected,
                quantised=quantised,
                kept_energy=kept,
                similarity_error=error,
                pca_png=png,
            )
        )
    return out


def choose_encoding(
    name: str,
    image: Image.Image,
    labels: Sequence[str],
    features: Sequence[torch.Tensor],
    max_bytes: int,
    panel: int = DEFAULT_PANEL,
    components: int | None = None,
) -> EmbeddedImage:
    """The first encoding of the module docstring's rule whose entry fits in `max_bytes`.

    `components` fixes K (the channels themselves when K >= C) and leaves only the pooling to the rule.
    """
    if not features:
        raise FeatliftError("no variants to embed")
    photo, photo_size = _photo_jpeg(image, panel)
    channels = max(int(f.shape[0]) for f in features)
    if components is not None:
        ladder = [components]
    else:
        ladder = [None, *(k for k in COMPONENT_LADDER if k < channels)]

    views: dict[int | None, list[bytes]] = {}  # the PCA views depend on the grids only

    def build(k, max_cells):
        if max_cells not in views:
            pooled = [pool_to_cells(f.float(), max_cells) if max_cells else f.float() for f in features]
            views[max_cells] = pca_views(pooled)
        entry = EmbeddedImage(name, (image.width, image.height), photo, photo_size)
        entry.variants = encode_variants(labels, features, k, max_cells, pca_pngs=views[max_cells])
        return entry

    smallest = None
    for k in ladder:
        entry = build(k, None)
        if entry.embedded_bytes + _ENTRY_BYTES_FIELD <= max_bytes:
            return entry
        smallest = entry
    max_cells = max(int(f.shape[1] * f.shape[2]) for f in features)
    while max_cells > 1:
        max_cells = max(1, max_cells // 4)
        entry = build(ladder[-1], max_cells)
        if entry.embedded_bytes + _ENTRY_BYTES_FIELD <= max_bytes:
            return entry
        smallest = entry
    raise FeatliftError(
        f"{name}: even {ladder[-1] or channels} components on 1x1 grids take {smallest.embedded_bytes:,} bytes, "
        f"over the budget of {max_bytes:,} bytes per image (--max-mb-per-image {max_bytes / MEGABYTE:g}); "
        f"give a larger budget or fewer variants"
    )


def colormap_lut(name: str = COLORMAP) -> bytes:
    """256 RGB entries (768 bytes) of the matplotlib colour map `name`."""
    from matplotlib import colormaps

    table = colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return np.clip(np.rint(table * 255), 0, 255).astype(np.uint8).tobytes()


def page_template() -> str:
    return resources.files("featlift").joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8")


def render_page(images: Sequence[EmbeddedImage], max_bytes: int, title: str = "featlift explorer") -> str:
    """The HTML page holding `images` (its data is one JSON object in a ``<script type=application/json>``)."""
    data = {
        "title": title,
        "budgetBytes": max_bytes,
        "bits": BITS,
        "colormap": COLORMAP,
        "lut": _b64(colormap_lut()),
        "images": [{**image.to_json(), "entryBytes": image.embedded_bytes} for image in images],
    }
    template = page_template()
    if template.count(DATA_MARKER) != 1:
        raise FeatliftError(f"{PAGE_TEMPLATE}: expected exactly one {DATA_MARKER!r} in the page template")
    return template.replace(DATA_MARKER, _dumps(data))


def check_budget(max_mb_per_image: float) -> int:
    if not (max_mb_per_image > 0 and np.isfinite(max_mb_per_image)):
        raise FeatliftError(
            f"max_mb_per_image {max_mb_per_image!r}: expected a positive number of MB (10^6 bytes)"
        )
    return int(max_mb_per_image * MEGABYTE)


def explore_page(
    variants: Sequence[FeatureVariant],
    images: Sequence[tuple[str, Image.Image]],
    path: str | os.PathLike,
    base: tuple[int, int] = (224, 224),
    device: str | torch.device = "cpu",
    max_mb_per_image: float = DEFAULT_MAX_MB_PER_IMAGE,
    panel: int = DEFAULT_PANEL,
    components: int | None = None,
) -> tuple[Path, list[EmbeddedImage]]:
    """Features of every variant on every ``(name, image)``, embedded within the budget, written to `path`.

    Returns the path and what each image embedded (for a summary). The page is written atomically.
    """
    if not variants:
        raise FeatliftError("no variants to show")
    if not images:
        raise FeatliftError("no images to show")
    if components is not None and components < 1:
        raise FeatliftError(f"components {components}: expected a positive number of PCA components")
    max_bytes = check_budget(max_mb_per_image)
    labels = [v.label for v in variants]
    embedded = []
    with torch.inference_mode():
        for name, image in images:
            features = variant_features(variants, image, base, device)
            embedded.append(choose_encoding(name, image, labels, features, max_bytes, panel, components))
    html = render_page(embedded, max_bytes)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path, embedded
