"""UPLiFT (Walmer, Suri, Aggarwal, Shrivastava, CVPR 2026; github.com/mwalmer-umd/UPLiFT): LiFT's successor,
an iterated 2x conv decoder whose output only guides a Local Attender, so every step's features are convex
combinations of the step's input features.

The DINOv2-S/14 configuration of the original (``configs/uplift_dinov2-s14.yaml``), for ``C`` channels:

- image encoder, run **once** on the guide image (enlarged to 16 px per token for patch 14, as the original
  does; other patches as they are), all at the image's resolution: five blocks
  ``conv3x3 BN ReLU conv1x1 (+ input, zero-padded to the block's channels)`` of 16, 32, 64, 128, 128 channels;
  the last two outputs ``e4`` (128) and ``e3`` (128) feed every step;
- one 2x decoder step, shared by all steps, from features ``x`` ``[B, C, h, w]``:
  ``y = DoubleConv(cat(x, nearest(e4, h x w)))`` (64 channels; conv3x3 BN ReLU conv3x3 BN ReLU conv1x1, plus
  the first 64 input channels), ``u = ConvTranspose2x2/2(y) + bilinear_2x(y)`` (``align_corners=True``, as
  the original's ``UpsamplingBilinear2d``), ``g = DoubleConv(cat(u, nearest(e3, 2h x 2w)))`` (64);
- the Local Attender (`featlift.upsamplers.local_attender`) over the 17-offset neighbourhood: the step's
  output is ``LocalAttender(g, x)``, ``[B, C, 2h, 2w]``.

The paper describes the encoder with strided convolutions; the released DINOv2-S/14 configuration has
``down_op: none`` at every level (all five blocks at the image's resolution), which is what is built here. The
layer order inside each block is the original's, so its state dicts load after renaming the keys
(`convert_original_state_dict`).

789,521 parameters at ``C = 384`` (the encoder 283,904, the decoder 504,512, the attender 1,105); only the
first decoder conv depends on ``C``.

Steps: ``iters`` and the output size choose the number of 2x steps as for LiFT (`LiFT.passes_for`); every step
reuses the one encoding of the guide (the original's ``enc_share``), its nearest resizing following the
step's grid; an output size between two powers of two is a bilinear resize of the larger.

Memory: in eval mode the output is computed in bands of output rows, each from the bands of every earlier step
it needs (with a halo of ``HALO`` rows for the convolutions and the attender's reach), straight into the
preallocated output. The working memory beyond the output and the guide's encoding is then about
``max_memory_mib`` (default 512) or what ``chunk_size`` output pixels per band take, whatever the output size;
no earlier step's full map is ever held. The bands give the same output as one band (BN in eval mode is
per pixel). In training mode (BN on batch statistics) every step is one band, as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .base import Capabilities, Upsampler, check_inputs, resize_features
from .chunking import CHUNK_OPTIONS, DEFAULT_MAX_MEMORY_MIB, chunk_length, output_dtype, set_chunking
from .lift import LiFT
from .local_attender import LocalAttender, add_channel_residual
from .registry import register_upsampler

ENCODER_CHANNELS = (16, 32, 64, 128, 128)
DECODER_CHANNELS = 64
NEIGHBOURHOOD = 17
ENCODER_PIXELS_PER_TOKEN = 16  # the original enlarges patch-14 images to 16 px per token for its encoder
HALO = 4
"""Rows of a step's input beyond a band of its output rows (halved) that those rows depend on: 2 for the two
3x3 convs at the input's resolution, 1 for the two at the output's, 1 for the bilinear residual (and >= the
attender's reach of 2)."""
FINE_HALO = 2  # output rows beyond a band that the two 3x3 convs at the output's resolution reach


class ConvBlock(nn.Module):
    """``conv3x3 BN ReLU conv1x1`` plus the input on the channels they share (the original's ``SingleConv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_channel_residual(x, self.layers(x))


class DoubleConvBlock(nn.Module):
    """``conv3x3 BN ReLU conv3x3 BN ReLU conv1x1`` plus the input on the shared channels (``DoubleConv``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_channel_residual(x, self.layers(x))


def nearest_indices(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """The source index of each of `size_out` positions in PyTorch's ``nearest`` resize of `size_in` ones."""
    positions = torch.arange(size_in, dtype=torch.float32, device=device).view(1, 1, size_in, 1)
    return F.interpolate(positions, size=(size_out, 1), mode="nearest").view(-1).long()


def bilinear_2x_rows(band: torch.Tensor, row0: int, height: int) -> torch.Tensor:
    """Rows ``2*row0 .. 2*(row0 + n)`` of the ``align_corners=True`` bilinear 2x enlargement of a map `height`
    rows high, from its rows ``row0 .. row0 + n`` (`band`); rows whose sources lie outside the band take the
    band's edge row (they are in the caller's halo)."""
    rows = band.shape[2]
    out_rows = torch.arange(2 * row0, 2 * (row0 + rows), device=band.device, dtype=torch.float64)
    scale = (height - 1) / (2 * height - 1) if height > 1 else 0.0
    source = out_rows * scale
    lower = source.floor()
    frac = (source - lower).to(band.dtype).view(1, 1, -1, 1)
    lower = lower.long()
    upper = (lower + 1).clamp(max=height - 1)
    lower, upper = ((i - row0).clamp(0, rows - 1) for i in (lower, upper))
    tall = torch.lerp(band.index_select(2, lower), band.index_select(2, upper), frac)
    return F.interpolate(tall, size=(2 * rows, 2 * band.shape[3]), mode="bilinear", align_corners=True)


@dataclass
class _Steps:
    """What every step of one forward shares: the features, the guide's encoding and each step's grid."""

    features: torch.Tensor
    coarse_encoding: torch.Tensor  # e4, fed at each step's input resolution
    fine_encoding: torch.Tensor  # e3, fed at each step's output resolution
    sizes: list[tuple[int, int]]  # the grid of step k's output (k = 0: the features)

    def encoding_rows(self, which: torch.Tensor, size: tuple[int, int], row0: int, row1: int) -> torch.Tensor:
        rows = nearest_indices(which.shape[2], size[0], which.device)[row0:row1]
        cols = nearest_indices(which.shape[3], size[1], which.device)
        return which.index_select(2, rows).index_select(3, cols)


@register_upsampler("uplift")
class UPLiFT(Upsampler):
    """The UPLiFT module; see the module docstring.

    Example:
        >>> uplift = UPLiFT(channels=384, patch_size=14)
        >>> uplift(torch.randn(1, 384, 16, 16), torch.randn(1, 3, 224, 224), (64, 64)).shape
        torch.Size([1, 384, 64, 64])
    """

    capabilities = Capabilities(guide="input", output_sizes="power-of-two", objective="uplift")
    options = ("iters", *CHUNK_OPTIONS, "output_dtype")

    def __init__(
        self,
        channels: int,
        patch_size: int,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        if iters is not None and iters < 1:
            raise ValueError(f"UPLiFT iters must be >= 1 (or None: from the output size), got {iters}")
        if channels < 1:
            raise ValueError(f"UPLiFT channels must be >= 1, got {channels}")
        if patch_size < 1:
            raise ValueError(f"UPLiFT patch_size must be >= 1, got {patch_size}")
        set_chunking(self, "UPLiFT", chunk_size, max_memory_mib, output_dtype)
        self.channels = int(channels)
        self.patch_size = int(patch_size)
        self.iters = None if iters is None else int(iters)
        blocks, previous = [], 3
        for width in ENCODER_CHANNELS:
            blocks.append(ConvBlock(previous, width))
            previous = width
        self.image_encoder = nn.ModuleList(blocks)
        coarse, fine = ENCODER_CHANNELS[-1], ENCODER_CHANNELS[-2]
        self.coarse_fuse = DoubleConvBlock(channels + coarse, DECODER_CHANNELS)
        self.up = nn.ConvTranspose2d(DECODER_CHANNELS, DECODER_CHANNELS, kernel_size=2, stride=2)
        self.fine_fuse = DoubleConvBlock(DECODER_CHANNELS + fine, DECODER_CHANNELS)
        self.attender = LocalAttender(DECODER_CHANNELS, NEIGHBOURHOOD)

    def config(self) -> dict[str, Any]:
        """The arguments that define the weights' function; iterations and chunking are choices of use."""
        return {"channels": self.channels, "patch_size": self.patch_size}

    passes_for = LiFT.passes_for  # the same rule: ``iters``, else the fewest 2x steps covering the output

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        passes = self.passes_for(grid, None)
        return grid[0] * 2**passes, grid[1] * 2**passes

    # -- the guide's encoding ---------------------------------------------------------------------------------

    def encode_guide(self, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's last two outputs (e4, e3) for a normalised guide image ``[B, 3, H, W]``."""
        if self.patch_size == 14:
            size = (
                guide.shape[2] * ENCODER_PIXELS_PER_TOKEN // 14,
                guide.shape[3] * ENCODER_PIXELS_PER_TOKEN // 14,
            )
            guide = F.interpolate(guide, size=size, mode="bilinear", align_corners=False, antialias=True)
        x, outputs = guide, []
        for block in self.image_encoder:
            x = block(x)
            outputs = [*outputs[-1:], x]
        return outputs[-1], outputs[-2]

    # -- one 2x step on a band of rows ------------------------------------------------------------------------

    def step_rows(self, steps: _Steps, step: int, band: torch.Tensor, band_row0: int, row0: int, row1: int):
        """Rows ``row0 .. row1`` (even) of step `step`'s output from `band`: rows ``band_row0 ..`` of its input,
        which must hold rows ``row0 // 2 - HALO .. row1 // 2 + HALO`` (clipped to the map)."""
        low, high = steps.sizes[step - 1], steps.sizes[step]
        rows = band.shape[2]
        if band.shape[1] != self.channels:
            raise InputSizeError(
                f"UPLiFT was built for {self.channels} channels, got features with {band.shape[1]}"
            )
        coarse = steps.encoding_rows(steps.coarse_encoding, low, band_row0, band_row0 + rows).to(band.dtype)
        merged = self.coarse_fuse(torch.cat([band, coarse], dim=1))
        del coarse
        # only the rows the fine convs (2 rows each way) and the bilinear residual (1 row) reach
        first = max(band_row0, (row0 - FINE_HALO) // 2 - 1)
        last = min(band_row0 + rows, (row1 + FINE_HALO) // 2 + 2)
        merged = merged[:, :, first - band_row0 : last - band_row0]
        upsampled = self.up(merged) + bilinear_2x_rows(merged, first, low[0])
        del merged
        fine = steps.encoding_rows(steps.fine_encoding, high, 2 * first, 2 * last).to(upsampled.dtype)
        merged = torch.cat([upsampled, fine], dim=1)
        del upsampled, fine
        guide = self.fine_fuse(merged)[:, :, row0 - 2 * first : row1 - 2 * first]
        del merged
        return self.attender(guide, band, guide_row0=row0, values_row0=band_row0, values_height=low[0])

    def input_band(self, steps: _Steps, step: int, row0: int, row1: int) -> tuple[int, int]:
        """The rows of step `step`'s input that its output rows ``row0 .. row1`` need (even bounds past step 1)."""
        height = steps.sizes[step - 1][0]
        first, last = max(0, row0 // 2 - HALO), min(height, -(-row1 // 2) + HALO)
        if step > 1:  # keep every band whole blocks of the attender's 2x2 outputs
            first, last = first - first % 2, min(height, last + last % 2)
        return first, last

    def rows_of(self, steps: _Steps, step: int, row0: int, row1: int) -> torch.Tensor:
        """Rows ``row0 .. row1`` of step `step`'s output (step 0: the features), from bands of earlier steps."""
        if step == 0:
            return steps.features[:, :, row0:row1]
        first, last = self.input_band(steps, step, row0, row1)
        band = self.rows_of(steps, step - 1, first, last)
        return self.step_rows(steps, step, band, first, row0, row1)

    # -- whole forwards ---------------------------------------------------------------------------------------

    def prepare_steps(self, features: torch.Tensor, guide: torch.Tensor, passes: int) -> _Steps:
        if features.shape[1] != self.channels:
            raise InputSizeError(
                f"UPLiFT was built for {self.channels} channels, got features with {features.shape[1]}"
            )
        coarse, fine = self.encode_guide(guide)
        height, width = features.shape[-2:]
        sizes = [(height * 2**k, width * 2**k) for k in range(passes + 1)]
        return _Steps(features, coarse, fine, sizes)

    def upsample_steps(self, features: torch.Tensor, guide: torch.Tensor, passes: int) -> list[torch.Tensor]:
        """Every step's whole output, ``[B, C, 2**k h, 2**k w]`` for k = 1..passes, from one guide encoding
        (what the multi-step training loss compares; see `featlift.train.objectives.uplift`)."""
        check_inputs(features, guide, (1, 1))
        steps = self.prepare_steps(features, guide, passes)
        outputs, x = [], features
        for step in range(1, passes + 1):
            x = self.step_rows(steps, step, x, 0, 0, steps.sizes[step][0])
            outputs.append(x)
        return outputs

    def band_bytes(self, steps: _Steps, rows: int) -> float:
        """An estimate of the bytes live at the peak of computing `rows` output rows of the last step: the
        largest over the steps of the step's input band (held while it works) plus the tensors its decoder or
        its attender makes, in float32 for the whole batch (tensors of a step below are freed by then)."""
        batch, channels, peak = steps.features.shape[0], self.channels, 0.0
        coarse, fine, hidden = ENCODER_CHANNELS[-1], ENCODER_CHANNELS[-2], DECODER_CHANNELS
        row0, row1 = 0, min(rows, steps.sizes[-1][0])
        for step in range(len(steps.sizes) - 1, 0, -1):
            width, low_width = steps.sizes[step][1], steps.sizes[step - 1][1]
            first, last = self.input_band(steps, step, row0, row1)
            band = (last - first) * low_width
            fine_rows = 2 * min(last - first, (row1 - row0 + 2 * FINE_HALO) // 2 + 4)
            low = band * (
                2 * channels + 2 * coarse + 3 * hidden
            )  # band, encoding, their cat, conv temporaries
            high = band * channels + fine_rows * width * (2 * hidden + 2 * fine + 4 * hidden)
            attend = band * channels + (row1 - row0) * width * (hidden + 2 * NEIGHBOURHOOD + channels)
            attend += 2 * ((row1 - row0) // 2 + 4) * (low_width + 4) * channels  # the neighbourhood's rows
            peak = max(peak, low, high, attend)
            row0, row1 = first, last
        return 4.0 * batch * peak

    def band_rows(self, steps: _Steps) -> int:
        """Output rows per band of the last step (even): from ``chunk_size`` or the memory budget."""
        height, width = steps.sizes[-1]
        if self.training:
            return height
        if self.chunk_size is not None:
            rows = chunk_length(height, 1, max(1, self.chunk_size // width))
        else:
            budget = (self.max_memory_mib or DEFAULT_MAX_MEMORY_MIB) * 2**20
            low, high = 2, height  # the most rows whose estimate fits the budget (at least 2)
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if self.band_bytes(steps, middle) <= budget else (low, middle - 1)
            rows = low
        return min(height, max(2, rows + rows % 2))

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        passes = self.passes_for(tuple(features.shape[-2:]), size)
        steps = self.prepare_steps(features, guide, passes)
        height, width = steps.sizes[-1]
        rows = self.band_rows(steps)
        if rows >= height:
            out = self.rows_of(steps, passes, 0, height).to(output_dtype(self.output_dtype, features))
        else:
            out = torch.empty(
                features.shape[0], self.channels, height, width,
                dtype=output_dtype(self.output_dtype, features), device=features.device,
            )  # fmt: skip
            for row0 in range(0, height, rows):
                row1 = min(height, row0 + rows)
                out[:, :, row0:row1] = self.rows_of(steps, passes, row0, row1)
        return resize_features(out, size)


# Key prefixes of the original's state dict (``uplift/uplift.py``, DINOv2-S/14 config) -> ours.
ORIGINAL_KEY_PREFIXES = {
    **{
        f"encoder.block_{i}.blocks.0.conv.": f"image_encoder.{i}.layers."
        for i in range(len(ENCODER_CHANNELS))
    },
    "decoder.block_0.blocks.0.conv.": "coarse_fuse.layers.",
    "decoder.up_1.up.": "up.",
    "decoder.block_1.blocks.0.conv.": "fine_fuse.layers.",
    "attender.conv1.": "attender.logits.",
}


def convert_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an original UPLiFT state dict (``module.`` prefixes allowed) to this module's; keys
    it does not know are kept, so ``load_state_dict`` names them."""
    converted = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in ORIGINAL_KEY_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value
    return converted
