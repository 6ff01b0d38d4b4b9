"""CARAFE (Wang et al., ICCV 2019): content-aware reassembly of features, kernels predicted from the features.

What mmcv's ``CARAFEPack`` computes, in pure PyTorch: a 1x1 ``channel_compressor`` (C -> m), a
``content_encoder`` conv (m -> G * k² * s², ``encoder_kernel`` x ``encoder_kernel``, ``encoder_dilation``,
zero padding keeping the size), pixel shuffle by ``s`` (channel ``(g * k² + tap) * s² + dy * s + dx`` of low-res
pixel ``(y, x)`` becomes tap ``g * k² + tap`` of output pixel ``(s*y + dy, s*x + dx)``, mmcv's layout, so its
weights load as they are), a softmax over the ``k²`` taps of each group, and kernel reassembly
(`featlift.ops.reassembly`).
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
    reassemble,
    rows_with_zero_halo,
)
from featlift.upsamplers.chunking import output_dtype as resolve_output_dtype


class CARAFE(nn.Module):
    """CARAFE upsampling: ``[B, C, h, w] -> [B, C, s*h, s*w]``, no guide.

    Arguments (the original's names in brackets, mmcv ``CARAFEPack``; defaults are the paper's):

    - ``channels`` (channels): C, the features' channels.
    - ``scale_factor`` (scale_factor, 2): integer upsampling factor s.
    - ``up_kernel`` (up_kernel, 5): k, the odd size of the reassembly kernel.
    - ``encoder_kernel`` (encoder_kernel, 3): size of the content encoder's conv (odd).
    - ``encoder_dilation`` (encoder_dilation, 1): dilation of the content encoder's conv.
    - ``compressed_channels`` (compressed_channels, 64): m, channels after the 1x1 compressor.
    - ``groups`` (up_group, 1): G, kernel groups; channel c uses the kernels of group ``c // (C / G)``.
    - ``chunk_rows``: output rows computed at once (None: as many as ``max_memory_mib`` holds). Not in the
      original (its CUDA op needs no working memory); the result does not depend on it.
    - ``max_memory_mib``: working-memory budget of a chunk when ``chunk_rows`` is None (None: 512 MiB).
    - ``output_dtype``: ``"float32"``, ``"float16"``, ``"bfloat16"`` or None (the features' dtype).

    Parameters: ``C*m + m + m*G*k²*s²*e² + G*k²*s²`` = 74,148 at C=256, m=64, k=5, e=3, s=2, G=1 (the paper's
    Table of upsampling operators gives 74K). Initialisation as mmcv: Xavier-uniform compressor, content encoder
    normal(std=0.001), zero biases.
    """

    def __init__(
        self,
        channels: int,
        scale_factor: int = 2,
        up_kernel: int = 5,
        encoder_kernel: int = 3,
        encoder_dilation: int = 1,
        compressed_channels: int = 64,
        groups: int = 1,
        chunk_rows: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ) -> None:
        super().__init__()
        owner = "CARAFE"
        if int(channels) != channels or channels < 1:
            raise ValueError(f"{owner} channels must be an integer >= 1, got {channels}")
        if int(groups) != groups or groups < 1 or channels % groups:
            raise ValueError(
                f"{owner} groups must be an integer >= 1 dividing channels={channels}, got {groups}"
            )
        if int(encoder_kernel) != encoder_kernel or encoder_kernel < 1 or encoder_kernel % 2 == 0:
            raise ValueError(f"{owner} encoder_kernel must be an odd integer >= 1, got {encoder_kernel}")
        if int(encoder_dilation) != encoder_dilation or encoder_dilation < 1:
            raise ValueError(f"{owner} encoder_dilation must be an integer >= 1, got {encoder_dilation}")
        if int(compressed_channels) != compressed_channels or compressed_channels < 1:
            raise ValueError(
                f"{owner} compressed_channels must be an integer >= 1, got {compressed_channels}"
            )
        check_chunk_rows(owner, chunk_rows, max_memory_mib)
        resolve_output_dtype(output_dtype, torch.empty(0))
        self.channels = int(channels)
        self.scale_factor = check_scale_factor(owner, scale_factor)
        self.up_kernel = check_kernel_size(owner, up_kernel)
        self.encoder_kernel = int(encoder_kernel)
        self.encoder_dilation = int(encoder_dilation)
        self.compressed_channels = int(compressed_channels)
        self.groups = int(groups)
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self.max_memory_mib = None if max_memory_mib is None else float(max_memory_mib)
        self.output_dtype = output_dtype
        self.encoder_halo = (self.encoder_kernel - 1) * self.encoder_dilation // 2
        kernel_channels = self.groups * self.up_kernel**2 * self.scale_factor**2
        self.channel_compressor = nn.Conv2d(self.channels, self.compressed_channels, 1)
        self.content_encoder = nn.Conv2d(
            self.compressed_channels, kernel_channels, self.encoder_kernel, dilation=self.encoder_dilation
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Xavier-uniform compressor, normal(0, 0.001) content encoder, zero biases."""
        nn.init.xavier_uniform_(self.channel_compressor.weight)
        nn.init.zeros_(self.channel_compressor.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)
        nn.init.zeros_(self.content_encoder.bias)

    def kernel_logits(self, compressed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``[B, G*k², stop - start, s*w]``: the content encoder's (unnormalised) kernels of output rows
        ``start .. stop-1``, from the compressed features' low-res rows they sit in plus the encoder's halo."""
        scale = self.scale_factor
        first, last = low_res_rows(start, stop, scale, 0)
        band = rows_with_zero_halo(compressed, first - self.encoder_halo, last + self.encoder_halo)
        logits = F.conv2d(
            band,
            self.content_encoder.weight,
            self.content_encoder.bias,
            padding=(0, self.encoder_halo),
            dilation=self.encoder_dilation,
        )
        shuffled = F.pixel_shuffle(logits, scale)
        return shuffled[:, :, start - first * scale : stop - first * scale]

    def kernels(self, compressed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The kernels of output rows ``start .. stop-1``: `kernel_logits` softmax-normalised over each group's
        ``k²`` taps, in float32 (float64 for double inputs)."""
        logits = self.kernel_logits(compressed, start, stop)
        batch, _, rows, width = logits.shape
        grouped = logits.to(compute_dtype(logits.dtype)).view(
            batch, self.groups, self.up_kernel**2, rows, width
        )
        return grouped.softmax(dim=2).view(batch, -1, rows, width)

    def forward(self, features: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, s*h, s*w]``: `features` ``[B, C, h, w]`` upsampled; CARAFE takes no guide (ValueError)."""
        check_operator_inputs("CARAFE", features, guide, self.channels, None, self.scale_factor)
        compressed = self.channel_compressor(features)
        width = features.shape[-1]
        kernel_bytes = 4 * self.groups * self.up_kernel**2 * self.scale_factor * width * 4
        return reassemble(
            features,
            lambda start, stop: self.kernels(compressed, start, stop),
            self.scale_factor,
            self.up_kernel,
            groups=self.groups,
            chunk_rows=self.chunk_rows,
            max_memory_mib=self.max_memory_mib,
            extra_bytes_per_row=kernel_bytes,
            out_dtype=resolve_output_dtype(self.output_dtype, features),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, scale_factor={self.scale_factor}, up_kernel={self.up_kernel}, "
            f"groups={self.groups}, chunk_rows={self.chunk_rows}, max_memory_mib={self.max_memory_mib}"
        )
