"""torch.hub entry points: one per upsampler module that ships inside featlift, each a ready feature pipeline.

    pipeline = torch.hub.load("<owner>/featlift", "lift_dinov2_vits14")            # backbone weights via timm
    pipeline = torch.hub.load("path/to/featlift", "lift_dinov2_vits14", source="local",
                              weights="dinov2_vits14.safetensors", iters=2)         # local backbone weights
    features = pipeline(images)     # images: [B, 3, H, W] RGB in [0, 1], H and W multiples of 14

Each entry returns `featlift.pipeline.FeaturePipeline` (what ``featlift.build_pipeline`` builds): the backbone,
normalisation inside, and the shipped upsampler checkpoint for it. featlift is imported from this repository's
``src/`` (so a torch.hub checkout needs no install), unless a featlift is already imported in the process.
"""

import os
import sys

# the modules `import featlift` needs (torch.hub checks that each can be imported before calling an entry)
dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub", "numpy", "PIL", "tqdm"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "featlift")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)


def _shipped_pipeline(backbone_name, upsampler, pretrained, weights, output_size, device, options):
    import torch

    import featlift
    from featlift.pretrained import find_shipped_checkpoint

    backbone = featlift.create_backbone(backbone_name, weights=weights, pretrained=pretrained)
    checkpoint = find_shipped_checkpoint(backbone_name, backbone.layer, backbone.facet, upsampler)
    if checkpoint is None:
        raise featlift.CheckpointError(
            f"this featlift ships no {upsampler} checkpoint for {backbone_name}: the installed or checked-out "
            "package is incomplete (its featlift/pretrained folder lacks it)"
        )
    pipeline = featlift.build_pipeline(
        backbone, upsampler=upsampler, checkpoint=str(checkpoint), output_size=output_size, **options
    )
    return pipeline.to(torch.device(device)) if device is not None else pipeline


def lift_dinov2_vits14(pretrained=True, weights=None, iters=None, output_size=None, device=None, **options):
    """DINOv2 ViT-S/14 (``vit_small_patch14_dinov2.lvd142m``, last block, token facet) + featlift's shipped LiFT.

    pretrained: the backbone weights from timm (downloaded by timm as usual); False gives a randomly
        initialised backbone (the LiFT then warns that it was trained for other weights).
    weights: a local backbone weights file (safetensors or .pth; timm, DINO or DINOv2 layout) instead of timm's.
    iters: LiFT's 2x passes (default 1: 2x the token grid; 2: 4x, ...).
    output_size: (h, w) of the output grid, instead of the method's own.
    device: where to put the pipeline (default: the CPU).
    Other keyword arguments are LiFT's options (``featlift.upsamplers.LiFT.options``).
    """
    if iters is not None:
        options["iters"] = iters
    return _shipped_pipeline(
        "vit_small_patch14_dinov2.lvd142m", "lift", pretrained, weights, output_size, device, options
    )


def naf_dinov2_vits14(pretrained=True, weights=None, output_size=None, device=None, **options):
    """DINOv2 ViT-S/14 (``vit_small_patch14_dinov2.lvd142m``, last block, token facet) + featlift's shipped NAF.

    NAF (Chambon et al., CVPR 2026) as trained by featlift for this backbone: 1 epoch at 448 px on
    ImageNet-sample images, the shipped LiFT's wall-time budget (the README's tables). Its guide reads only the
    image: attention over the raw features in a 9x9 window of the token grid.

    pretrained: the backbone weights from timm (downloaded by timm as usual); False gives a randomly
        initialised backbone (the NAF then warns that it was trained for other weights).
    weights: a local backbone weights file (safetensors or .pth; timm, DINO or DINOv2 layout) instead of timm's.
    output_size: (h, w) of the output grid; by default NAF's own, the input image's size in pixels.
    device: where to put the pipeline (default: the CPU).
    Other keyword arguments are NAF's options (``featlift.upsamplers.naf.NAF.options``: ``chunk_size``,
    ``max_memory_mib``, ``output_dtype``).
    """
    return _shipped_pipeline(
        "vit_small_patch14_dinov2.lvd142m", "naf", pretrained, weights, output_size, device, options
    )
