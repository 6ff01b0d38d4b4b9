"""The crops, nearest-exact resizes and channel statistics shared by the segmentation and depth probes."""

import pytest
import torch
import torchvision.transforms.functional as TF

from featlift.evaluate.channel_statistics import ChannelMoments
from featlift.evaluate.dense_maps import centre_square, shrink_nearest


def test_shrinking_a_label_map_keeps_its_ids_and_dtype():
    label = (
        torch.arange(12, dtype=torch.uint8).repeat_interleave(40).reshape(12, 40).repeat(10, 1)
    )  # [120, 40]
    small = shrink_nearest(label, 60)
    assert small.shape == (60, 20) and small.dtype == torch.uint8
    assert set(small.unique().tolist()) <= set(range(12))
    assert shrink_nearest(label, 500) is label


def test_shrinking_takes_the_value_at_the_centre_of_each_block():
    """6x6 -> 2x2: each small pixel covers a 3x3 block, whose centre pixel is (1, 1) within it, as the logits
    upsampled with align_corners=False see it; legacy 'nearest' took the top-left pixel (0, 0) instead."""
    label = torch.arange(36, dtype=torch.uint8).reshape(6, 6)
    assert shrink_nearest(label, 2).tolist() == [[7, 10], [25, 28]]


def test_shrinking_a_depth_map_keeps_its_holes_and_values():
    depth = torch.arange(1, 121, dtype=torch.float32).reshape(10, 12)
    depth[:, 1] = 0  # the centre column of the first 2-column block
    small = shrink_nearest(depth, 6)
    assert small.shape == (5, 6) and small.dtype == torch.float32
    assert set(small.flatten().tolist()) <= set(depth.flatten().tolist())  # no blended values
    assert (small[:, 0] == 0).all()  # the hole stays a hole


def test_centre_square_is_probe3d_crop_of_nyu_and_torchvision_center_crop():
    """NYUv2's 480x640 -> columns 80..559; on odd margins the offsets are torchvision's CenterCrop's."""
    depth = torch.arange(640.0).repeat(480, 1)
    square = centre_square(depth)
    assert square.shape == (480, 480) and square[0, 0] == 80 and square[0, -1] == 559
    for shape in [(3, 7, 4), (3, 4, 9), (1, 11, 6), (2, 5, 5)]:
        image = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        side = min(shape[-2:])
        assert torch.equal(centre_square(image), TF.center_crop(image, [side, side])), shape


def test_channel_moments_known_answer():
    """Channel 0 holds 1, 2, 3, 4 (mean 2.5, unbiased variance 5/3); channel 1 is constant (std floored)."""
    features = torch.tensor([[[[1.0, 2.0]], [[7.0, 7.0]]], [[[3.0, 4.0]], [[7.0, 7.0]]]])  # [2, 2, 1, 2]
    moments = ChannelMoments()
    moments.add(features[:1])
    moments.add(features[1:])
    mean, std = moments.mean_std()
    assert mean.shape == std.shape == (1, 2, 1, 1)
    assert mean.flatten().tolist() == [2.5, 7.0]
    assert std.flatten().tolist() == pytest.approx([(5 / 3) ** 0.5, 1e-6])


def test_channel_moments_streamed_equal_one_pass():
    features = torch.randn(7, 5, 3, 4) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0])[:, None, None] + 1000
    moments = ChannelMoments()
    for start in range(0, 7, 3):
        moments.add(features[start : start + 3])
    mean, std = moments.mean_std()
    assert torch.allclose(mean.flatten(), features.double().mean((0, 2, 3)).float())
    assert torch.allclose(std.flatten(), features.double().std((0, 2, 3)).float(), rtol=1e-5)
    with pytest.raises(ValueError, match="no features"):
        ChannelMoments().mean_std()
