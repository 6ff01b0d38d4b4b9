"""Backbone + optional upsampler as one module: ``[0, 1]`` images in, dense features out."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .backbones import ViTBackbone
from .errors import InputSizeError
from .pixels import check_layout, check_values
from .upsamplers import Upsampler

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

    Without an upsampler, ``h' = H / patch``. With one, ``h' = 2**iters * H / patch``, or ``output_size``
    when given. The upsampler is guided by the same normalised image the backbone sees. ``amp``
    ("bf16"/"fp16") runs both under autocast and ``channels_last`` feeds the upsampler NHWC tensors
    (see `featlift.inference`); the output is always float32. ``checkpoint`` records where the
    upsampler's weights came from.

    Example:
        >>> pipe = FeaturePipeline(backbone, load_checkpoint("lift_ckpt", backbone)[0], iters=2)
        >>> pipe(images).shape  # images: [4, 3, 224, 224] with patch 14 -> [4, 384, 64, 64]
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        upsampler: Upsampler | None = None,
        iters: int = 1,
        output_size: tuple[int, int] | None = None,
        *,
        amp: str | None = None,
        channels_last: bool = False,
        checkpoint: str | None = None,
    ):
        super().__init__()
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        check_amp(amp)
        self.backbone = backbone
        self.upsampler = upsampler.eval() if upsampler is not None else None
        self.iters = iters
        self.output_size = tuple(output_size) if output_size is not None else None
        self.amp = amp
        self.channels_last = channels_last
        self.checkpoint = checkpoint

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """`images` as the backbone takes them (its device, dtype), else `InputSizeError` saying what is wrong.

        Expected: RGB ``[B, 3, H, W]`` float pixels in ``[0, 1]`` (see `featlift.pixels`) on the pipeline's
        device; float16, bfloat16 and float64 pixels are converted to the backbone's dtype.
        """
        check_layout(images, "images", batched=True)
        weight = next(self.backbone.parameters())
        if images.device != weight.device:
            raise InputSizeError(
                f"images are on {images.device}, the pipeline on {weight.device}: "
                f"move them with .to({str(weight.device)!r})"
            )
        if images.device.type != "meta":  # a shape-only run (`featlift.memory_estimate`) has no values
            check_values(images, "images", uint8=False)
        return images.to(weight.dtype)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        grid = self.backbone.grid_size(height, width)
        if self.output_size is not None:
            return self.output_size
        if self.upsampler is None:
            return grid
        return grid[0] * 2**self.iters, grid[1] * 2**self.iters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_images(images)
        with torch.inference_mode(), autocast(images.device, self.amp):
            normalized = self.backbone.normalize(images)
            features = self.backbone(normalized)
            if self.upsampler is not None:
                if self.channels_last:
                    features = features.contiguous(memory_format=torch.channels_last)
                    normalized = normalized.contiguous(memory_format=torch.channels_last)
                features = self.upsampler(
                    features, normalized, iters=self.iters, output_size=self.output_size
                )
            elif self.output_size is not None:
                features = nn.functional.interpolate(
                    features, size=self.output_size, mode="bilinear", align_corners=False
                )
            return features.float().contiguous()


def resolve_upsampler(
    backbone: ViTBackbone, upsampler: str | None = "lift", checkpoint: str | None = None
) -> tuple[Upsampler | None, str | None]:
    """Build the upsampler named `upsampler` for `backbone`; return it and the checkpoint folder used.

    ``None``/``"none"`` -> no upsampler. A trainable upsampler needs `checkpoint`, except when featlift
    ships one for this backbone, layer and facet, which is then used.
    """
    from .checkpoint import load_checkpoint
    from .errors import FeatliftError
    from .pretrained import find_shipped_checkpoint
    from .upsamplers import create_upsampler, get_upsampler_class

    if upsampler in (None, "none"):
        if checkpoint is not None:
            raise FeatliftError(
                "a checkpoint was given with upsampler 'none'; pass --upsampler lift (or drop --checkpoint)"
            )
        return None, None
    cls = get_upsampler_class(upsampler)
    if not cls.trainable:
        if checkpoint is not None:
            raise FeatliftError(f"upsampler {upsampler!r} has no weights, so --checkpoint does not apply")
        return create_upsampler(upsampler, channels=backbone.channels, patch_size=backbone.patch_size), None
    if checkpoint is None:
        shipped = find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, upsampler)
        if shipped is None:
            raise FeatliftError(
                f"upsampler {upsampler!r} needs --checkpoint: featlift ships none for {backbone.name} layer "
                f"{backbone.layer} facet {backbone.facet}; train one with `featlift train` or use --upsampler bilinear"
            )
        checkpoint = str(shipped)
    module, config = load_checkpoint(checkpoint, backbone=backbone)
    if config.upsampler != upsampler:
        raise FeatliftError(
            f"checkpoint {checkpoint} holds a {config.upsampler!r} upsampler, not {upsampler!r}"
        )
    return module, str(checkpoint)


def build_pipeline(
    backbone: str | ViTBackbone,
    *,
    weights: str | None = None,
    layer: int | None = None,
    facet: str = "token",
    upsampler: str | None = "lift",
    checkpoint: str | None = None,
    iters: int = 1,
    output_size: tuple[int, int] | None = None,
) -> FeaturePipeline:
    """One call from names to a ready `FeaturePipeline` (what ``featlift extract`` runs)."""
    from .backbones import create_backbone

    if isinstance(backbone, str):
        backbone = create_backbone(backbone, weights=weights, layer=layer, facet=facet)
    module, used = resolve_upsampler(backbone, upsampler, checkpoint)
    return FeaturePipeline(
        backbone, module, iters=iters if module is not None else 0, output_size=output_size, checkpoint=used
    )
