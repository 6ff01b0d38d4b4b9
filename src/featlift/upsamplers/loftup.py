"""LoftUp (Huang et al., ICCV 2025, "LoftUp: A Coordinate-Based Feature Upsampler for Vision Foundation
Models"): every output pixel is a query built from its coordinates and colour, which cross-attends to the
token grid in a small transformer; the output has the guide image's size.

For ``C`` feature channels, ``D = C + 20`` and a guide image ``[B, 3, H, W]`` at the output size (the
normalised image resized to it):

- query encoding: the guide min-max scaled to ``[-0.5, 0.5]`` per channel; per pixel the 5 values
  ``(y, x, r, g, b)`` (``y``, ``x`` on ``linspace(-1, 1)``) times 20 frequencies ``exp(linspace(-2, 10))``,
  plus learned phases, through ``sin`` and ``cos`` (200 channels), plus the scaled colour (203 in all,
  `SinusoidalCoordinates`); LayerNorm over the 203 channels, then twice 3x3 conv (zero padding) - BatchNorm -
  ReLU to ``D`` channels;
- keys/values: the features, LayerNorm'd over channels (``feature_norm``: FeatUp's ChannelNorm, which the
  official model applies to its input), concatenated with a sinusoidal encoding of the token grid's
  coordinates (2 values x 5 frequencies, learned phases, sin and cos: 20 channels) -> ``[B, h * w, D]``;
- 2 `CrossAttentionBlock`s (pre-norm cross-attention with ``nn.MultiheadAttention``'s projections, 4 heads,
  plus a GELU MLP ``D -> C -> D``, both residual), a final LayerNorm, a 1x1 conv ``D -> C`` and a LayerNorm
  over channels (eps 1e-6).

4,303,894 parameters at C=384 (DINOv2 ViT-S/14), as the official ``loftup_dinov2s`` (its ``LoftUp`` plus the
768 of the ChannelNorm in front of it). ``feature_norm`` is frozen: the official training keeps it inside
the frozen featurizer, at its initial identity affine.

Every query attends to all ``h * w`` tokens and every step after the 3x3 convs is per pixel, so the output is
computed in chunks of output pixels (options ``chunk_size`` / ``max_memory_mib``): a chunk's query encoding is
computed for its rows plus a two-row halo (the two 3x3 convs), its scores are ``chunk x heads x h * w``, and it
is written straight into the output (allocated in ``output_dtype``). In training mode the query encoding is
computed once over the whole map, because BatchNorm then normalises with the statistics of the whole batch.

Differences from the official code (github.com/andrehuang/loftup, ``upsamplers``):

- the guide's min-max scaling is per image; the official ``MinMaxScaler`` scales over the whole batch, so an
  image's output depends on the other images of its batch (the same at batch size 1);
- a guide of another size than the output is resized (bilinear) to the output size; the official output simply
  has the guide's size;
- the chunked computation (the official code runs the whole ``[H * W x D]`` query map and the
  ``[heads x H * W x h * w]`` attention at once);
- only the ``lr_pe_type="sine"`` variant (the one of the released checkpoints) is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputSizeError
from .base import Capabilities, Upsampler, check_inputs, resize_features
from .chunking import CHUNK_OPTIONS, DEFAULT_MAX_MEMORY_MIB, chunk_length, chunk_slices, set_chunking
from .chunking import output_dtype as resolve_output_dtype
from .registry import register_upsampler

QUERY_FREQUENCIES = 20
"""Frequencies of the query's coordinate-and-colour encoding (the official ``n_freqs``)."""
KEY_FREQUENCIES = 5
"""Frequencies of the token grid's positional encoding."""
FREQUENCY_EXPONENTS = (-2.0, 10.0)
"""The frequencies are ``exp(linspace(-2, 10, n))``."""
MIN_MAX_FLOOR = 1e-4
"""The smallest channel range the min-max scaling divides by."""
OUTPUT_NORM_EPS = 1e-6
QUERY_HALO = 2
"""Rows above and below a chunk's rows that its query encoding needs: two 3x3 convolutions."""


def min_max_scaled(image: torch.Tensor) -> torch.Tensor:
    """Each image's channels mapped to ``[-0.5, 0.5]`` by their minimum and maximum over the pixels."""
    flat = image.flatten(2)
    low = flat.amin(dim=2)[:, :, None, None]
    span = (flat.amax(dim=2)[:, :, None, None] - low).clamp_min(MIN_MAX_FLOOR)
    return (image - low).div_(span).sub_(0.5)  # one copy of the image


class SinusoidalCoordinates(nn.Module):
    """Sin and cos of (coordinates [and colour]) x ``exp(linspace(-2, 10, frequencies))`` plus learned phases
    (the official ``ImplicitFeaturizer`` with ``learn_bias=True``), and the colour itself when given.

    For ``values`` inputs (2 coordinates, plus 3 colours) channel ``f * values + v`` of the sin (cos) half is
    ``sin(value_v * freq_f + phase[0 (1)][f, v])``; the phases are stored ``[2, values, frequencies]`` and read
    as ``[frequencies, values]`` row-major, as the official module reads its ``biases``.
    """

    def __init__(self, frequencies: int, colour: bool):
        super().__init__()
        self.frequencies = int(frequencies)
        self.colour = bool(colour)
        self.values = 5 if colour else 2
        self.biases = nn.Parameter(torch.randn(2, self.values, self.frequencies))

    @property
    def channels(self) -> int:
        return 2 * self.frequencies * self.values + (3 if self.colour else 0)

    def forward(
        self,
        rows: slice,
        height: int,
        width: int,
        batch: int,
        like: torch.Tensor,
        colour: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[B, channels, len(rows), width]`` for rows `rows` of a ``height x width`` map; `colour` is the
        min-max scaled guide's rows ``[B, 3, len(rows), width]`` (None without colour)."""
        dtype, device = like.dtype, like.device
        ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)[rows]
        xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None].expand(batch, 2, len(ys), width)
        values = grid if colour is None else torch.cat([grid, colour.to(dtype)], dim=1)
        exponents = torch.linspace(*FREQUENCY_EXPONENTS, self.frequencies, device=device, dtype=dtype)
        scaled = values[:, None] * exponents.exp().view(1, -1, 1, 1, 1)  # [B, F, values, n, W]
        phases = self.biases.to(dtype).reshape(2, self.frequencies, self.values, 1, 1)
        shape = (batch, self.frequencies * self.values, len(ys), width)
        parts = [torch.sin(scaled + phases[0]).reshape(shape), torch.cos(scaled + phases[1]).reshape(shape)]
        if colour is not None:
            parts.append(colour.to(dtype))
        return torch.cat(parts, dim=1)


def conv_rows(
    x: torch.Tensor, conv: nn.Conv2d, first: int, stop: int, height: int
) -> tuple[torch.Tensor, int, int]:
    """Rows of ``conv(map)`` (3x3, zero padding 1) from `x`, rows ``first:stop`` of the ``height``-row map:
    returns the rows it can compute exactly and their range (the band shrinks by one row on each side that is
    not the map's border, where the zero padding is)."""
    top, bottom = int(first == 0), int(stop == height)
    padded = F.pad(x, (1, 1, top, bottom))
    out = F.conv2d(padded, conv.weight, conv.bias)
    return out, first + 1 - top, stop - 1 + bottom


class CrossAttentionBlock(nn.Module):
    """``x + Attention(LN(x), LN'(tokens))``, then ``x + MLP(LN(x))`` (GELU, ``dim -> hidden -> dim``).

    The attention uses ``nn.MultiheadAttention``'s parameters (``in_proj``, ``out_proj``) and arithmetic;
    the keys and values of the tokens are computed once per forward (`keys_values`).
    """

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LoftUp: the attention width {dim} must be a multiple of heads {heads}")
        self.heads = int(heads)
        self.query_norm = nn.LayerNorm(dim)
        self.token_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, hidden)
        self.mlp_out = nn.Linear(hidden, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        return x.view(batch, count, self.heads, dim // self.heads).transpose(1, 2)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, M, D]`` tokens -> keys and values ``[B, heads, M, D / heads]``."""
        dim = tokens.shape[-1]
        weight, bias = self.attention.in_proj_weight, self.attention.in_proj_bias
        normed = self.token_norm(tokens)
        keys = F.linear(normed, weight[dim : 2 * dim], bias[dim : 2 * dim])
        values = F.linear(normed, weight[2 * dim :], bias[2 * dim :])
        return self.split_heads(keys), self.split_heads(values)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, count, dim = x.shape
        weight, bias = self.attention.in_proj_weight, self.attention.in_proj_bias
        queries = self.split_heads(F.linear(self.query_norm(x), weight[:dim], bias[:dim]))
        scores = (queries * (1.0 / math.sqrt(dim // self.heads))) @ keys.transpose(-2, -1)
        attended = (scores.softmax(dim=-1) @ values).transpose(1, 2).reshape(batch, count, dim)
        x = x + self.attention.out_proj(attended)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


@register_upsampler("loftup")
class LoftUp(Upsampler):
    """LoftUp for ``channels`` feature channels (see the module doc).

    Example:
        >>> loftup = LoftUp(channels=384).eval()
        >>> loftup(torch.randn(1, 384, 16, 16), torch.randn(1, 3, 448, 448), (448, 448)).shape
        torch.Size([1, 384, 448, 448])
    """

    capabilities = Capabilities(guide="output", output_sizes="any", objective="loftup")
    options = (*CHUNK_OPTIONS, "output_dtype")

    def __init__(
        self,
        channels: int,
        patch_size: int = 14,
        heads: int = 4,
        blocks: int = 2,
        frequencies: int = QUERY_FREQUENCIES,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__()
        for name, value in (("channels", channels), ("patch_size", patch_size), ("heads", heads)):
            if int(value) < 1:
                raise ValueError(f"LoftUp {name} must be >= 1, got {value}")
        if int(blocks) < 1 or int(frequencies) < 1:
            raise ValueError(f"LoftUp blocks and frequencies must be >= 1, got {blocks} and {frequencies}")
        set_chunking(self, "LoftUp", chunk_size, max_memory_mib, output_dtype)
        self.channels, self.patch_size = int(channels), int(patch_size)
        self.heads, self.blocks_count, self.frequencies = int(heads), int(blocks), int(frequencies)

        self.feature_norm = nn.LayerNorm(channels)
        self.feature_norm.requires_grad_(False)  # frozen, as in the official training (see the module doc)
        self.key_encoding = SinusoidalCoordinates(KEY_FREQUENCIES, colour=False)
        dim = self.channels + self.key_encoding.channels
        self.dim = dim
        self.query_encoding = SinusoidalCoordinates(self.frequencies, colour=True)
        self.query_input_norm = nn.LayerNorm(self.query_encoding.channels)
        self.query_conv1 = nn.Conv2d(self.query_encoding.channels, dim, kernel_size=3, padding=1)
        self.query_bn1 = nn.BatchNorm2d(dim)
        self.query_conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.query_bn2 = nn.BatchNorm2d(dim)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(dim, self.heads, self.channels) for _ in range(self.blocks_count)]
        )
        self.final_norm = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, self.channels)
        self.output_norm = nn.LayerNorm(self.channels, eps=OUTPUT_NORM_EPS)

    @classmethod
    def from_features(cls, channels: int, patch_size: int, **args: Any) -> LoftUp:
        return cls(channels=channels, patch_size=patch_size, **args)

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "patch_size": self.patch_size,
            "heads": self.heads,
            "blocks": self.blocks_count,
            "frequencies": self.frequencies,
        }

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The guide image's size, ``grid x patch_size`` (the official output has the image's size)."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    def encode_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, h * w, D]``: the LayerNorm'd features with the grid's positional encoding."""
        batch, _, height, width = features.shape
        normed = self.feature_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        position = self.key_encoding(slice(None), height, width, batch, features, None)
        return torch.cat([normed, position], dim=1).flatten(2).transpose(1, 2)

    def encode_query_rows(self, scaled_guide: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """Rows ``first:stop`` of the query encoding ``[B, D, stop - first, W]`` (from a two-row halo)."""
        batch, _, height, width = scaled_guide.shape
        low, high = max(first - QUERY_HALO, 0), min(stop + QUERY_HALO, height)
        x = self.query_encoding(
            slice(low, high), height, width, batch, scaled_guide, scaled_guide[:, :, low:high]
        )
        x = self.query_input_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for conv, norm in ((self.query_conv1, self.query_bn1), (self.query_conv2, self.query_bn2)):
            x, low, high = conv_rows(x, conv, low, high, height)
            x = F.relu(norm(x))
        return x[:, :, first - low : stop - low]

    def decode(
        self, queries: torch.Tensor, keys_values: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``[B, n, D]`` encoded queries -> ``[B, n, C]`` output features."""
        for block, (keys, values) in zip(self.blocks, keys_values, strict=True):
            queries = block(queries, keys, values)
        return self.output_norm(self.output_proj(self.final_norm(queries)))

    def query_bytes(self, tokens: int, element: int) -> int:
        """Working bytes one output pixel needs (`element`: bytes of one value for all images of the batch), from the tensors a chunk creates: the query encoding
        (coordinate products, sin, cos, their concatenation and norm: ~5 x its 203 channels; the convs, norms
        and ReLUs: 6 x D), one block (norms, projections, head split, attention output, residuals: ~10 x D;
        scores and softmax: 2 x heads x tokens; MLP: 2 x C) and the output head (D + 3 x C)."""
        encoding = 5 * self.query_encoding.channels + 6 * self.dim
        block = 10 * self.dim + 2 * self.heads * tokens + 2 * self.channels
        return element * (encoding + block + self.dim + 3 * self.channels)

    def chunk_pixels(self, total: int, width: int, tokens: int, element: int) -> int:
        per_query = self.query_bytes(tokens, element)
        if self.chunk_size is not None:
            return chunk_length(total, per_query, chunk_size=self.chunk_size)
        budget = DEFAULT_MAX_MEMORY_MIB if self.max_memory_mib is None else self.max_memory_mib
        # a band's halo rows, and the row a band holds beyond its chunk
        row_bytes = width * (2 * QUERY_HALO * (5 * self.query_encoding.channels + 6 * self.dim) + self.dim)
        halo_mib = row_bytes * element / 2**20
        return chunk_length(total, per_query, max_memory_mib=max(budget - halo_mib, budget / 4))

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        if features.shape[1] != self.channels:
            raise InputSizeError(
                f"LoftUp was built for {self.channels} feature channels, got features with {features.shape[1]}"
            )
        if not features.dtype.is_floating_point:
            raise InputSizeError(f"LoftUp: features must be floating point, got {features.dtype}")
        batch, channels = features.shape[:2]
        height, width = size
        scaled_guide = min_max_scaled(resize_features(guide.to(features.dtype), size))
        tokens = self.encode_tokens(features)
        keys_values = [block.keys_values(tokens) for block in self.blocks]
        element = features.element_size() * batch  # a chunk of output pixels holds them for every image
        chunk = self.chunk_pixels(height * width, width, tokens.shape[1], element)
        # the encoded query rows the chunks read: in training the whole map (BatchNorm's batch statistics),
        # else a band of rows at a time
        band = self.encode_query_rows(scaled_guide, 0, height) if self.training else None
        band_first = 0
        band_rows = -(-chunk // width) + 1  # a chunk's rows plus the row it shares with the next
        out = features.new_empty(
            batch, channels, height, width, dtype=resolve_output_dtype(self.output_dtype, features)
        )
        flat_out = out.view(batch, channels, height * width)
        for pixels in chunk_slices(height * width, chunk):
            first, stop = pixels.start // width, (pixels.stop - 1) // width + 1
            if band is None or first < band_first or stop > band_first + band.shape[2]:
                band_first = first
                band = self.encode_query_rows(scaled_guide, first, min(height, max(stop, first + band_rows)))
            rows = band[:, :, first - band_first : stop - band_first]
            offset = first * width
            queries = rows.flatten(2)[:, :, pixels.start - offset : pixels.stop - offset].transpose(1, 2)
            flat_out[:, :, pixels] = self.decode(queries, keys_values).transpose(1, 2).to(out.dtype)
        return out
