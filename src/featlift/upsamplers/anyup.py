"""AnyUp (Wimmer et al., ICLR 2026): JAFAR-style attention upsampling that works for any backbone: its
feature input layer is shared over channels, so one checkpoint takes any channel count; the attention of
each output pixel is restricted to a window of tokens around it.

For ``C`` feature channels, ``D = qk_dim`` (128), 4 heads and a guide image ``[B, 3, Hg, Wg]`` (the
normalised image the backbone saw):

- image encoder: ``kernel_size`` conv 3->D (reflect padding, no bias), two `ResidualBlock`s, then 2-D rotary
  embedding (`RotaryEmbedding2d`) at the ``linspace(0, 1)`` grid coordinates -> ``[B, D, Hg, Wg]``;
- queries: query encoder (1x1 conv D->D, two residual blocks) of the encoding, adaptive-average-pooled to the
  output size, 3x3 conv (zero padding, no bias);
- keys: the key encoder's output (same shape) pooled to the token grid ``h x w``, concatenated with the feature
  encoding (below), then the aggregation encoder (3x3 reflect conv 2D->D, two residual blocks);
- feature encoding (`BasisUnification`, then two residual blocks): the L2-normalised features, each channel
  convolved (5x5, zero padding, divided by the number of in-image taps) with each of ``D`` shared learned
  filters, a softmax, and a mean over the channels: ``[B, D, h, w]`` whatever ``C``;
- attention: queries and keys RMS-normalised and projected (``nn.MultiheadAttention``, 4 heads); each output
  pixel sees only the tokens of its window (`window_bounds`, ratio 0.1 of the map per side); the head-averaged
  softmax weights weight the RAW features ``[B, h * w, C]``.

878,080 parameters (any C; the official count: `HeadAveragedAttention` keeps the unused value and output
projections of the official ``nn.MultiheadAttention``, 33,024 of them).

Differences from the official code (github.com/wimmerth/anyup, ``use_natten=False``), none in results (the
reference test agrees with its outputs to float noise):

- the query path, the scores and the window mask exist for one chunk of output pixels at a time (options
  ``chunk_size`` / ``max_memory_mib``; the official ``q_chunk_size`` chunks only the attention, after the
  pooled queries, the 3x3 conv and a ``[output pixels x tokens]`` mask, converted to float for the whole
  map, exist at the output size); the masked scores are set to ``-inf`` in place;
- the unused value and output projections are not computed;
- ``output_dtype`` allocates the output in another dtype (each chunk is computed in the features' dtype);
- the feature encoding reads the grouped convolution's ``[C x D]`` output channels as ``[D, C]`` row-major
  before the softmax, exactly as the official code's ``view`` does (so the softmax runs over a mix of channels
  and filters); this is what the checkpoints were trained with, and is kept.

Native output size (no size asked): the guide image's size, ``grid x patch_size``, as the official
``forward(image, features)`` returns the image's size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..weightfiles import refuse_non_finite
from .attention_blocks import (
    ConvEncoder,
    GuidedAttentionUpsampler,
    HeadAveragedAttention,
    reflect_conv,
    rename_encoder_keys,
)
from .base import Capabilities
from .official_weights import check_official_state_dict, load_strictly
from .registry import register_upsampler
from .rotary import RotaryEmbedding2d

OFFICIAL_BACKBONE = "any"
"""AnyUp's checkpoints take the features of any backbone (any channel count)."""


class BasisUnification(nn.Module):
    """AnyUp's feature-agnostic input layer: ``[B, C, h, w]`` (any C) -> ``[B, D, h, w]``.

    Every channel is convolved with each of the ``D`` filters ``basis`` ``[D, 1, k, k]`` (zero padding, each
    response divided by its number of in-image taps); the ``C x D`` responses (channel-major, as a grouped
    convolution orders them) are read as ``[D, C]`` row-major, soft-maxed over the first axis and averaged
    over the second.
    """

    def __init__(self, filters: int, kernel_size: int = 5):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"AnyUp lfu_kernel_size must be odd and >= 1, got {kernel_size}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.basis = nn.Parameter(torch.randn(filters, 1, kernel_size, kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        pad = (self.kernel_size // 2,) * 4
        responses = F.conv2d(F.pad(features, pad), self.basis.repeat(channels, 1, 1, 1), groups=channels)
        inside = features.new_ones(1, 1, height, width)
        taps = F.conv2d(F.pad(inside, pad), features.new_ones(1, 1, self.kernel_size, self.kernel_size))
        responses = (responses / taps).view(batch, self.filters, channels, height, width)
        return responses.softmax(dim=1).mean(dim=2)


def window_bounds(output: int, tokens: int, ratio: float, device: torch.device | None = None) -> torch.Tensor:
    """``[output, 2]`` token ranges ``[first, stop)`` that each output row (or column) attends to: the pixel
    centre ``(i + 0.5) / output`` +- `ratio`, clamped to ``[0, 1]``, floored / ceiled on the token grid (float32,
    as the official mask is computed)."""
    centres = (torch.arange(output, device=device, dtype=torch.float32) + 0.5) / output
    first = ((centres - ratio).clamp(0.0, 1.0) * tokens).floor().long()
    stop = ((centres + ratio).clamp(0.0, 1.0) * tokens).ceil().long()
    return torch.stack([first, stop], dim=1)


class WindowMask:
    """For a chunk of output pixels (row-major), the ``[n, h * w]`` bool mask of the tokens outside their window."""

    def __init__(
        self, output_size: tuple[int, int], grid: tuple[int, int], ratio: float, device: torch.device
    ):
        self.width = output_size[1]
        self.rows = window_bounds(output_size[0], grid[0], ratio, device)
        self.columns = window_bounds(output_size[1], grid[1], ratio, device)
        self.token_rows = torch.arange(grid[0], device=device)
        self.token_columns = torch.arange(grid[1], device=device)

    def __call__(self, pixels: slice) -> torch.Tensor:
        index = torch.arange(pixels.start, pixels.stop, device=self.rows.device)
        rows, columns = self.rows[index // self.width], self.columns[index % self.width]
        row_in = (self.token_rows >= rows[:, :1]) & (self.token_rows < rows[:, 1:])
        column_in = (self.token_columns >= columns[:, :1]) & (self.token_columns < columns[:, 1:])
        return ~(row_in[:, :, None] & column_in[:, None, :]).flatten(1)


@register_upsampler("anyup")
class AnyUp(GuidedAttentionUpsampler):
    """AnyUp (see the module doc); takes features of any channel count.

    Example:
        >>> anyup = AnyUp().eval()
        >>> anyup(torch.randn(1, 768, 16, 16), torch.randn(1, 3, 224, 224), (448, 448)).shape
        torch.Size([1, 768, 448, 448])
    """

    capabilities = Capabilities(guide="input", output_sizes="any", objective="anyup", backbones="any")

    def __init__(
        self,
        qk_dim: int = 128,
        num_heads: int = 4,
        kernel_size: int = 1,
        lfu_kernel_size: int = 5,
        lfu_dim: int | None = None,
        window_ratio: float = 0.1,
        patch_size: int = 14,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__(
            "AnyUp", qk_dim, num_heads, kernel_size, patch_size, chunk_size, max_memory_mib, output_dtype
        )
        lfu_dim = qk_dim if lfu_dim is None else int(lfu_dim)
        for name, value in (("qk_dim", qk_dim), ("lfu_dim", lfu_dim)):
            if value < 8 or value % 8 or value % 4:
                raise ValueError(f"AnyUp {name} must be a positive multiple of 8, got {value}")
        if not 0 < window_ratio:
            raise ValueError(f"AnyUp window_ratio must be > 0 (0.1 in the paper), got {window_ratio}")
        self.lfu_kernel_size = int(lfu_kernel_size)
        self.lfu_dim = lfu_dim
        self.window_ratio = float(window_ratio)

        def encoder(in_channels: int, kernel: int) -> ConvEncoder:
            return ConvEncoder(reflect_conv(in_channels, qk_dim, kernel), qk_dim, qk_dim)

        self.image_encoder = encoder(3, kernel_size)
        self.rotary = RotaryEmbedding2d(qk_dim)
        self.query_encoder = encoder(qk_dim, 1)
        self.key_encoder = encoder(qk_dim, 1)
        self.key_features_encoder = ConvEncoder(BasisUnification(lfu_dim, lfu_kernel_size), lfu_dim, qk_dim)
        self.aggregation = encoder(2 * qk_dim, 3)
        self.query_mixer = nn.Conv2d(qk_dim, qk_dim, kernel_size=3, padding=1, bias=False)
        self.attention = HeadAveragedAttention(qk_dim, num_heads)

    @classmethod
    def from_features(cls, channels: int, patch_size: int, **args: Any) -> AnyUp:
        """Any `channels`: the weights do not depend on them."""
        return cls(patch_size=patch_size, **args)

    def config(self) -> dict[str, Any]:
        return {
            "qk_dim": self.qk_dim,
            "num_heads": self.num_heads,
            "kernel_size": self.kernel_size,
            "lfu_kernel_size": self.lfu_kernel_size,
            "lfu_dim": self.lfu_dim,
            "window_ratio": self.window_ratio,
            "patch_size": self.patch_size,
        }

    def encode_keys(self, encoded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, heads, h * w, d]`` projected keys."""
        height, width = features.shape[-2:]
        keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), (height, width))
        keys = torch.cat([keys, self.key_features_encoder(F.normalize(features, dim=1))], dim=1)
        keys = self.aggregation(keys)
        return self.attention.project_keys(keys.flatten(2).transpose(1, 2))

    def outside_keys(self, size: tuple[int, int], grid: tuple[int, int], device: torch.device) -> WindowMask:
        return WindowMask(size, grid, self.window_ratio, device)


ENCODERS = ("image_encoder", "query_encoder", "key_encoder", "key_features_encoder", "aggregation")
BLOCK_NAMES = {"block.0.": "norm1.", "block.2.": "conv1.", "block.3.": "norm2.", "block.5.": "conv2."}
OFFICIAL_NAMES = {
    "cross_decode.cross_attn.norm_q.weight": "attention.query_norm.weight",
    "cross_decode.cross_attn.norm_k.weight": "attention.key_norm.weight",
    "cross_decode.cross_attn.attention.out_proj.weight": "attention.output_proj.weight",
    "cross_decode.cross_attn.attention.out_proj.bias": "attention.output_proj.bias",
    "cross_decode.conv2d.weight": "query_mixer.weight",
    "rope.freqs": "rotary.freqs",
}
PACKED = "cross_decode.cross_attn.attention.in_proj_"  # weight [3D, D] and bias [3D]: query, key, value
SIGNATURE = (
    "key_features_encoder.0.basis",
    "aggregation.0.weight",
    "image_encoder.0.weight",
    PACKED + "weight",
)
EXPECTED = (
    "expected an AnyUp state dict (a flat dict with keys 'image_encoder.*', 'key_features_encoder.0.basis', "
    "'aggregation.*', 'cross_decode.*' ..., 73 tensors)"
)


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official AnyUp state dict's keys to this module's; split the packed in-projection."""
    converted = {}
    for key, value in state.items():
        if key.startswith(PACKED):
            kind = key[len(PACKED) :]
            for part, tensor in zip(("query", "key", "value"), value.chunk(3), strict=True):
                converted[f"attention.{part}_proj.{kind}"] = tensor
        elif key in OFFICIAL_NAMES:
            converted[OFFICIAL_NAMES[key]] = value
        elif key.split(".", 1)[0] in ENCODERS:
            converted[rename_encoder_keys(key, BLOCK_NAMES)] = value
        else:
            converted[key] = value  # unknown: refused by the strict load with its name
    return converted


def from_official(obj: Any, source: str, patch_size: int = 14) -> AnyUp:
    """An official AnyUp checkpoint (``anyup_paper.pth``, ``anyup_multi_backbone.pth``: what `read_weights_file`
    returned, a flat state dict) as an `AnyUp` in eval mode.

    qk_dim, kernel_size, lfu_dim and lfu_kernel_size come from the shapes; ``num_heads`` (4) and
    ``window_ratio`` (0.1) are not in them: the official defaults, with which both checkpoints are used.
    `patch_size` is the backbone's (only the native output size).
    """
    obj = check_official_state_dict(obj, source, EXPECTED, SIGNATURE)
    stem, basis = obj["image_encoder.0.weight"], obj["key_features_encoder.0.basis"]
    if stem.ndim != 4 or stem.shape[1] != 3 or basis.ndim != 4 or basis.shape[1] != 1:
        raise CheckpointError(
            f"{source}: expected image_encoder.0.weight [qk_dim, 3, k, k] and key_features_encoder.0.basis "
            f"[lfu_dim, 1, k, k], found {list(stem.shape)} and {list(basis.shape)}"
        )
    refuse_non_finite(obj, source, CheckpointError)
    module = AnyUp(
        qk_dim=stem.shape[0],
        kernel_size=stem.shape[-1],
        lfu_kernel_size=basis.shape[-1],
        lfu_dim=basis.shape[0],
        patch_size=patch_size,
    )
    load_strictly(module, convert_official_state_dict(obj), source, "AnyUp")
    return module.eval()
