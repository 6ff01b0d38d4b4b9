"""Backbone + optional upsampler as one module: ``[0, 1]`` images in, dense features out."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .backbones import Backbone, create_backbone
from .checkpoint import load_checkpoint
from .errors import FeatliftError, InputSizeError
from .images import resize_images
from .pixels import check_layout, check_values
from .pretrained import find_shipped_checkpoint
from .upsamplers import Upsampler, get_upsampler_class
from .upsamplers.base import resize_features

SourceImages = torch.Tensor | Sequence[torch.Tensor] | None

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | None) -> None:
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp {amp!r}: expected None or one of {', '.join(AMP_DTYPES)}")


def autocast(device: str | torch.device, amp: str | None):
    """``torch.autocast`` for `amp` ("bf16"/"fp16") on `device`'s type, or a no-op context for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[amp])


class FeaturePipeline(nn.Module):
    """``[B, 3, H, W]`` images in ``[0, 1]`` -> ``[B, C, h', w']`` features.

    Without an upsampler, ``(h', w')`` is the token grid ``(H / patch, W / patch)`` (or ``output_size``, by
    bilinear resizing). With one, it is ``output_size`` when given, else the upsampler's
    `~featlift.upsamplers.Upsampler.native_output_size` for the grid (LiFT: ``2**iters`` times it). The
    upsampler gets the guide its capabilities ask for (`featlift.upsamplers.base.GUIDES`), built from the
    images the backbone sees or, when the caller passes them, the decoded source images. ``amp``
    ("bf16"/"fp16") runs both under autocast and ``channels_last`` feeds the upsampler NHWC tensors (see
    `featlift.speedups`); the output is always float32. ``checkpoint`` records where the upsampler's
    weights came from.

    A backbone tapped at several layers gives their maps concatenated along channels. With its
    ``layers_as == "separate"`` the upsampler runs on each layer's channels on its own (same guide, same
    output size) and the results are concatenated again in layer order; `Backbone.split_layers` splits the
    output into one map per layer.

    Example:
        >>> pipe = FeaturePipeline(backbone, create_upsampler("lift", ..., iters=2))
        >>> pipe(images).shape  # images: [4, 3, 224, 224] with patch 14 -> [4, 384, 64, 64]
    """

    def __init__(
        self,
        backbone: Backbone,
        upsampler: Upsampler | None = None,
        output_size: tuple[int, int] | None = None,
        *,
        amp: str | None = None,
        channels_last: bool = False,
        checkpoint: str | None = None,
    ):
        super().__init__()
        check_amp(amp)
        if output_size is not None:
            output_size = tuple(int(s) for s in output_size)
            if len(output_size) != 2 or min(output_size) < 1:
                raise ValueError(f"output_size must be (height, width) >= 1, got {output_size!r}")
        self.backbone = backbone
        self.upsampler = upsampler.eval() if upsampler is not None else None
        self.output_size = output_size
        self.amp = amp
        self.channels_last = channels_last
        self.checkpoint = checkpoint

    def check_images(self, images: torch.Tensor, where: str = "images") -> torch.Tensor:
        """`images` as the backbone takes them (its device, dtype), else `InputSizeError` saying what is wrong.

        Expected: RGB ``[B, 3, H, W]`` float pixels in ``[0, 1]`` (see `featlift.pixels`) on the pipeline's
        device; float16, bfloat16 and float64 pixels are converted to the backbone's dtype.
        """
        check_layout(images, where, batched=True)
        weight = next(self.backbone.parameters())
        if images.device != weight.device:
            raise InputSizeError(
                f"{where} are on {images.device}, the pipeline on {weight.device}: "
                f"move them with .to({str(weight.device)!r})"
            )
        if images.device.type != "meta":  # a shape-only run (`featlift.memory_estimate`) has no values
            check_values(images, where, uint8=False)
        return images.to(weight.dtype)

    @property
    def upsamples_layers_separately(self) -> bool:
        """True when the backbone taps several layers and asks for them ``separate``: one upsampler call each."""
        return len(self.backbone.layers) > 1 and self.backbone.layers_as == "separate"

    @property
    def wants_sources(self) -> bool:
        """True when the upsampler is guided by the image at the output size or at its own size
        (``capabilities.guide`` ``"output"`` or ``"source"``): callers then pass the pixels before any resize."""
        return self.upsampler is not None and self.upsampler.capabilities.guide in ("output", "source")

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h', w')`` of the features of ``height x width`` images."""
        grid = self.backbone.grid_size(height, width)
        if self.output_size is not None:
            return self.output_size
        if self.upsampler is None:
            return grid
        return tuple(self.upsampler.native_output_size(grid))

    def guide(
        self,
        images: torch.Tensor,
        output_size: tuple[int, int],
        sources: SourceImages = None,
        normalized: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The normalised guide image the upsampler asks for (None for ``guide="none"`` or no upsampler).

        ``input``: `images` (`normalized`, when the caller has normalised them already, is used as it is);
        ``output``: the sources (else `images`) resized to `output_size` with `featlift.images.resize_images`;
        ``source``: the sources at their own size (several sizes: all resized to the largest), else `images`.
        """
        wanted = self.upsampler.capabilities.guide if self.upsampler is not None else "none"
        if wanted == "none":
            return None
        if normalized is not None and (wanted == "input" or (wanted == "source" and sources is None)):
            return normalized
        pixels = images
        if self.wants_sources and sources is not None:
            pixels = self._source_batch(sources, images)
        if wanted == "output":
            pixels = resize_images(pixels, output_size)
        return self.backbone.normalize(pixels)

    def _source_batch(self, sources: SourceImages, images: torch.Tensor) -> torch.Tensor:
        items = list(sources) if not isinstance(sources, torch.Tensor) else sources
        if len(items) != images.shape[0]:
            raise InputSizeError(f"sources: {len(items)} images for a batch of {images.shape[0]}")
        if isinstance(items, torch.Tensor):
            return self.check_images(items, "sources")
        checked = [self.check_images(item[None], f"sources[{k}]") for k, item in enumerate(items)]
        size = (max(c.shape[-2] for c in checked), max(c.shape[-1] for c in checked))
        return torch.cat([resize_images(c, size) for c in checked])

    def forward(self, images: torch.Tensor, sources: SourceImages = None) -> torch.Tensor:
        """Features of `images`; `sources` (optional) are the same pictures before any resize, as a
        ``[B, 3, H0, W0]`` tensor or a list of ``[3, Hk, Wk]`` tensors, for methods guided at high resolution."""
        images = self.check_images(images)
        with torch.inference_mode(), autocast(images.device, self.amp):
            normalized = self.backbone.normalize(images)
            features = self.backbone(normalized)
            size = self.output_grid(*images.shape[-2:])
            if self.upsampler is None:
                return resize_features(features, size).float().contiguous()
            guide = self.guide(images, size, sources, normalized)
            del normalized  # the guide may be a channels-last copy of it: hold one image, not two
            if self.channels_last:
                features = features.contiguous(memory_format=torch.channels_last)
                if guide is not None:
                    guide = guide.contiguous(memory_format=torch.channels_last)
            if self.upsampler.capabilities.fitting != "per-image":
                if self.upsamples_layers_separately:
                    parts = self.backbone.split_layers(features).values()
                    return self._as_output(
                        torch.cat([self.upsampler(part, guide, size) for part in parts], 1)
                    )
                return self._as_output(self.upsampler(features, guide, size))
        # a method optimised per image needs autograd: leave inference mode, with ordinary copies of its inputs
        features = features.clone()
        guide = guide.clone() if guide is not None else None
        with torch.enable_grad(), autocast(images.device, self.amp):
            features = self.upsampler.fit_upsample(features, guide, size, self.features_of)
        return self._as_output(features.detach())

    def features_of(self, normalized: torch.Tensor) -> torch.Tensor:
        """The backbone's tokens ``[N, C, h, w]`` of normalised images ``[N, 3, H, W]``, without gradients (not
        inference tensors, so a per-image fit may use them in autograd): the `~featlift.upsamplers.base.FeaturesOf`
        a per-image method gets (`~featlift.upsamplers.Upsampler.fit_upsample`), e.g. for jittered views."""
        if normalized.ndim != 4 or normalized.shape[1] != 3:
            raise InputSizeError(
                f"features_of: expected normalised images [N, 3, H, W], got {list(normalized.shape)}"
            )
        self.backbone.grid_size(*normalized.shape[-2:])
        weight = next(self.backbone.parameters())
        with torch.no_grad(), autocast(normalized.device, self.amp):
            return self.backbone(normalized.to(weight.dtype)).float()

    def _as_output(self, features: torch.Tensor) -> torch.Tensor:
        """float32 (autocast may give bf16), unless the method was asked for an ``output_dtype``: a float16
        map it computed in chunks is not copied into a float32 one twice its size."""
        if getattr(self.upsampler, "output_dtype", None) is None:
            features = features.float()
        return features.contiguous()


def resolve_upsampler(
    backbone: Backbone,
    upsampler: str | None = "lift",
    checkpoint: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Upsampler | None, str | None]:
    """Build the upsampler named `upsampler` for `backbone`; return it and the checkpoint folder used.

    ``None``/``"none"`` -> no upsampler. A trained upsampler needs `checkpoint`, except when featlift
    ships one for this backbone, layer and facet, which is then used. `options` are constructor
    arguments the class lists in ``options`` (e.g. LiFT's ``iters``); they apply over a checkpoint's.
    """
    options = dict(options or {})
    if upsampler in (None, "none"):
        if checkpoint is not None:
            raise FeatliftError(
                "a checkpoint was given with upsampler 'none'; pass --upsampler lift (or drop --checkpoint)"
            )
        if options:
            raise FeatliftError(f"upsampler 'none' takes no options, got {', '.join(sorted(options))}")
        return None, None
    cls = get_upsampler_class(upsampler)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise FeatliftError(
            f"upsampler {upsampler!r} takes no option(s) {', '.join(unknown)}; "
            f"its options: {', '.join(cls.options) or 'none'}"
        )
    channels = backbone.channels
    if len(backbone.layers) > 1 and backbone.layers_as == "separate":
        channels = _separate_layer_channels(backbone, upsampler, cls)
    if not cls.trainable:
        if checkpoint is not None:
            raise FeatliftError(
                f"upsampler {upsampler!r} has no trained weights, so --checkpoint does not apply"
            )
        try:
            module = cls.from_features(channels, backbone.patch_size, **options)
        except (TypeError, ValueError) as exc:
            raise FeatliftError(f"upsampler {upsampler!r} with {options}: {exc}") from exc
        return module, None
    if checkpoint is None:
        shipped = (
            find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, upsampler)
            if len(backbone.layers) == 1
            else None
        )
        if shipped is None:
            raise FeatliftError(
                f"upsampler {upsampler!r} needs --checkpoint: featlift ships none for {backbone.name} layer "
                f"{backbone.layer_label} facet {backbone.facet}; train one with `featlift train` or use --upsampler bilinear"
            )
        checkpoint = str(shipped)
    module, config = load_checkpoint(checkpoint, backbone=backbone, options=options)
    if config.upsampler != upsampler:
        raise FeatliftError(
            f"checkpoint {checkpoint} holds a {config.upsampler!r} upsampler, not {upsampler!r}"
        )
    return module, str(checkpoint)


def _separate_layer_channels(backbone: Backbone, upsampler: str, cls: type[Upsampler]) -> int:
    """The channels of each layer, for an upsampler run on the layers one at a time (``layers_as="separate"``);
    refused for trained and per-image methods, and for layers of different widths."""
    layers = backbone.layer_label
    if cls.trainable:
        raise FeatliftError(
            f"upsampler {upsampler!r} is trained, so it cannot upsample layers {layers} separately: its checkpoint "
            "fits the features of the layers it was trained on, not each layer alone. Use layers_as='concat' "
            "(--layers-as concat) with a checkpoint trained on these layers, or an untrained method such as bilinear"
        )
    if cls.capabilities.fitting == "per-image":
        raise FeatliftError(
            f"upsampler {upsampler!r} is fitted on each image against the backbone's features, so it cannot "
            f"upsample layers {layers} separately; use layers_as='concat' (--layers-as concat)"
        )
    widths = set(backbone.layer_channels)
    if len(widths) != 1:
        raise FeatliftError(
            f"layers {layers} of {backbone.name} have different channel counts {backbone.layer_channels}, so one "
            f"{upsampler!r} module cannot serve each of them; use layers_as='concat'"
        )
    return widths.pop()


def build_pipeline(
    backbone: str | Backbone,
    *,
    weights: str | None = None,
    layer: int | Sequence[int] | None = None,
    facet: str = "token",
    upsampler: str | None = "lift",
    checkpoint: str | None = None,
    output_size: tuple[int, int] | None = None,
    layers_as: str | None = None,
    **options: Any,
) -> FeaturePipeline:
    """One call from names to a ready `FeaturePipeline` (what ``featlift extract`` runs).

    `layer` may list several blocks (``[3, 6, 9, 11]``); `layers_as` (``concat``, the default, or
    ``separate``) says how they are given (see `FeaturePipeline`). Keyword arguments beyond these are the
    upsampler's options, e.g. ``build_pipeline(..., iters=2)``.
    """
    if isinstance(backbone, str):
        backbone = create_backbone(
            backbone, weights=weights, layer=layer, facet=facet, layers_as=layers_as or "concat"
        )
    elif layers_as is not None:
        backbone.set_layers_as(layers_as)
    module, used = resolve_upsampler(backbone, upsampler, checkpoint, options)
    return FeaturePipeline(backbone, module, output_size=output_size, checkpoint=used)
