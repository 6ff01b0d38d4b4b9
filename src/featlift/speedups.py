"""Inference-speed transforms for a `FeaturePipeline`: BN folding, channels-last, autocast, torch.compile.

`fold_batchnorm` returns a copy of a module in which every ``Conv2d`` directly followed by a
``BatchNorm2d`` (inside an ``nn.Sequential``, as in LiFT's conv-BN-ReLU blocks) carries the BN's
affine map in its own weight and bias, and the BN is replaced by ``nn.Identity``. In eval mode the
copy computes the same function (to float rounding) with fewer passes over memory; the module
you pass is left untouched, so it can still be trained or saved with its original state-dict keys.

`InferenceOptions` says which transforms to apply and `optimize_pipeline` applies them:

- ``fold_bn`` (default on): exact up to float rounding;
- ``channels_last`` (default on): NHWC memory layout for the upsampler's convolutions (same outputs;
  faster on CPU with oneDNN);
- ``amp``: ``"bf16"``/``"fp16"`` autocast for backbone and upsampler; changes outputs slightly, so it is
  off unless asked for (and it pays only on hardware with fast bf16/fp16 matrix units);
- ``compile``: ``torch.compile`` of the upsampler's ``forward`` (needs a C++ compiler on CPU; slow
  first call).

``benchmarks/speed_options.py`` measures each option's time and output difference.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .pipeline import FeaturePipeline, check_amp
from .upsamplers import Upsampler

logger = logging.getLogger(__name__)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A deep copy of `module` in eval mode with each Conv2d -> BatchNorm2d pair folded into the conv.

    Only pairs that are consecutive children of an ``nn.Sequential`` are folded (the BN must see the
    conv's output and nothing else). Returns the copy; `module` is not modified.
    """
    folded = copy.deepcopy(module).eval()
    count = 0
    for parent in folded.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if (
                type(conv) is nn.Conv2d
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
            ):
                parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                parent._modules[second] = nn.Identity()
                count += 1
    logger.debug("folded %d BatchNorm layers into convolutions", count)
    folded.folded_batchnorms = count
    return folded


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """Which speed transforms `optimize_pipeline` applies (see the module docstring)."""

    fold_bn: bool = True
    channels_last: bool = True
    amp: str | None = None  # None, "bf16" or "fp16"
    compile: bool = False

    def __post_init__(self) -> None:
        check_amp(self.amp)

    def describe(self) -> str:
        parts = [
            name for name, on in (("fold-bn", self.fold_bn), ("channels-last", self.channels_last)) if on
        ]
        if self.amp:
            parts.append(f"amp-{self.amp}")
        if self.compile:
            parts.append("compile")
        return "+".join(parts) or "plain"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PLAIN = InferenceOptions(fold_bn=False, channels_last=False)  # no transform at all


def optimize_upsampler(upsampler: Upsampler | None, options: InferenceOptions) -> Upsampler | None:
    """A copy of `upsampler` with the options' module transforms applied (BN folding, layout, compile)."""
    if upsampler is None:
        return None
    module = fold_batchnorm(upsampler) if options.fold_bn else copy.deepcopy(upsampler).eval()
    if options.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if options.compile:
        module.forward = torch.compile(module.forward, dynamic=False)
    return module


def optimize_pipeline(pipeline: FeaturePipeline, options: InferenceOptions | None = None) -> FeaturePipeline:
    """`pipeline` with the speed `options` applied (default: BN folding, channels-last). The input is not modified.

    The options add to what the pipeline already does, they take nothing away: its autocast stays unless
    ``options.amp`` names one, and its channels-last layout stays when the options leave it off.
    """
    options = options or InferenceOptions()
    if options == PLAIN:
        return pipeline
    if type(pipeline) is not FeaturePipeline:  # a subclass may compute something else: leave it as it is
        logger.info(
            "%s is not a plain FeaturePipeline; inference options not applied", type(pipeline).__name__
        )
        return pipeline
    options = dataclasses.replace(
        options,
        amp=options.amp or pipeline.amp,
        channels_last=options.channels_last or pipeline.channels_last,
    )
    optimized = FeaturePipeline(
        pipeline.backbone,
        optimize_upsampler(pipeline.upsampler, options),
        output_size=pipeline.output_size,
        amp=options.amp,
        channels_last=options.channels_last,
        checkpoint=pipeline.checkpoint,
    )
    # Parameters of the upsampler as trained (folding BN changes the count, not the function).
    optimized.upsampler_parameter_count = (
        sum(p.numel() for p in pipeline.upsampler.parameters()) if pipeline.upsampler is not None else 0
    )
    return optimized
