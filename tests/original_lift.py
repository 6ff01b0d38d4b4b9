"""The parameter names of the original LiFT code (github.com/kirchhausenlab/lift, ``lift.py``), written out.

Its ``LiFT(in_channels=32, patch_size=16)`` registers ``up1`` (``Up``: ``up`` a ConvTranspose2d and
``conv_1.double_conv`` a DoubleConv), ``outc``, ``image_convs_1``, ``scale_adapter`` (a parameter-free
max-pool) and ``image_convs_2``; each row is (its state-dict key, featlift's key, the shape for 32 channels).
Kept literal on purpose: the tests check featlift's key map against these, not against itself.
"""

ORIGINAL_LIFT_32_CHANNELS = [
    ("up1.up.weight", "up.weight", (64, 32, 2, 2)),
    ("up1.up.bias", "up.bias", (32,)),
    ("up1.conv_1.double_conv.0.weight", "fuse.0.weight", (16, 64, 3, 3)),
    ("up1.conv_1.double_conv.1.weight", "fuse.1.weight", (16,)),
    ("up1.conv_1.double_conv.1.bias", "fuse.1.bias", (16,)),
    ("up1.conv_1.double_conv.1.running_mean", "fuse.1.running_mean", (16,)),
    ("up1.conv_1.double_conv.1.running_var", "fuse.1.running_var", (16,)),
    ("up1.conv_1.double_conv.1.num_batches_tracked", "fuse.1.num_batches_tracked", ()),
    ("up1.conv_1.double_conv.3.weight", "fuse.3.weight", (16, 16, 3, 3)),
    ("up1.conv_1.double_conv.4.weight", "fuse.4.weight", (16,)),
    ("up1.conv_1.double_conv.4.bias", "fuse.4.bias", (16,)),
    ("up1.conv_1.double_conv.4.running_mean", "fuse.4.running_mean", (16,)),
    ("up1.conv_1.double_conv.4.running_var", "fuse.4.running_var", (16,)),
    ("up1.conv_1.double_conv.4.num_batches_tracked", "fuse.4.num_batches_tracked", ()),
    ("outc.weight", "head.weight", (32, 16, 1, 1)),
    ("outc.bias", "head.bias", (32,)),
    ("image_convs_1.0.weight", "image_stem.0.weight", (32, 3, 3, 3)),
    ("image_convs_1.0.bias", "image_stem.0.bias", (32,)),
    ("image_convs_1.1.weight", "image_stem.1.weight", (32,)),
    ("image_convs_1.1.bias", "image_stem.1.bias", (32,)),
    ("image_convs_1.1.running_mean", "image_stem.1.running_mean", (32,)),
    ("image_convs_1.1.running_var", "image_stem.1.running_var", (32,)),
    ("image_convs_1.1.num_batches_tracked", "image_stem.1.num_batches_tracked", ()),
    ("image_convs_1.3.weight", "image_stem.3.weight", (32, 32, 3, 3)),
    ("image_convs_1.3.bias", "image_stem.3.bias", (32,)),
    ("image_convs_1.4.weight", "image_stem.4.weight", (32,)),
    ("image_convs_1.4.bias", "image_stem.4.bias", (32,)),
    ("image_convs_1.4.running_mean", "image_stem.4.running_mean", (32,)),
    ("image_convs_1.4.running_var", "image_stem.4.running_var", (32,)),
    ("image_convs_1.4.num_batches_tracked", "image_stem.4.num_batches_tracked", ()),
    ("image_convs_2.0.weight", "image_down.0.weight", (32, 32, 3, 3)),
    ("image_convs_2.0.bias", "image_down.0.bias", (32,)),
    ("image_convs_2.1.weight", "image_down.1.weight", (32,)),
    ("image_convs_2.1.bias", "image_down.1.bias", (32,)),
    ("image_convs_2.1.running_mean", "image_down.1.running_mean", (32,)),
    ("image_convs_2.1.running_var", "image_down.1.running_var", (32,)),
    ("image_convs_2.1.num_batches_tracked", "image_down.1.num_batches_tracked", ()),
]


def original_lift_state(seed: int = 0, prefix: str = "module.") -> dict:
    """Random trained-like tensors under the original key names (DataParallel's `module.` prefix by default)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for original, _, shape in ORIGINAL_LIFT_32_CHANNELS:
        if original.endswith("num_batches_tracked"):
            value = torch.tensor(1000)
        elif original.endswith("running_var"):
            value = torch.rand(shape, generator=generator) + 0.5
        else:
            value = torch.randn(shape, generator=generator) * 0.1
        state[prefix + original] = value
    return state
