"""The pieces JAFAR and AnyUp share: conv encoders of residual blocks, and cross-attention from output pixels
to the token grid whose averaged weights mix the raw features, computed in chunks of output pixels.

Both methods build their queries the same way: an encoding of the guide image, ``[B, D, Hg, Wg]``, is
adaptive-average-pooled to the output size, (JAFAR: group-normalised,) convolved 3x3 (zero padding, no
bias), RMS-normalised and projected. The official code materialises all of it at the output size (and the
``[output pixels x tokens]`` score matrix, and AnyUp's window mask); here every per-output-pixel tensor
exists only for one chunk of output pixels at a time:

- `pool_rows`: the rows ``start:stop`` of ``adaptive_avg_pool2d(x, output_size)``, each pooled from its own
  input rows, so the values are those of the whole pooled map;
- `QueryRows.rows`: the 3x3-convolved query rows of a chunk from its pooled rows and a one-row halo;
- `HeadAveragedAttention`: ``nn.MultiheadAttention``'s attention weights (``need_weights=True``,
  ``average_attn_weights=True``): ``softmax(q k^T / sqrt(d))`` per head, averaged over the heads; the
  value and output projections are kept (they are in the checkpoints and the parameter counts) but unused,
  because both methods discard the attention's output and weight the raw features instead; they are frozen
  (``requires_grad=False``) so that DDP, which refuses parameters without gradients, and optimisers skip them;
- `attend_in_chunks`: the loop over chunks of output pixels, writing each chunk into a preallocated output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Upsampler, check_inputs
from .chunking import CHUNK_OPTIONS, DEFAULT_MAX_MEMORY_MIB, chunk_length, chunk_slices, set_chunking
from .chunking import output_dtype as resolve_output_dtype

GROUPS = 8
"""GroupNorm groups of every residual block (both methods)."""


class ResidualBlock(nn.Module):
    """GroupNorm(8) - SiLU - 1x1 conv - GroupNorm(8) - SiLU - 1x1 conv, plus the input (1x1 conv when the
    channel count changes). No biases in the convolutions."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(x)))
        out = self.conv2(F.silu(self.norm2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


def reflect_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """A bias-free ``kernel_size`` conv with reflect padding that keeps the map's size (odd kernels)."""
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect", bias=False
    )


class ConvEncoder(nn.Module):
    """``stem`` (a conv, or any module that maps the input to ``stem_channels``), then two `ResidualBlock`s
    to ``channels``."""

    def __init__(self, stem: nn.Module, stem_channels: int, channels: int, blocks: int = 2):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(
            [ResidualBlock(stem_channels if i == 0 else channels, channels) for i in range(blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def rename_encoder_keys(key: str, block_names: dict[str, str] | None = None) -> str:
    """An official ``<encoder>.<i>.<rest>`` key as ours: ``.0.`` is the stem, ``.1.``/``.2.`` the blocks.

    `block_names` renames the blocks' sub-keys (AnyUp's ``block.0`` -> ``norm1`` ...).
    """
    name, index, rest = key.split(".", 2)
    if index == "0":
        return f"{name}.stem.{rest}"
    if block_names:
        for old, new in block_names.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
    return f"{name}.blocks.{int(index) - 1}.{rest}"


def pooled_bin(index: int, size_in: int, size_out: int) -> tuple[int, int]:
    """The input range ``[start, stop)`` that ``adaptive_avg_pool`` averages for output `index`."""
    return (index * size_in) // size_out, -((-(index + 1) * size_in) // size_out)


def pool_rows(x: torch.Tensor, output_size: tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``F.adaptive_avg_pool2d(x, output_size)``, ``[B, C, stop - start, W_out]``.

    Each output row is pooled from its own input rows (its bin), so the values equal the whole map's.
    """
    batch, channels, height, _ = x.shape
    out = x.new_empty(batch, channels, stop - start, output_size[1])
    for row in range(start, stop):
        first, last = pooled_bin(row, height, output_size[0])
        out[:, :, row - start : row - start + 1] = F.adaptive_avg_pool2d(
            x[:, :, first:last], (1, output_size[1])
        )
    return out


class QueryRows:
    """The 3x3-convolved query map of one output size, row band by row band.

    ``source`` is the query encoding at the guide's size; ``normalize`` (optional) maps pooled rows to the
    rows the convolution sees (JAFAR's group norm); ``conv`` is the bias-free 3x3 conv with zero padding 1.
    """

    def __init__(
        self,
        source: torch.Tensor,
        output_size: tuple[int, int],
        conv: nn.Conv2d,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.source = source
        self.output_size = output_size
        self.conv = conv
        self.normalize = normalize

    def pooled(self, start: int, stop: int) -> torch.Tensor:
        rows = pool_rows(self.source, self.output_size, start, stop)
        return rows if self.normalize is None else self.normalize(rows)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``conv(pooled map)`` (zero padding at the map's borders), ``[B, D, n, W]``."""
        height = self.output_size[0]
        first, last = max(start - 1, 0), min(stop + 1, height)
        band = self.pooled(first, last)
        band = F.pad(band, (1, 1, int(start == 0), int(stop == height)))
        return F.conv2d(band, self.conv.weight)


class HeadAveragedAttention(nn.Module):
    """The attention weights of ``nn.MultiheadAttention(qk_dim, num_heads)`` after RMS-normalising queries and
    keys, averaged over the heads: ``[B, N, M]`` for ``N`` queries and ``M`` keys.

    ``value_dim`` and ``value_norm`` only shape the unused value path of the original checkpoints (JAFAR
    normalises and projects its values from ``value_dim`` channels; AnyUp projects its keys again).
    """

    def __init__(self, qk_dim: int, num_heads: int, value_dim: int | None = None, value_norm: bool = False):
        super().__init__()
        if num_heads < 1 or qk_dim % num_heads:
            raise ValueError(f"qk_dim {qk_dim} must be a multiple of num_heads {num_heads}")
        value_dim = qk_dim if value_dim is None else value_dim
        self.num_heads = int(num_heads)
        self.head_dim = qk_dim // num_heads
        self.query_norm = nn.RMSNorm(qk_dim)
        self.key_norm = nn.RMSNorm(qk_dim)
        self.query_proj = nn.Linear(qk_dim, qk_dim)
        self.key_proj = nn.Linear(qk_dim, qk_dim)
        self.value_proj = nn.Linear(value_dim, qk_dim)  # unused: kept for the checkpoints
        self.output_proj = nn.Linear(qk_dim, qk_dim)  # unused: kept for the checkpoints
        self.value_norm = nn.RMSNorm(value_dim) if value_norm else None  # unused: kept for the checkpoints
        for (
            parameter
        ) in self.unused_parameters():  # no gradient ever reaches them: DDP and optimisers skip them
            parameter.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The value path's parameters: in the checkpoints, never in the output."""
        unused = [*self.value_proj.parameters(), *self.output_proj.parameters()]
        return unused + ([] if self.value_norm is None else list(self.value_norm.parameters()))

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """``[B, M, D]`` keys -> ``[B, heads, M, d]``."""
        batch, count, _ = keys.shape
        projected = self.key_proj(self.key_norm(keys))
        return projected.view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)

    def weights(
        self, queries: torch.Tensor, keys: torch.Tensor, outside: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Head-averaged weights ``[B, N, M]`` of ``[B, N, D]`` queries over `project_keys` output; keys where
        the ``[N, M]`` bool `outside` is True get no weight."""
        batch, count, _ = queries.shape
        projected = self.query_proj(self.query_norm(queries))
        projected = projected.view(batch, count, self.num_heads, self.head_dim).transpose(1, 2)
        scores = (projected * math.sqrt(1.0 / self.head_dim)) @ keys.transpose(-2, -1)
        if outside is not None:
            scores.masked_fill_(outside, float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)


def query_bytes(qk_dim: int, num_heads: int, keys: int, channels: int, element_size: int) -> int:
    """Working bytes one output pixel (query) needs in `attend_in_chunks`, from the tensors a chunk creates:

    the query path (pooled, normalised, padded, convolved, flattened, RMS-normalised and its temporaries,
    projected, scaled: ~10 x ``qk_dim``), the scores and their softmax (``2 x heads x keys``), the averaged
    weights and the window mask (``2 x keys``), and the weighted features and their copy into the output
    (``2 x channels``). This sums what a chunk creates; fewer are alive at once (measured: ~60% of it at
    C=384, 256 keys), so a chunk stays within the budget it was sized for.
    """
    return element_size * (10 * qk_dim + 2 * num_heads * keys + 2 * keys + 2 * channels)


def chunk_pixels(
    total: int,
    width: int,
    per_query: int,
    qk_dim: int,
    element_size: int,
    chunk_size: int | None,
    max_memory_mib: float | None,
) -> int:
    """Output pixels per chunk: `chunk_size`, or what the budget holds after the fixed cost of a chunk's
    row halo (three query rows of ``width`` pixels at ~10 x ``qk_dim`` each)."""
    if chunk_size is not None:
        return chunk_length(total, per_query, chunk_size=chunk_size)
    budget = DEFAULT_MAX_MEMORY_MIB if max_memory_mib is None else float(max_memory_mib)
    halo_mib = 3 * width * 10 * qk_dim * element_size / 2**20
    return chunk_length(total, per_query, max_memory_mib=max(budget - halo_mib, budget / 4))


def attend_in_chunks(
    queries: QueryRows,
    attention: HeadAveragedAttention,
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    chunk: int,
    outside: Callable[[slice], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Fill `out` ``[B, C, H, W]`` with the attention-weighted `values` ``[B, M, C]`` for every output pixel,
    `chunk` pixels (row-major) at a time; `keys` come from `HeadAveragedAttention.project_keys`, `outside`
    gives a chunk's ``[n, M]`` mask of the keys its pixels must not see (AnyUp's windows)."""
    batch, channels, height, width = out.shape
    flat_out = out.view(batch, channels, height * width)
    for pixels in chunk_slices(height * width, chunk):
        first_row, stop_row = pixels.start // width, (pixels.stop - 1) // width + 1
        rows = queries.rows(first_row, stop_row).flatten(2)
        offset = first_row * width
        chunk_queries = rows[:, :, pixels.start - offset : pixels.stop - offset].transpose(1, 2)
        weights = attention.weights(chunk_queries, keys, None if outside is None else outside(pixels))
        flat_out[:, :, pixels] = (weights @ values).transpose(1, 2)
    return out


class GuidedAttentionUpsampler(Upsampler):
    """What JAFAR and AnyUp share: an image encoding with 2-D RoPE, queries from it pooled to the output size,
    keys on the token grid, and head-averaged attention over the raw features, computed in chunks of output pixels
    into an output allocated in ``output_dtype``; with no size asked for, the output has the guide's pixel size.

    A subclass builds ``image_encoder``, ``rotary``, ``query_encoder``, ``query_mixer`` and ``attention`` and
    implements `encode_keys`; it may check the features (`check_features`), prepare the pooled queries
    (`prepare_queries`: JAFAR's GroupNorm) and restrict each pixel's keys (`outside_keys`: AnyUp's windows).
    """

    options = (*CHUNK_OPTIONS, "output_dtype")

    def __init__(
        self,
        method: str,
        qk_dim: int,
        num_heads: int,
        kernel_size: int,
        patch_size: int,
        chunk_size: int | None,
        max_memory_mib: float | None,
        output_dtype: str | None,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{method} kernel_size must be odd and >= 1, got {kernel_size}")
        if patch_size < 1:
            raise ValueError(f"{method} patch_size must be >= 1, got {patch_size}")
        set_chunking(self, method, chunk_size, max_memory_mib, output_dtype)
        self.qk_dim = int(qk_dim)
        self.num_heads = int(num_heads)
        self.kernel_size = int(kernel_size)
        self.patch_size = int(patch_size)

    def native_output_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The guide image's size, ``grid x patch_size`` (AnyUp's official default output size)."""
        return grid[0] * self.patch_size, grid[1] * self.patch_size

    def encode_keys(self, encoded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, heads, h * w, d]`` projected keys from the RoPE'd encoding and the features."""
        raise NotImplementedError

    def check_features(self, features: torch.Tensor) -> None:
        """Raise on features this module cannot take (default: any)."""

    def prepare_queries(self, queries: QueryRows, chunk: int) -> None:
        """Set up what the pooled query rows need before the chunks run (default: nothing)."""

    def outside_keys(
        self, size: tuple[int, int], grid: tuple[int, int], device: torch.device
    ) -> Callable[[slice], torch.Tensor | None] | None:
        """Per chunk of output pixels, the mask of the keys they must not see; None: every pixel sees all."""
        return None

    def forward(
        self, features: torch.Tensor, guide: torch.Tensor | None, output_size: tuple[int, int]
    ) -> torch.Tensor:
        size = check_inputs(features, guide, output_size)
        self.check_features(features)
        batch, channels, height, width = features.shape
        encoded = self.rotary.rotate_map(self.image_encoder(guide.to(features.dtype)))
        keys = self.encode_keys(encoded, features)
        values = features.flatten(2).transpose(1, 2)
        element = features.element_size()
        per_query = query_bytes(self.qk_dim, self.num_heads, height * width, channels, element)
        chunk = chunk_pixels(
            size[0] * size[1], size[1], per_query, self.qk_dim, element, self.chunk_size, self.max_memory_mib
        )
        queries = QueryRows(self.query_encoder(encoded), size, self.query_mixer)
        self.prepare_queries(queries, chunk)
        out = features.new_empty(
            batch, channels, *size, dtype=resolve_output_dtype(self.output_dtype, features)
        )
        outside = self.outside_keys(size, (height, width), features.device)
        return attend_in_chunks(queries, self.attention, keys, values, out, chunk, outside)
