"""The image tensors the Python API takes, checked where they come in, with errors that say how to fix them.

featlift computes on RGB pixels ``[B, 3, H, W]`` (channels first) with values in ``[0, 1]``; it normalises
them for the backbone itself. `check_layout` refuses other shapes (channels last, greyscale, RGBA, an empty
batch) and `check_values` other dtypes and values (0-255 floats, normalised images, NaN), each naming the
shape, dtype or range it got and the one expected. Float pixels of another precision (float16, bfloat16,
float64) are accepted and converted by the caller.
"""

from __future__ import annotations

import torch

from .errors import InputSizeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_layout(images: object, where: str, *, batched: bool) -> None:
    """`images` must be a ``[B, 3, H, W]`` tensor (`batched`) or a ``[3, H, W]`` one, with pixels in it."""
    expected = "[B, 3, H, W]" if batched else "[3, H, W]"
    if not isinstance(images, torch.Tensor):
        raise InputSizeError(
            f"{where}: expected a {expected} tensor of RGB pixels, got {type(images).__name__}"
        )
    shape = list(images.shape)
    channel_dim = 1 if batched else 0
    if images.ndim != channel_dim + 3:
        hint = ""
        if batched and images.ndim == 3 and shape[0] == 3:
            hint = "; add the batch dimension with images[None]"
        raise InputSizeError(f"{where}: expected a {expected} tensor of RGB pixels, got shape {shape}{hint}")
    channels = shape[channel_dim]
    if channels != 3:
        if shape[-1] == 3:
            order = "0, 3, 1, 2" if batched else "2, 0, 1"
            hint = f"it looks channels-last: use .permute({order})"
        elif channels == 1:
            expand = "-1, 3, -1, -1" if batched else "3, -1, -1"
            hint = f"greyscale: repeat it to RGB, e.g. .expand({expand})"
        elif channels == 4:
            hint = "RGBA: composite or drop the alpha channel first"
        else:
            hint = "featlift takes RGB images"
        raise InputSizeError(
            f"{where}: expected 3 (RGB) channels, shape {expected}, got shape {shape}: {hint}"
        )
    if images.numel() == 0:
        raise InputSizeError(f"{where}: no pixels (shape {shape}); expected {expected} with B, H, W >= 1")


def check_values(images: torch.Tensor, where: str, *, uint8: bool) -> None:
    """Float pixels must be finite and in ``[0, 1]``; uint8 pixels (0-255) pass when `uint8` is allowed."""
    accepted = "uint8 pixels (0-255) or float pixels in [0, 1]" if uint8 else "float pixels in [0, 1]"
    if images.dtype == torch.uint8:
        if uint8:
            return
        raise InputSizeError(
            f"{where}: expected {accepted}, got {images.dtype}; divide uint8 pixels by 255 "
            "(featlift.extract_features does that, and batches)"
        )
    if images.dtype not in FLOAT_DTYPES:
        raise InputSizeError(f"{where}: expected {accepted}, got {images.dtype}")
    low, high = (float(v) for v in torch.aminmax(images.float()))
    if 0.0 <= low and high <= 1.0:  # False for NaN too
        return
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise InputSizeError(
            f"{where}: {bad} of {images.numel()} pixels are NaN or infinite; expected {accepted}"
        )
    hints = []
    if high > 2.0:
        hints.append("0-255 pixels? divide them by 255")
    if low < -0.5:
        hints.append("normalised pixels? pass them unnormalised: featlift normalises for the backbone itself")
    if not hints:
        hints.append("clamp them with .clamp(0, 1)")
    got = f"got values from {low:.4g} to {high:.4g} ({images.dtype})"
    raise InputSizeError(f"{where}: expected {accepted}, {got}: {'; '.join(hints)}")
