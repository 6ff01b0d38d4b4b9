"""Features for images already in memory: the Python counterpart of `featlift extract`.

`extract_features` takes a batch tensor or a list of PIL images / tensors, checks them (`featlift.pixels`),
resizes them to one size if asked (with `featlift.images.resize_images`, as `featlift extract` resizes files,
so a picture gives the same features as a file, a PIL image or a tensor), runs the pipeline `batch_size`
images at a time on the chosen device, and returns one CPU tensor, so a caller never has to batch or move
data by hand. An upsampler guided by the image at the output size or its own size
(`FeaturePipeline.wants_sources`) gets the images as given, before the resize to `size`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputSizeError
from .images import image_to_tensor, parse_size, resize_images
from .pipeline import FeaturePipeline
from .pixels import check_layout, check_values

ImageLike = torch.Tensor | Image.Image


def _as_unit_float(images: torch.Tensor, where: str, *, batched: bool) -> torch.Tensor:
    """A checked image tensor (see `featlift.pixels`) as float32 pixels in ``[0, 1]``."""
    check_layout(images, where, batched=batched)
    check_values(images, where, uint8=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _one_image(image: ImageLike, index: int) -> torch.Tensor:
    """One image as a checked ``[1, 3, H, W]`` float batch at its own size."""
    where = f"image {index}"
    if isinstance(image, Image.Image):
        return image_to_tensor(image)[None]
    if not isinstance(image, torch.Tensor):
        raise InputSizeError(
            f"{where}: expected a PIL image or a [3, H, W] tensor, got {type(image).__name__}"
        )
    return _as_unit_float(image, where, batched=False)[None]


def extract_features(
    pipeline: FeaturePipeline,
    images: torch.Tensor | Sequence[ImageLike],
    *,
    size: int | str | tuple[int, int] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Features ``[N, C, h, w]`` (CPU, `dtype`) for `images`, computed `batch_size` at a time on `device`.

    `images` is a ``[N, 3, H, W]`` tensor or a sequence of PIL images / ``[3, H, W]`` tensors; tensors hold
    float pixels in ``[0, 1]`` (float16/bfloat16/float64 are converted) or uint8 pixels in ``[0, 255]``,
    channels first; other layouts, dtypes or values raise `InputSizeError`. PIL images are read as
    `featlift.images.rgb_image` reads files (EXIF orientation, any mode to 8-bit RGB). `size` (``224``,
    ``"224x320"`` or ``(H, W)``) resizes every image first (`featlift.images.resize_images`: bicubic,
    aspect ratio ignored); without it all images must already share one size, a multiple of the
    backbone's patch. `device` defaults to the pipeline's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = parse_size(size) if size is not None else None
    if isinstance(images, torch.Tensor):
        check_layout(images, "images", batched=True)
        count = images.shape[0]
    else:
        count = len(images)
    if count == 0:
        raise InputSizeError("no images given")
    if device is None:
        device = next(pipeline.parameters()).device
    keep_sources = size is not None and pipeline.wants_sources
    first_shape = None
    outputs = []
    with tqdm(total=count, unit="img", desc="features", disable=not progress) as bar:
        for start in range(0, count, batch_size):
            if isinstance(images, torch.Tensor):
                where = f"images[{start}:{start + batch_size}]"
                originals = [_as_unit_float(images[start : start + batch_size], where, batched=True)]
            else:
                originals = [
                    _one_image(image, start + offset)
                    for offset, image in enumerate(images[start : start + batch_size])
                ]
            tensors = [resize_images(original, size) for original in originals]
            if size is None and not isinstance(images, torch.Tensor):
                for offset, tensor in enumerate(tensors):
                    first_shape = first_shape or tuple(tensor.shape[-2:])
                    if tuple(tensor.shape[-2:]) != first_shape:
                        raise InputSizeError(
                            f"image {start + offset} is {tensor.shape[-2]}x{tensor.shape[-1]}, image 0 is "
                            f"{first_shape[0]}x{first_shape[1]}: pass size= to resize them to one size"
                        )
            batch = torch.cat(tensors).to(device, non_blocking=True)
            if keep_sources:  # guided by the pixels before the resize
                sources = [source.to(device) for original in originals for source in original]
                computed = pipeline(batch, sources)
            else:
                computed = pipeline(batch)
            outputs.append(computed.to("cpu", dtype))
            bar.update(batch.shape[0])
    return torch.cat(outputs)
