"""SAPA (Lu et al., NeurIPS 2022): similarity-aware point affiliation, kernels from encoder-decoder similarity.

Each output pixel ``(Y, X)`` has a query from the high-res encoder feature (the guide) at ``(Y, X)``; its ``k x k``
kernel is the softmax over the taps of the similarity of that query with the keys of the low-res decoder
features around ``(Y // s, X // s)``; the output is the kernel reassembly of the (unnormalised) decoder
features (`featlift.ops.reassembly`). As the official CUDA ops: no ``1/sqrt(d)`` temperature, and a tap outside
the map has key 0 (similarity 0, still in the softmax) and value 0.

Variants (the paper's three similarity functions; official code ``SAPA.py`` / ``SAPAExp.py`` of poppinace/sapa
and ``sapa_base.py`` of tiny-smart/sapa):

- ``"I"`` inner product: query = normalised guide, key = normalised features (needs ``guide_channels ==
  channels``; no projections, ``embedding_dim`` and ``qkv_bias`` unused).
- ``"B"`` low-rank bilinear: query = 1x1 conv of the normalised guide, key = 1x1 conv of the normalised features
  (both to ``embedding_dim``); the official ``SAPA`` module.
- ``"G"`` gated bilinear: query = ``g * q_guide(norm(guide)) + (1 - g) * q_features(up(features))``, with
  ``g = up(sigmoid(gate(norm(features))))`` a one-channel gate from the decoder and ``up`` nearest upsampling
  (``SAPAExp`` with ``q_mode="gate"``); keys as in "B".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featlift.ops.reassembly import (
    check_chunk_rows,
    check_kernel_size,
    check_operator_inputs,
    check_scale_factor,
    compute_dtype,
    low_res_rows,
    nearest_rows,
    reassemble,
    rows_with_zero_halo,
    upsample_nearest,
)
from featlift.upsamplers.chunking import output_dtype as resolve_output_dtype

SAPA_VARIANTS = ("I", "B", "G")


def group_norm_statistics(tensor: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` of each sample's channel groups of `tensor` ``[B, C, H, W]``, ``[B, G, 1, 1, 1]``
    each, in float32 or better: what ``GroupNorm`` normalises with, so it can be applied a band of rows at a time."""
    grouped = tensor.unflatten(1, (groups, tensor.shape[1] // groups)).to(compute_dtype(tensor.dtype))
    var, mean = torch.var_mean(grouped, dim=(2, 3, 4), unbiased=False, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def apply_group_norm(
    rows: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, inv_std: torch.Tensor
) -> torch.Tensor:
    """`norm` applied to `rows` (a band of rows of the tensor the statistics came from)."""
    grouped = rows.unflatten(1, (norm.num_groups, rows.shape[1] // norm.num_groups)).to(mean.dtype)
    normalised = ((grouped - mean) * inv_std).flatten(1, 2)
    if norm.affine:
        normalised = normalised * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return normalised.to(rows.dtype)


class SAPA(nn.Module):
    """SAPA upsampling: features ``[B, C, h, w]`` and guide ``[B, Cg, s*h, s*w]`` -> ``[B, C, s*h, s*w]``.

    Arguments (the original's names in brackets):

    - ``channels`` (dim_x): C, the low-res decoder features' channels (the values and the keys' input).
    - ``guide_channels`` (dim_y): Cg, the high-res encoder features' channels (the queries' input).
    - ``scale_factor`` (up_factor, 2): integer factor s. Taken from the constructor; the guide must be exactly
      s times the features (InputSizeError otherwise).
    - ``up_kernel`` (up_kernel_size, 5): k, the odd kernel size.
    - ``embedding_dim`` (embedding_dim, 32 in the extended version's ``sapa_base.py``; the NeurIPS code used 64):
      channels of queries and keys ("B", "G"); unused by "I".
    - ``qkv_bias`` (qkv_bias, True): biases of the query/key (and gate) projections.
    - ``norm`` (norm, True): GroupNorm the guide and the features before the queries/keys (the extended
      version's choice; the NeurIPS code used LayerNorm over channels). The values are never normalised.
    - ``norm_groups`` (32 in the original, fixed): groups of both GroupNorms; both channel counts must divide by
      it (ValueError otherwise: set e.g. ``norm_groups=1`` or ``norm=False`` for a 3-channel image guide).
    - ``variant`` ("I", "B", "G"; the paper's SAPA-I, SAPA-B, SAPA-G, see the module docstring), default "B".
    - ``chunk_rows``, ``max_memory_mib``, ``output_dtype``: as `featlift.ops.CARAFE` (not in the original).

    Parameters at C = Cg = 256, E = 32, norm on: "I" 1,024 (the two GroupNorms), "B" 1,024 + 2 * (256*32 + 32)
    = 17,472, "G" 17,472 + (256*32 + 32) + (256 + 1) = 25,953. The paper reports only whole-network increments
    (+0.1M for SAPA-B/G in SegFormer-B1's several upsampling stages). Initialisation as the official code:
    projections normal(std=0.02), zero biases, GroupNorm weight 1 and bias 0.
    """

    def __init__(
        self,
        channels: int,
        guide_channels: int,
        scale_factor: int = 2,
        up_kernel: int = 5,
        embedding_dim: int = 32,
        qkv_bias: bool = True,
        norm: bool = True,
        variant: str = "B",
        norm_groups: int = 32,
        chunk_rows: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ) -> None:
        super().__init__()
        owner = "SAPA"
        if variant not in SAPA_VARIANTS:
            raise ValueError(f"{owner} variant must be one of {', '.join(SAPA_VARIANTS)}, got {variant!r}")
        for name, value in (("channels", channels), ("guide_channels", guide_channels)):
            if int(value) != value or value < 1:
                raise ValueError(f"{owner} {name} must be an integer >= 1, got {value}")
        if variant == "I" and guide_channels != channels:
            raise ValueError(
                f"{owner} variant 'I' (inner product) compares guide and features directly: guide_channels "
                f"({guide_channels}) must equal channels ({channels}); use variant 'B' or 'G'"
            )
        if int(embedding_dim) != embedding_dim or embedding_dim < 1:
            raise ValueError(f"{owner} embedding_dim must be an integer >= 1, got {embedding_dim}")
        if norm:
            for name, value in (("channels", channels), ("guide_channels", guide_channels)):
                if int(norm_groups) != norm_groups or norm_groups < 1 or value % norm_groups:
                    raise ValueError(
                        f"{owner} norm_groups={norm_groups} must divide {name}={value} (GroupNorm); "
                        "set norm_groups to a common divisor or norm=False"
                    )
        check_chunk_rows(owner, chunk_rows, max_memory_mib)
        resolve_output_dtype(output_dtype, torch.empty(0))
        self.channels = int(channels)
        self.guide_channels = int(guide_channels)
        self.scale_factor = check_scale_factor(owner, scale_factor)
        self.up_kernel = check_kernel_size(owner, up_kernel)
        self.embedding_dim = int(embedding_dim) if variant != "I" else self.channels
        self.variant = variant
        self.norm = bool(norm)
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self.max_memory_mib = None if max_memory_mib is None else float(max_memory_mib)
        self.output_dtype = output_dtype
        if self.norm:
            self.norm_guide = nn.GroupNorm(int(norm_groups), self.guide_channels)
            self.norm_features = nn.GroupNorm(int(norm_groups), self.channels)
        if variant in ("B", "G"):
            self.query = nn.Conv2d(self.guide_channels, self.embedding_dim, 1, bias=qkv_bias)
            self.key = nn.Conv2d(self.channels, self.embedding_dim, 1, bias=qkv_bias)
        if variant == "G":
            self.query_features = nn.Conv2d(self.channels, self.embedding_dim, 1, bias=qkv_bias)
            self.gate = nn.Conv2d(self.channels, 1, 1, bias=qkv_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: 1x1 projections normal(0, 0.02) with zero biases, GroupNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def queries(self, guide_rows: torch.Tensor, guide_stats, gate_rows, query_feature_rows) -> torch.Tensor:
        """The queries of a band of output rows from the guide's rows (and, for "G", the band's gate and
        upsampled feature queries)."""
        normalised = apply_group_norm(guide_rows, self.norm_guide, *guide_stats) if self.norm else guide_rows
        if self.variant == "I":
            return normalised
        query = self.query(normalised)
        if self.variant == "G":
            query = gate_rows * query + (1 - gate_rows) * query_feature_rows
        return query

    def forward(self, features: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, s*h, s*w]``: `features` ``[B, C, h, w]`` upsampled by the similarity kernels of `guide`
        ``[B, Cg, s*h, s*w]`` (required)."""
        check_operator_inputs("SAPA", features, guide, self.channels, self.guide_channels, self.scale_factor)
        scale, radius = self.scale_factor, self.up_kernel // 2
        normalised_features = self.norm_features(features) if self.norm else features
        keys = normalised_features if self.variant == "I" else self.key(normalised_features)
        keys = F.pad(keys, (radius, radius, 0, 0))
        guide_stats = (
            group_norm_statistics(guide, self.norm_guide.num_groups, self.norm_guide.eps)
            if self.norm
            else None
        )
        gate = query_features = None
        if self.variant == "G":
            gate = torch.sigmoid(self.gate(normalised_features))
            query_features = self.query_features(features)

        def kernel_rows(start: int, stop: int) -> torch.Tensor:
            first, last = low_res_rows(start, stop, scale, 0)
            gate_rows = query_feature_rows = None
            if gate is not None:
                gate_rows = nearest_rows(gate[:, :, first : last + 1], first, last, start, stop, scale)
                query_feature_rows = nearest_rows(
                    query_features[:, :, first : last + 1], first, last, start, stop, scale
                )
            query = self.queries(guide[:, :, start:stop], guide_stats, gate_rows, query_feature_rows)
            query = query.to(compute_dtype(query.dtype))
            key_band = rows_with_zero_halo(keys, first - radius, last + radius).to(query.dtype)
            key_band = upsample_nearest(key_band, scale)
            offset = start - (first - radius) * scale - radius * scale
            rows, width = stop - start, query.shape[-1]
            similarities = []
            for tap in range(self.up_kernel**2):
                i, j = divmod(tap, self.up_kernel)
                row0 = offset + i * scale
                shifted = key_band[:, :, row0 : row0 + rows, j * scale : j * scale + width]
                similarities.append((query * shifted).sum(dim=1))
            return torch.stack(similarities, dim=1).softmax(dim=1)

        width = guide.shape[-1]
        taps, dim = self.up_kernel**2, self.embedding_dim
        extra = (self.guide_channels + 3 * dim + 2 * taps) * width * 4.0
        return reassemble(
            features,
            kernel_rows,
            scale,
            self.up_kernel,
            chunk_rows=self.chunk_rows,
            max_memory_mib=self.max_memory_mib,
            extra_bytes_per_row=extra,
            out_dtype=resolve_output_dtype(self.output_dtype, features),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, guide_channels={self.guide_channels}, scale_factor={self.scale_factor}, "
            f"up_kernel={self.up_kernel}, variant={self.variant!r}, norm={self.norm}, chunk_rows={self.chunk_rows}"
        )
