"""FADE (Lu et al., ECCV 2022; IJCV 2024 with FADE-Lite): fusing the assets of decoder and encoder.

Kernels from encoder and decoder features together by *semi-shift convolution*: both are compressed by 1x1 convs
(encoder with bias, decoder without) to ``embedding_dim`` channels, and one shared ``e x e`` conv (zero padding,
with bias) is applied to both, the encoder at high resolution and the decoder at low resolution; output pixel
``(Y, X)`` gets ``conv(encoder)[Y, X] + conv(decoder)[Y // s, X // s]`` (the conv's bias therefore counted twice,
as in the official code), softmax over the ``k²`` taps. The official ``FADE_H2L.py`` writes the encoder half as a
stride-2 conv over four one-pixel-shifted paddings of the encoder, which is the same as the stride-1 high-res conv
used here (the tests check it). The decoder features are reassembled with these kernels (CARAFE's operation,
`featlift.ops.reassembly`) and, with ``gating``, mixed with the encoder's detail by a decoder-dependent gate::

    out = g * encoder + (1 - g) * reassembled,   g = up(sigmoid(conv1x1(decoder)))   (one channel)

FADE-Lite (``lite=True``, ``FADELite`` in ``FADE_L2H.py``): the compressors go straight to ``k²`` channels and the
shared conv is depthwise (``k²`` groups).
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
)
from featlift.upsamplers.chunking import output_dtype as resolve_output_dtype


class FADE(nn.Module):
    """FADE upsampling: decoder features ``[B, C, h, w]`` and encoder guide ``[B, Cg, s*h, s*w]`` -> ``[B, C, s*h, s*w]``.

    Arguments (the original's names in brackets, ``FADE(in_channels_en, in_channels_de, scale, up_kernel_size)``):

    - ``channels`` (in_channels_de): C, the low-res decoder features' channels.
    - ``guide_channels`` (in_channels_en): Cg, the high-res encoder features' channels; must equal C with
      ``gating`` (the gate mixes the two).
    - ``scale_factor`` (scale, 2): integer factor s, taken from the constructor; the guide must be exactly s times
      the features (InputSizeError otherwise). The original works at s = 2 only (its gate and semi-shift hard-code
      2); here any integer s >= 1, the decoder half and the gate nearest-upsampled by s.
    - ``up_kernel`` (up_kernel_size, 5): k, the odd reassembly kernel size.
    - ``encoder_kernel`` (SemiShift's kernel_size, 3): e, the odd size of the shared semi-shift conv.
    - ``gating`` (True): mix in the encoder through the gate; False returns the reassembled decoder alone (the
      official ``SemiShiftUp``).
    - ``lite`` (False): FADE-Lite's kernel generator (compress to k², depthwise conv).
    - ``embedding_dim`` (SemiShift's embedding_dim, 64): compressed channels of full FADE; unused by FADE-Lite.
    - ``chunk_rows``, ``max_memory_mib``, ``output_dtype``: as `featlift.ops.CARAFE` (not in the original).

    Parameters at C = Cg = 256, k = 5, e = 3, E = 64: FADE (256*64 + 64) + 256*64 + (64*25*9 + 25) + (256 + 1)
    = 47,514; FADE-Lite (256*25 + 25) + 256*25 + (25*9 + 25) + 257 = 13,332. The papers give whole-network
    increments only. Initialisation as the official code: Xavier-uniform conv weights, zero biases.
    """

    def __init__(
        self,
        channels: int,
        guide_channels: int,
        scale_factor: int = 2,
        up_kernel: int = 5,
        encoder_kernel: int = 3,
        gating: bool = True,
        lite: bool = False,
        embedding_dim: int = 64,
        chunk_rows: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ) -> None:
        super().__init__()
        owner = "FADE-Lite" if lite else "FADE"
        for name, value in (("channels", channels), ("guide_channels", guide_channels)):
            if int(value) != value or value < 1:
                raise ValueError(f"{owner} {name} must be an integer >= 1, got {value}")
        if gating and guide_channels != channels:
            raise ValueError(
                f"{owner} with gating mixes encoder and decoder channel by channel: guide_channels "
                f"({guide_channels}) must equal channels ({channels}), or set gating=False"
            )
        if int(encoder_kernel) != encoder_kernel or encoder_kernel < 1 or encoder_kernel % 2 == 0:
            raise ValueError(f"{owner} encoder_kernel must be an odd integer >= 1, got {encoder_kernel}")
        if int(embedding_dim) != embedding_dim or embedding_dim < 1:
            raise ValueError(f"{owner} embedding_dim must be an integer >= 1, got {embedding_dim}")
        check_chunk_rows(owner, chunk_rows, max_memory_mib)
        resolve_output_dtype(output_dtype, torch.empty(0))
        self.owner = owner
        self.channels = int(channels)
        self.guide_channels = int(guide_channels)
        self.scale_factor = check_scale_factor(owner, scale_factor)
        self.up_kernel = check_kernel_size(owner, up_kernel)
        self.encoder_kernel = int(encoder_kernel)
        self.gating = bool(gating)
        self.lite = bool(lite)
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)
        self.max_memory_mib = None if max_memory_mib is None else float(max_memory_mib)
        self.output_dtype = output_dtype
        taps = self.up_kernel**2
        self.embedding_dim = taps if self.lite else int(embedding_dim)
        self.compress_guide = nn.Conv2d(self.guide_channels, self.embedding_dim, 1)
        self.compress_features = nn.Conv2d(self.channels, self.embedding_dim, 1, bias=False)
        self.kernel_encoder = nn.Conv2d(
            self.embedding_dim, taps, self.encoder_kernel, groups=taps if self.lite else 1
        )
        if self.gating:
            self.gate = nn.Conv2d(self.channels, 1, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Xavier-uniform conv weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, band: torch.Tensor) -> torch.Tensor:
        """The shared semi-shift conv on a band already padded by the conv's halo in rows (zeros), not columns."""
        halo = self.encoder_kernel // 2
        return F.conv2d(
            band,
            self.kernel_encoder.weight,
            self.kernel_encoder.bias,
            padding=(0, halo),
            groups=self.kernel_encoder.groups,
        )

    def kernel_logits(self, guide: torch.Tensor, compressed_features: torch.Tensor, start: int, stop: int):
        """``[B, k², stop - start, s*w]``: the semi-shift kernels (before the softmax) of output rows
        ``start .. stop-1``."""
        halo, scale = self.encoder_kernel // 2, self.scale_factor
        height = guide.shape[-2]
        inside = guide[:, :, max(0, start - halo) : min(height, stop + halo)]
        compressed_guide = self.compress_guide(inside)
        above, below = max(0, halo - start), max(0, stop + halo - height)
        if above or below:
            compressed_guide = F.pad(compressed_guide, (0, 0, above, below))
        from_guide = self.encode(compressed_guide)
        first, last = low_res_rows(start, stop, scale, 0)
        from_features = self.encode(rows_with_zero_halo(compressed_features, first - halo, last + halo))
        return from_guide + nearest_rows(from_features, first, last, start, stop, scale)

    def forward(self, features: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, s*h, s*w]``: decoder `features` ``[B, C, h, w]`` upsampled with the encoder `guide`
        ``[B, Cg, s*h, s*w]`` (required)."""
        check_operator_inputs(
            self.owner, features, guide, self.channels, self.guide_channels, self.scale_factor
        )
        scale = self.scale_factor
        compressed_features = self.compress_features(features)
        gate = torch.sigmoid(self.gate(features)) if self.gating else None

        def kernel_rows(start: int, stop: int) -> torch.Tensor:
            logits = self.kernel_logits(guide, compressed_features, start, stop)
            return logits.to(compute_dtype(logits.dtype)).softmax(dim=1)

        def mix_in_guide(start: int, stop: int, band: torch.Tensor) -> torch.Tensor:
            first, last = low_res_rows(start, stop, scale, 0)
            gate_rows = nearest_rows(gate[:, :, first : last + 1], first, last, start, stop, scale)
            return torch.lerp(band, guide[:, :, start:stop].to(band.dtype), gate_rows.to(band.dtype))

        width = guide.shape[-1]
        taps, dim = self.up_kernel**2, self.embedding_dim
        extra = (dim + 4 * taps) * width * 4.0
        if self.gating:
            extra += 2 * self.channels * width * 4.0
        return reassemble(
            features,
            kernel_rows,
            scale,
            self.up_kernel,
            chunk_rows=self.chunk_rows,
            max_memory_mib=self.max_memory_mib,
            extra_bytes_per_row=extra,
            finish_rows=mix_in_guide if self.gating else None,
            out_dtype=resolve_output_dtype(self.output_dtype, features),
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, guide_channels={self.guide_channels}, scale_factor={self.scale_factor}, "
            f"up_kernel={self.up_kernel}, gating={self.gating}, lite={self.lite}, chunk_rows={self.chunk_rows}"
        )
