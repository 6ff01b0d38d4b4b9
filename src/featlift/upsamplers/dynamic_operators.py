"""CARAFE, SAPA, FADE and DySample (`featlift.ops`) as featlift upsamplers, trained with LiFT's 2x objective.

Each wraps its operator in `OperatorUpsampler` (iterated ``scale``-x passes sharing the weights; see
`featlift.upsamplers.operator_upsampler`). CARAFE and DySample upsample from the features alone
(``guide="none"``); SAPA and FADE get encoder features at each pass's output size from the `ImageStem` of the
image the backbone saw (``guide="input"``). ``config()`` holds ``channels``, ``scale`` and the operator's own
constructor arguments (defaults: the papers'); ``iters``, ``chunk_size``, ``max_memory_mib`` and
``output_dtype`` are options of use.

    >>> up = create_upsampler("dysample", channels=384)
    >>> up(torch.randn(1, 384, 16, 16), None, (64, 64)).shape   # two 2x passes
    torch.Size([1, 384, 64, 64])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..ops.carafe import CARAFE
from ..ops.dysample import DySample
from ..ops.fade import FADE
from ..ops.sapa import SAPA
from .base import Capabilities
from .operator_upsampler import STEM_CHANNELS, OperatorUpsampler
from .registry import register_upsampler

UNGUIDED = Capabilities(guide="none", output_sizes="power-of-two", objective="lift")
GUIDED = Capabilities(guide="input", output_sizes="power-of-two", objective="lift")


@register_upsampler("carafe")
class CARAFEUpsampler(OperatorUpsampler):
    """`featlift.ops.CARAFE` (Wang et al., ICCV 2019): content-aware reassembly kernels from the features."""

    capabilities = UNGUIDED
    label = "carafe"

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        up_kernel: int = 5,
        encoder_kernel: int = 3,
        encoder_dilation: int = 1,
        compressed_channels: int = 64,
        groups: int = 1,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        settings = {
            "up_kernel": up_kernel,
            "encoder_kernel": encoder_kernel,
            "encoder_dilation": encoder_dilation,
            "compressed_channels": compressed_channels,
            "groups": groups,
        }
        super().__init__(channels, scale, iters, chunk_size, max_memory_mib, output_dtype, settings)

    def build_operator(self, **settings: Any) -> nn.Module:
        return CARAFE(self.channels, self.scale, max_memory_mib=self.max_memory_mib, **settings)


@register_upsampler("sapa")
class SAPAUpsampler(OperatorUpsampler):
    """`featlift.ops.SAPA` (Lu et al., NeurIPS 2022): kernels from the similarity of encoder queries (the image
    stem's, ``32`` channels; ``C`` for variant "I", which compares them with the features directly) and
    feature keys."""

    capabilities = GUIDED
    guided = True
    label = "sapa"

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        up_kernel: int = 5,
        embedding_dim: int = 32,
        qkv_bias: bool = True,
        norm: bool = True,
        variant: str = "B",
        norm_groups: int = 32,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        settings = {
            "up_kernel": up_kernel,
            "embedding_dim": embedding_dim,
            "qkv_bias": qkv_bias,
            "norm": norm,
            "variant": variant,
            "norm_groups": norm_groups,
        }
        super().__init__(channels, scale, iters, chunk_size, max_memory_mib, output_dtype, settings)

    def build_operator(self, **settings: Any) -> nn.Module:
        guide_channels = self.channels if settings["variant"] == "I" else STEM_CHANNELS
        return SAPA(self.channels, guide_channels, self.scale, max_memory_mib=self.max_memory_mib, **settings)


@register_upsampler("fade")
class FADEUpsampler(OperatorUpsampler):
    """`featlift.ops.FADE` (Lu et al., ECCV 2022): kernels from encoder and features together, and with
    ``gating`` a learned per-pixel mix of the reassembled features and the encoder features (the image stem's,
    ``C`` channels then so that they mix channel by channel; ``32`` without gating)."""

    capabilities = GUIDED
    guided = True
    label = "fade"

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        up_kernel: int = 5,
        encoder_kernel: int = 3,
        gating: bool = True,
        lite: bool = False,
        embedding_dim: int = 64,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        settings = {
            "up_kernel": up_kernel,
            "encoder_kernel": encoder_kernel,
            "gating": gating,
            "lite": lite,
            "embedding_dim": embedding_dim,
        }
        super().__init__(channels, scale, iters, chunk_size, max_memory_mib, output_dtype, settings)

    def build_operator(self, **settings: Any) -> nn.Module:
        guide_channels = self.channels if settings["gating"] else STEM_CHANNELS
        return FADE(self.channels, guide_channels, self.scale, max_memory_mib=self.max_memory_mib, **settings)


@register_upsampler("dysample")
class DySampleUpsampler(OperatorUpsampler):
    """`featlift.ops.DySample` (Liu et al., ICCV 2023): point sampling at learned offsets, from the features."""

    capabilities = UNGUIDED
    label = "dysample"

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        style: str = "lp",
        groups: int = 4,
        dyscope: bool = False,
        iters: int | None = None,
        chunk_size: int | None = None,
        max_memory_mib: float | None = None,
        output_dtype: str | None = None,
    ):
        settings = {"style": style, "groups": groups, "dyscope": dyscope}
        super().__init__(channels, scale, iters, chunk_size, max_memory_mib, output_dtype, settings)

    def build_operator(self, **settings: Any) -> nn.Module:
        return DySample(self.channels, self.scale, max_memory_mib=self.max_memory_mib, **settings)
