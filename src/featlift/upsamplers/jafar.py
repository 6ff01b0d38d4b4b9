"""JAFAR (Couairon et al., NeurIPS 2025): attention from every output pixel to the token grid, with
image-derived queries and feature-modulated keys; the output is the attention-weighted raw features.

For ``C`` feature channels, ``D = qk_dim`` (128), 4 heads and a guide image ``[B, 3, Hg, Wg]`` (the
normalised image the backbone saw):

- image encoder: ``kernel_size`` conv 3->D (reflect padding, no bias), two `ResidualBlock`s -> ``[B, D, Hg, Wg]``,
  then 2-D rotary embedding (`RotaryEmbedding2d`) of every pixel at its ``linspace(0, 1)`` grid coordinates;
- queries: query encoder (1x1 conv D->D, two residual blocks) of the encoding, adaptive-average-pooled to the
  output size, GroupNorm(8, no affine) over the whole pooled map, 3x3 conv (zero padding, no bias);
- keys: key encoder (same shape) of the encoding, adaptive-average-pooled to the token grid ``h x w``,
  GroupNorm(8, no affine), modulated (SFT) by an encoding of the L2-normalised features (1x1 conv C->D, two
  residual blocks): ``scale(e) * keys + shift(e)`` with 1x1 convs ``scale``, ``shift``;
- attention: queries and keys RMS-normalised and projected (``nn.MultiheadAttention`` with 4 heads), the
  head-averaged softmax weights over the ``h * w`` keys weight the RAW features ``[B, h * w, C]``.

628,480 parameters at C=384 (the official count; `HeadAveragedAttention` keeps the unused value norm, value
and output projections of the official ``nn.MultiheadAttention``, 66,176 of them).

Differences from the official code (github.com/PaulCouairon/JAFAR), none in results (the reference test
agrees with its outputs to float noise):

- the query path, the score matrix and the attention run in chunks of output pixels (`attend_in_chunks`,
  options ``chunk_size`` / ``max_memory_mib``), each chunk's pooled query rows pooled from their own input rows
  (with a one-row halo for the 3x3 conv); the query GroupNorm's statistics over the whole pooled map are
  accumulated in float64 in a first pass over row bands. The official code holds ``[output pixels x D]``
  several times and the ``[heads x output pixels x tokens]`` scores at once;
- the value and output projections of ``nn.MultiheadAttention``, whose result the official code discards, are
  not computed;
- ``output_dtype`` allocates the output in another dtype (each chunk is computed in the features' dtype);
- with no output size requested the output is the guide image's size (``grid x patch_size``): the official
  entry point has no default; the authors evaluate at the image size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputSizeError
from ..weightfiles import refuse_non_finite
from .attention_blocks import (
    GROUPS,
    ConvEncoder,
    GuidedAttentionUpsampler,
    HeadAveragedAttention,
    QueryRows,
    reflect_conv,
    rename_encoder_keys,
)
from .base import Capabilities
from .official_weights import check_official_state_dict, load_strictly
from .registry import register_upsampler
from .rotary import RotaryEmbedding2d

OFFICIAL_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
"""The timm backbone of the official JAFAR checkpoint (ViT-S/14 DINOv2, final-norm patch tokens)."""

GROUP_NORM_EPS = 1e-5


class FeatureModulation(nn.Module):
    """SFT: ``scale(e) * GroupNorm(keys) + shift(e)`` for a feature encoding ``e`` (1x1 convs, no bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.shift = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(GROUPS, channels, affine=False)

    def forward(self, keys: torch.Tensor, encoding: torch.Tensor) -> torch.Tensor:
        return self.scale(encoding) * self.norm(keys) + self.shift(encoding)


def image_encoder(in_channels: int, channels: int, kernel_size: int) -> ConvEncoder:
    return ConvEncoder(reflect_conv(in_channels, channels, kernel_size), channels, channels)


@register_upsampler("jafar")
class JAFAR(GuidedAttentionUpsampler):
    """JAFAR for ``channels`` feature channels (see the module doc).

    Example:
        >>> jafar = JAFAR(channels=384).eval()
        >>> jafar(torch.randn(1, 384, 16, 16), torch.randn(1, 3, 224, 224), (448, 448)).shape
        torch.Size([1, 384, 448, 448])
    """

    capabilities = Capabilities(guide="input", output_sizes="any", objective="jafar")

    def __init__(
        self,
        channels: int,
        qk_dim: int = 128,
        num_heads: int = 4,
        kernel_size: int = 1,
        patch_size: int = 14,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        super().__init__(
            "JAFAR", qk_dim, num_heads, kernel_size, patch_size, chunk_size, max_memory_mib, output_dtype
        )
        if channels < 1:
            raise ValueError(f"JAFAR channels must be >= 1, got {channels}")
        if qk_dim < GROUPS or qk_dim % GROUPS or qk_dim % 4:
            raise ValueError(f"JAFAR qk_dim must be a multiple of 4 and of {GROUPS}, got {qk_dim}")
        self.channels = int(channels)

        self.image_encoder = image_encoder(3, qk_dim, kernel_size)
        self.rotary = RotaryEmbedding2d(qk_dim)
        self.query_encoder = image_encoder(qk_dim, qk_dim, 1)
        self.key_encoder = image_encoder(qk_dim, qk_dim, 1)
        self.key_features_encoder = image_encoder(channels, qk_dim, 1)
        self.key_modulation = FeatureModulation(qk_dim)
        self.query_mixer = nn.Conv2d(qk_dim, qk_dim, kernel_size=3, padding=1, bias=False)
        self.attention = HeadAveragedAttention(qk_dim, num_heads, value_dim=channels, value_norm=True)

    @classmethod
    def from_features(cls, channels: int, patch_size: int, **args: Any) -> JAFAR:
        return cls(channels=channels, patch_size=patch_size, **args)

    def config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "qk_dim": self.qk_dim,
            "num_heads": self.num_heads,
            "kernel_size": self.kernel_size,
            "patch_size": self.patch_size,
        }

    def check_features(self, features: torch.Tensor) -> None:
        if features.shape[1] != self.channels:
            raise InputSizeError(
                f"JAFAR was built for {self.channels} feature channels, got features with {features.shape[1]}"
            )

    def encode_keys(self, encoded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``[B, heads, h * w, d]`` projected keys."""
        batch, _, height, width = features.shape
        keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), (height, width))
        keys = self.key_modulation(keys, self.key_features_encoder(F.normalize(features, dim=1)))
        return self.attention.project_keys(keys.flatten(2).transpose(1, 2))

    def query_group_norm(self, pooled: QueryRows, rows_per_band: int):
        """The query GroupNorm over the whole pooled map, as a function of pooled rows: its per-group mean and
        variance accumulated in float64 (float32 on MPS) over bands of `rows_per_band` rows."""
        height, width = pooled.output_size
        source = pooled.source
        batch, channels = source.shape[:2]
        wide = torch.float32 if source.device.type == "mps" else torch.float64  # MPS has no float64
        total = torch.zeros(batch, GROUPS, dtype=wide, device=source.device)
        squares = torch.zeros_like(total)
        for start in range(0, height, rows_per_band):
            band = pooled.pooled(start, min(height, start + rows_per_band)).to(wide)
            band = band.reshape(batch, GROUPS, -1)
            total += band.sum(dim=-1)
            squares += band.square().sum(dim=-1)
        count = channels // GROUPS * height * width
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        scale = (variance + GROUP_NORM_EPS).rsqrt()
        mean = mean.to(source.dtype).repeat_interleave(channels // GROUPS, dim=1)[:, :, None, None]
        scale = scale.to(source.dtype).repeat_interleave(channels // GROUPS, dim=1)[:, :, None, None]
        return lambda rows: (rows - mean) * scale

    def prepare_queries(self, queries: QueryRows, chunk: int) -> None:
        queries.normalize = self.query_group_norm(queries, max(1, chunk // queries.output_size[1]))


# Official parameter names (github.com/PaulCouairon/JAFAR) -> ours, besides the encoders' ``.0.`` / ``.1.``.
OFFICIAL_NAMES = {
    "cross_decode.cross_attn.norm_q.weight": "attention.query_norm.weight",
    "cross_decode.cross_attn.norm_k.weight": "attention.key_norm.weight",
    "cross_decode.cross_attn.norm_v.weight": "attention.value_norm.weight",
    "cross_decode.cross_attn.attention.q_proj_weight": "attention.query_proj.weight",
    "cross_decode.cross_attn.attention.k_proj_weight": "attention.key_proj.weight",
    "cross_decode.cross_attn.attention.v_proj_weight": "attention.value_proj.weight",
    "cross_decode.cross_attn.attention.out_proj.weight": "attention.output_proj.weight",
    "cross_decode.cross_attn.attention.out_proj.bias": "attention.output_proj.bias",
    "cross_decode.conv2d.weight": "query_mixer.weight",
    "sft_key.gamma.weight": "key_modulation.scale.weight",
    "sft_key.beta.weight": "key_modulation.shift.weight",
    "rope.freqs": "rotary.freqs",
}
ENCODERS = ("image_encoder", "query_encoder", "key_encoder", "key_features_encoder")
PACKED_BIAS = "cross_decode.cross_attn.attention.in_proj_bias"
SIGNATURE = (
    "sft_key.gamma.weight",
    "cross_decode.cross_attn.attention.q_proj_weight",
    "image_encoder.0.weight",
)


def official_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The JAFAR state dict inside what `read_weights_file` returned: ``{"jafar": state_dict}`` (the official
    file) or the state dict itself; CheckpointError naming `source` otherwise."""
    expected = (
        "expected a JAFAR checkpoint: {'jafar': state_dict} with keys 'image_encoder.*', 'sft_key.*', "
        "'cross_decode.*' ... (65 tensors)"
    )
    if isinstance(obj, dict) and set(obj) == {"jafar"}:
        obj = obj["jafar"]
    return check_official_state_dict(obj, source, expected, SIGNATURE)


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official JAFAR state dict's keys to this module's; split the packed in-projection bias."""
    converted = {}
    for key, value in state.items():
        if key == PACKED_BIAS:
            query, key_bias, value_bias = value.chunk(3)
            converted["attention.query_proj.bias"] = query
            converted["attention.key_proj.bias"] = key_bias
            converted["attention.value_proj.bias"] = value_bias
        elif key in OFFICIAL_NAMES:
            converted[OFFICIAL_NAMES[key]] = value
        elif key.split(".", 1)[0] in ENCODERS:
            converted[rename_encoder_keys(key)] = value
        else:
            converted[key] = value  # unknown: refused by the strict load with its name
    return converted


def from_official(obj: Any, source: str, patch_size: int = 14) -> JAFAR:
    """The official JAFAR checkpoint (what `read_weights_file` returned for it) as a `JAFAR` in eval mode.

    The constructor arguments come from the shapes (channels, qk_dim, kernel_size); ``num_heads`` is not in
    the shapes: 4, the official configuration's. `patch_size` is the backbone's (only the native output size).
    """
    state = official_state_dict(obj, source)
    stem = state["image_encoder.0.weight"]
    features = state.get("key_features_encoder.0.weight")
    if stem.ndim != 4 or stem.shape[1] != 3 or features is None or features.ndim != 4:
        raise CheckpointError(
            f"{source}: expected image_encoder.0.weight [qk_dim, 3, k, k] and key_features_encoder.0.weight "
            f"[qk_dim, channels, 1, 1], found {list(stem.shape)} and "
            f"{None if features is None else list(features.shape)}"
        )
    refuse_non_finite(state, source, CheckpointError)
    module = JAFAR(
        channels=features.shape[1], qk_dim=stem.shape[0], kernel_size=stem.shape[-1], patch_size=patch_size
    )
    load_strictly(module, convert_official_state_dict(state), source, "JAFAR")
    return module.eval()
