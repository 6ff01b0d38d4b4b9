"""FeatUp's JBU stack (Fu et al., ICLR 2024): four learned joint-bilateral 2x stages and a 1x1 fix-up, in pure PyTorch.

What it computes, for features ``[B, C, h, w]`` and the normalised image the backbone saw (``guide``):

1. ChannelNorm: a LayerNorm over the channels of every token, weight 1, bias 0, eps 1e-5 and no parameters
   (the official ``use_norm=True`` checkpoint holds no ChannelNorm tensors, so the hub model keeps the
   default LayerNorm; ``use_norm=False`` skips it). The output lives in this normalised feature space.
2. Four stages (`JointBilateralStage`), each doubling the grid ``h x w -> 2h x 2w = H x W``. The guide is
   adaptive-average-pooled to ``H x W`` (at the last stage of a 224 px image that is pooling *up* to 256², as
   the official code does). Per output pixel a 7x7 kernel (radius 3, 49 taps) shared over the channels:

   - range kernel: ``q = conv1x1(GELU(conv1x1(guide)))`` (3 -> 32 -> 32 channels); tap ``(i, j)`` scores
     ``<q[y + i - 3, x + j - 3], q[y, x]>`` on the reflect-padded ``q``, times ``exp(t)`` clamped to
     [1e-4, 1e4] (``t`` learned), softmax over the 49 taps;
   - spatial kernel: ``exp(-(u² + v²) / (2 sigma²))`` on a 7x7 grid of ``u, v`` in ``linspace(-1, 1, 7)``
     (``sigma`` learned);
   - their product, divided by its sum over the taps (clamped at 1e-7), plus ``0.1 x`` a fix-up
     ``conv1x1(GELU(conv1x1([kernel, guide])))`` (52 -> 49 -> 49 channels);
   - applied to the features bicubically upsampled to ``H x W`` (``align_corners=False``) and reflect-padded
     by 3: ``out[c, y, x] = sum_ij kernel[ij, y, x] * padded[c, y + i, x + j]`` (what FeatUp's compiled
     ``AdaptiveConv`` op computes).
3. ``out + 0.1 x conv1x1(out)`` (C -> C) at the native 16x grid.

Parameters: 6,233 per stage (range 1,184, fix-up 5,047, two scalars) and ``C² + C`` for the final fix-up:
172,772 at C=384, the official count. Native output 16x the token grid (``output_sizes="fixed"``); any other
``output_size`` is a bilinear resize of the native output (`resize_features`), as the contract does.

Where it differs from the official code, not in results:

- The per-pixel kernels are applied by `featlift.upsamplers.pixel_kernels` (pure PyTorch, accumulating
  over the 49 taps) instead of the compiled CUDA/C++ ``AdaptiveConv`` extension; the range scores are
  accumulated over the taps too instead of unfolding the 32-channel projection 49 times.
- Each stage is computed in tiles of output rows (``chunk_size`` output pixels, or as many as
  ``max_memory_mib`` allows, see `chunking`), so the working memory beyond the stage's upsampled-and-padded
  features and its output is bounded; the last stage's tiles go through the final fix-up straight into the
  output, allocated in ``output_dtype``. Reductions are ordered differently, so results agree with the
  official ones to float32 noise (~1e-6 relative), not bitwise.
- An ``output_size`` other than the native one in another ``output_dtype`` is resized chunk by chunk of rows
  straight into the output (`resize_into`), equal to the whole-map bilinear resize up to float rounding.
- Dropout2d (rates 0.1 in each stage, 0.2 before the final fix-up, active only in training) draws one channel
  mask per image and stage, as the official module does, and applies it to every tile of that stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputSizeError
from .base import Capabilities, Upsampler, check_inputs, resize_features
from .chunking import DEFAULT_MAX_MEMORY_MIB, chunk_slices, output_dtype, set_chunking
from .pixel_kernels import apply_pixel_kernels, tap_offsets
from .registry import register_upsampler

OFFICIAL_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
"""The timm backbone the official FeatUp JBU checkpoint (DINOv2 ViT-S/14, cocostuff, use_norm=True) was trained for."""

STAGES = 4
STAGE_DROPOUT = 0.1
FINAL_DROPOUT = 0.2
FIXUP_WEIGHT = 0.1  # both the stages' kernel fix-up and the final feature fix-up are added at 0.1x
GUIDE_CHANNELS = 3
LAYER_NORM_EPS = 1e-5


def channel_norm(features: torch.Tensor) -> torch.Tensor:
    """FeatUp's ChannelNorm as the hub model has it: LayerNorm over the channels, weight 1, bias 0, eps 1e-5."""
    moved = features.permute(0, 2, 3, 1)
    return F.layer_norm(moved, moved.shape[-1:], eps=LAYER_NORM_EPS).permute(0, 3, 1, 2)


def channel_dropout_mask(
    batch: int, channels: int, rate: float, like: torch.Tensor, training: bool
) -> torch.Tensor | None:
    """Dropout2d's mask ``[B, channels, 1, 1]`` (kept channels scaled by ``1 / (1 - rate)``); None when not training."""
    if not training or rate <= 0:
        return None
    keep = torch.empty(batch, channels, 1, 1, dtype=like.dtype, device=like.device).bernoulli_(1 - rate)
    return keep / (1 - rate)


class JointBilateralStage(nn.Module):
    """One learned joint-bilateral 2x stage (FeatUp's ``JBULearnedRange``); see the module docstring."""

    def __init__(self, key_channels: int = 32, radius: int = 3):
        super().__init__()
        self.radius = int(radius)
        self.taps = (2 * self.radius + 1) ** 2
        self.key_channels = int(key_channels)
        self.log_range_temperature = nn.Parameter(torch.tensor(0.0))
        self.spatial_sigma = nn.Parameter(torch.tensor(1.0))
        self.range_in = nn.Conv2d(GUIDE_CHANNELS, key_channels, 1)
        self.range_out = nn.Conv2d(key_channels, key_channels, 1)
        self.kernel_fixup_in = nn.Conv2d(self.taps + GUIDE_CHANNELS, self.taps, 1)
        self.kernel_fixup_out = nn.Conv2d(self.taps, self.taps, 1)

    def spatial_kernel(self) -> torch.Tensor:
        """``[1, taps, 1, 1]``: the Gaussian of the tap offsets on a ``linspace(-1, 1, 2r+1)`` grid."""
        diameter = 2 * self.radius + 1
        grid = torch.linspace(
            -1, 1, diameter, device=self.spatial_sigma.device, dtype=self.spatial_sigma.dtype
        )
        squared = grid[:, None].square() + grid[None, :].square()
        return torch.exp(-squared / (2 * self.spatial_sigma**2)).reshape(1, self.taps, 1, 1)

    def range_keys(self, guide: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The learned projection of the guide, ``[B, key_channels, H, W]``."""
        hidden = F.gelu(self.range_in(guide))
        if mask is not None:
            hidden = hidden * mask
        return self.range_out(hidden)

    def tile_kernels(
        self, guide_window: torch.Tensor, key_mask: torch.Tensor | None, fixup_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The combined per-pixel kernels ``[B, taps, rows, W]`` of a tile, from the reflect-padded guide around it
        (``[B, 3, rows + 2r, W + 2r]``): the range projection is per pixel, so projecting the padded guide equals
        padding the projection."""
        radius = self.radius
        keys = self.range_keys(guide_window, key_mask)
        rows, width = keys.shape[-2] - 2 * radius, keys.shape[-1] - 2 * radius
        centre = keys[:, :, radius : radius + rows, radius : radius + width]
        scores = []
        for i, j in tap_offsets(radius):
            scores.append((keys[:, :, i : i + rows, j : j + width] * centre).sum(1))
        temperature = self.log_range_temperature.exp().clamp(1e-4, 1e4)
        range_kernel = torch.softmax(temperature * torch.stack(scores, 1), dim=1)
        kernel = range_kernel * self.spatial_kernel()
        kernel = kernel / kernel.sum(1, keepdim=True).clamp(1e-7)
        guide = guide_window[:, :, radius : radius + rows, radius : radius + width]
        hidden = F.gelu(self.kernel_fixup_in(torch.cat([kernel, guide], dim=1)))
        if fixup_mask is not None:
            hidden = hidden * fixup_mask
        return kernel + FIXUP_WEIGHT * self.kernel_fixup_out(hidden)

    def tile_bytes_per_pixel(self, channels: int, element_size: int) -> float:
        """Bytes a tile creates per output pixel: 49 scores (+ one ``key_channels`` product at a time), stacked,
        softmax, product, normalised, the 52-channel concat, GELU hidden, fix-up and final kernel (~8 x taps),
        plus one ``channels`` tile of the output (and one of the final fix-up at the last stage)."""
        per_pixel = 9 * self.taps + self.key_channels + GUIDE_CHANNELS + 3 * channels
        return float(per_pixel * element_size)


@register_upsampler("featup-jbu")
class FeatUpJBU(Upsampler):
    """FeatUp's JBU stack (native 16x); see the module docstring.

    Example:
        >>> jbu = FeatUpJBU(channels=384)
        >>> jbu(torch.randn(1, 384, 4, 4), torch.randn(1, 3, 56, 56), (64, 64)).shape
        torch.Size([1, 384, 64, 64])
    """

    capabilities = Capabilities(guide="input", output_sizes="fixed", factor=16, objective="featup")
    options = ("chunk_size", "max_memory_mib", "output_dtype")

    def __init__(
        self,
        channels: int,
        key_channels: int = 32,
        radius: int = 3,
        use_norm: bool = True,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        if channels < 1:
            raise ValueError(f"featup-jbu channels must be >= 1, got {channels}")
        if key_channels < 1:
            raise ValueError(f"featup-jbu key_channels must be >= 1, got {key_channels}")
        if radius < 1:
            raise ValueError(f"featup-jbu radius must be >= 1, got {radius}")
        set_chunking(self, "featup-jbu", chunk_size, max_memory_mib, output_dtype)
        self.channels = int(channels)
        self.key_channels = int(key_channels)
        self.radius = int(radius)
        self.use_norm = bool(use_norm)
        self.stages = nn.ModuleList(JointBilateralStage(key_channels, radius) for _ in range(STAGES))
        self.final_fixup = nn.Conv2d(channels, channels, 1)

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "key_channels": self.key_channels,
            "radius": self.radius,
            "use_norm": self.use_norm,
        }

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        if features.shape[1] != self.channels:
            raise InputSizeError(
                f"featup-jbu was built for {self.channels} channels, got features with {features.shape[1]}"
            )
        if min(features.shape[-2:]) * 2 <= self.radius:
            raise InputSizeError(
                f"featup-jbu needs a token grid of at least {self.radius // 2 + 1}x{self.radius // 2 + 1}, got "
                f"{features.shape[-2]}x{features.shape[-1]}: its first stage reflect-pads the doubled grid by "
                f"{self.radius}, which needs more than {self.radius} rows and columns"
            )
        dtype = output_dtype(self.output_dtype, features)
        native = self.native_output_size(tuple(features.shape[-2:]))
        compute = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
        guide = guide.to(compute.dtype)
        x = channel_norm(compute) if self.use_norm else compute
        for index, stage in enumerate(self.stages):
            last = index == len(self.stages) - 1
            x = self.run_stage(stage, x, guide, dtype if last and native == size else compute.dtype, last)
        if native != size:
            if dtype == x.dtype:
                return resize_features(x, size)
            return resize_into(x, size, dtype, self.resize_rows(x, size))
        return x

    def resize_rows(self, native: torch.Tensor, size: tuple[int, int]) -> int:
        """Output rows per chunk of the resize into another dtype: its two source rows and their blend, the
        column resize and its cast (``5 x C x W`` values of the compute dtype per output row)."""
        if self.chunk_size is not None:
            return max(1, min(size[0], self.chunk_size // size[1]))
        row = 5 * native.shape[0] * native.shape[1] * max(size[1], native.shape[-1]) * native.element_size()
        budget = (DEFAULT_MAX_MEMORY_MIB if self.max_memory_mib is None else self.max_memory_mib) * 2**20
        return max(1, min(size[0], int(budget // row)))

    def run_stage(
        self,
        stage: JointBilateralStage,
        source: torch.Tensor,
        guide: torch.Tensor,
        dtype: torch.dtype,
        last: bool,
    ) -> torch.Tensor:
        """One 2x stage computed in tiles of output rows; the last stage also applies the final fix-up.

        A tile of rows ``[r0, r1)`` needs the rows ``r0 - 3 .. r1 + 2`` of the reflect-padded bicubic upsampling of
        `source`; they are computed from a band of source rows (`upsampled_rows`), so neither the upsampled nor the
        padded features of the whole stage are ever held.
        """
        batch, channels, height, width = source.shape
        out_h, out_w = 2 * height, 2 * width
        small_guide = F.adaptive_avg_pool2d(guide, (out_h, out_w))
        stage_mask = channel_dropout_mask(batch, stage.key_channels, STAGE_DROPOUT, source, self.training)
        fixup_mask = channel_dropout_mask(batch, stage.taps, STAGE_DROPOUT, source, self.training)
        final_mask = (
            channel_dropout_mask(batch, channels, FINAL_DROPOUT, source, self.training) if last else None
        )
        columns = reflected(range(-stage.radius, out_w + stage.radius), out_w, source.device)
        out = torch.empty(batch, channels, out_h, out_w, dtype=dtype, device=source.device)
        for rows in chunk_slices(out_h, self.tile_rows(stage, source, out_h, out_w)):
            needed = reflected(
                range(rows.start - stage.radius, rows.stop + stage.radius), out_h, source.device
            )
            kernels = stage.tile_kernels(
                small_guide[:, :, needed[:, None], columns[None, :]], stage_mask, fixup_mask
            )
            first, last_row = int(needed.min()), int(needed.max()) + 1
            band = upsampled_rows(source, first, last_row)
            window = band[:, :, (needed - first)[:, None], columns[None, :]]
            del band
            tile = apply_pixel_kernels(window, kernels)
            del window, kernels
            if last:
                fixup_input = tile if final_mask is None else tile * final_mask
                tile = tile + FIXUP_WEIGHT * self.final_fixup(fixup_input)
            out[:, :, rows] = tile
        return out

    def tile_rows(self, stage: JointBilateralStage, source: torch.Tensor, out_h: int, out_w: int) -> int:
        """Output rows per tile: ``chunk_size // width`` (at least 1), or as many as ``max_memory_mib`` allows.

        Per output row a tile creates: the upsampled band and the padded window (``C x (W + 6)`` each, counted
        with the padded guide window, its projected keys and one product of keys), the
        applied tile, the final fix-up's conv and sum (``3 x C x W``; at every stage, as an upper bound) and the
        kernels (`JointBilateralStage.tile_bytes_per_pixel`); the band and window also have ``2r + 4`` rows more
        than the tile (the kernel's reach and the bicubic margin), which the budget pays for first.
        """
        if self.chunk_size is not None:
            return max(1, min(out_h, self.chunk_size // out_w))
        batch, channels = source.shape[:2]
        item = source.element_size()
        padded_row = channels * (out_w + 2 * stage.radius) * item * batch
        keys_row = (2 * stage.key_channels + GUIDE_CHANNELS) * (out_w + 2 * stage.radius) * item * batch
        padded_row += keys_row
        row = 2 * padded_row + batch * out_w * stage.tile_bytes_per_pixel(channels, item)
        overhead = (2 * stage.radius + 4) * 2 * padded_row
        budget = (DEFAULT_MAX_MEMORY_MIB if self.max_memory_mib is None else self.max_memory_mib) * 2**20
        return max(1, min(out_h, int((budget - overhead) // row)))


def resize_into(
    features: torch.Tensor, size: tuple[int, int], dtype: torch.dtype, rows_per_chunk: int
) -> torch.Tensor:
    """`resize_features` (bilinear, ``align_corners=False``) written chunk by chunk of output rows into a tensor
    of `dtype`, so the full-size result never exists in the compute dtype. Rows are blended from their two source
    rows with torch's weights, then columns resized by ``F.interpolate``; equal to the whole-map resize up to the
    order of the float operations (~1e-7 relative)."""
    batch, channels, height, width = features.shape
    out = torch.empty(batch, channels, *size, dtype=dtype, device=features.device)
    scale = height / size[0]
    for rows in chunk_slices(size[0], rows_per_chunk):
        index = torch.arange(rows.start, rows.stop, device=features.device, dtype=torch.float64)
        source = ((index + 0.5) * scale - 0.5).clamp_min(0)
        top = source.floor().long().clamp_max(height - 1)
        bottom = (top + 1).clamp_max(height - 1)
        weight = (source - top).to(features.dtype).view(1, 1, -1, 1)
        blended = features[:, :, top] * (1 - weight) + features[:, :, bottom] * weight
        out[:, :, rows] = F.interpolate(
            blended, size=(blended.shape[-2], size[1]), mode="bilinear", align_corners=False
        )
    return out


def reflected(indices: range, size: int, device: torch.device) -> torch.Tensor:
    """`indices` mapped into ``[0, size)`` as ``F.pad(mode="reflect")`` does (edge not repeated): -1 -> 1, size -> size-2."""
    index = torch.arange(indices.start, indices.stop, device=device)
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def upsampled_rows(source: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """Rows ``[first, stop)`` of ``F.interpolate(source, scale 2, "bicubic", align_corners=False)``, exactly.

    Output row ``y`` reads source rows ``floor(y/2 - 1/4) - 1 .. + 2`` (clamped to the image), so a band of
    source rows with a margin of those taps, upsampled alone with the same 1/2 coordinate scale, gives the same
    rows: inside the band no tap reaches its edge, and where it does the band's edge is the image's.
    """
    height, width = source.shape[-2:]
    low = max(0, (first - 1) // 2 - 2)
    high = min(height, (stop - 1) // 2 + 4)
    band = F.interpolate(
        source[:, :, low:high], size=(2 * (high - low), 2 * width), mode="bicubic", align_corners=False
    )
    return band[:, :, first - 2 * low : stop - 2 * low]


# Official key names (``upsampler.`` prefix of the Lightning checkpoint removed) -> this module's.
OFFICIAL_STAGE_KEYS = {
    "range_temp": "log_range_temperature",
    "sigma_spatial": "spatial_sigma",
    "range_proj.0.weight": "range_in.weight",
    "range_proj.0.bias": "range_in.bias",
    "range_proj.3.weight": "range_out.weight",
    "range_proj.3.bias": "range_out.bias",
    "fixup_proj.0.weight": "kernel_fixup_in.weight",
    "fixup_proj.0.bias": "kernel_fixup_in.bias",
    "fixup_proj.3.weight": "kernel_fixup_out.weight",
    "fixup_proj.3.bias": "kernel_fixup_out.bias",
}
OFFICIAL_FINAL_KEYS = {"fixup_proj.1.weight": "final_fixup.weight", "fixup_proj.1.bias": "final_fixup.bias"}
OFFICIAL_PREFIX = "upsampler."
IGNORED_PREFIXES = ("scale_net.", "downsampler.", "model.")  # training-only parts the hub loader drops too


def official_key_map() -> dict[str, str]:
    """Every tensor name of an official JBU-stack state dict (without ``upsampler.``) -> this module's."""
    mapping = {}
    for stage in range(STAGES):
        for old, new in OFFICIAL_STAGE_KEYS.items():
            mapping[f"up{stage + 1}.{old}"] = f"stages.{stage}.{new}"
    mapping.update(OFFICIAL_FINAL_KEYS)
    return mapping


def describe_keys(keys: list[str]) -> str:
    """The first 4 of `keys`, quoted, and how many there are: ``'a', 'b', ... (42 keys)``."""
    if not keys:
        return "no tensors"
    shown = ", ".join(repr(k) for k in keys[:4])
    return f"{shown}{', ...' if len(keys) > 4 else ''} ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def from_official(obj: Any, source: str) -> FeatUpJBU:
    """The official FeatUp JBU stack from what `read_weights_file` returned for its checkpoint (`source`).

    Takes the PyTorch-Lightning checkpoint (``{"state_dict": {"upsampler.up1.range_temp": ..., ...}}``), a bare
    state dict with or without the ``upsampler.`` prefix; drops the training-only ``scale_net.``/``downsampler.``
    tensors as the hub loader does; infers ``channels``, ``key_channels`` and ``radius`` from the shapes; loads
    strictly; returns the module in eval mode with ``use_norm=True`` (ChannelNorm without parameters, as the
    use_norm=True release). Raises `CheckpointError` naming `source` and what was expected otherwise.
    """
    expected = (
        "expected a FeatUp JBU-stack checkpoint (a PyTorch-Lightning file whose 'state_dict' holds "
        f"'upsampler.up1.range_temp' ... 'upsampler.up{STAGES}.fixup_proj.3.bias' and 'upsampler.fixup_proj.1.weight')"
    )
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = (
            f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else f"keys {describe_keys(list(obj))}"
        )
        raise CheckpointError(f"FeatUp checkpoint {source}: {expected}, found {found}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(OFFICIAL_PREFIX):
            key = key[len(OFFICIAL_PREFIX) :]
        if key.startswith(IGNORED_PREFIXES):
            continue
        tensors[key] = value
    mapping = official_key_map()
    missing = [k for k in mapping if k not in tensors]
    unexpected = [k for k in tensors if k not in mapping]
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"missing {describe_keys(missing)}")
        if unexpected:
            found.append(f"unexpected {describe_keys(unexpected)}")
        raise CheckpointError(f"FeatUp checkpoint {source}: {expected}, found {'; '.join(found)}")
    final = tensors["fixup_proj.1.weight"]
    key_weight = tensors["up1.range_proj.0.weight"]
    fixup_weight = tensors["up1.fixup_proj.3.weight"]
    if final.ndim != 4 or final.shape[0] != final.shape[1] or key_weight.ndim != 4 or fixup_weight.ndim != 4:
        raise CheckpointError(
            f"FeatUp checkpoint {source}: {expected}, found 'fixup_proj.1.weight' {list(final.shape)}, "
            f"'up1.range_proj.0.weight' {list(key_weight.shape)}: expected 1x1 convolutions [out, in, 1, 1]"
        )
    diameter = math.isqrt(fixup_weight.shape[0])
    if diameter**2 != fixup_weight.shape[0] or diameter % 2 != 1:
        raise CheckpointError(
            f"FeatUp checkpoint {source}: 'up1.fixup_proj.3.weight' has {fixup_weight.shape[0]} kernel taps, "
            "expected the square of an odd diameter (49 = 7x7)"
        )
    module = FeatUpJBU(channels=final.shape[0], key_channels=key_weight.shape[0], radius=diameter // 2)
    converted = {mapping[k]: v for k, v in tensors.items()}
    own = module.state_dict()
    wrong = [
        f"{k} {list(v.shape)} (expected {list(own[k].shape)})"
        for k, v in converted.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"FeatUp checkpoint {source}: tensor shapes do not fit one JBU stack: {', '.join(wrong[:3])}"
        )
    module.load_state_dict(converted, strict=True)
    return module.eval()
