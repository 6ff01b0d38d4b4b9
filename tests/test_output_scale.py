"""LiFT's ``output_scale`` is fitted on training images, so the held-out images measure it fairly."""

from __future__ import annotations

from conftest import IMAGENET_SAMPLE, requires_shared
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import create_backbone, load_checkpoint
from featlift.cli import main
from featlift.images import collect_images
from featlift.pretrained import find_shipped_checkpoint
from featlift.train.data import TrainImage, scan_images, split_images
from featlift.train.objectives.lift import calibration_images, checkpoint_batches, fit_output_scale


def test_training_fits_the_scale_on_training_images_not_on_held_out_ones(tmp_path):
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "imgs", count=6, corrupt=False)
    run = tmp_path / "run"
    with one_thread():
        assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0.34")) == 0
        backbone = create_backbone(TINY_NAME, weights=weights)
        module, config = load_checkpoint(run, backbone=backbone)
        train_images, held_out = split_images(scan_images(images).images, 0.34, 0)
        on_train = fit_output_scale(
            module, checkpoint_batches(backbone, calibration_images(train_images), 64)
        )
        on_held_out = fit_output_scale(module, checkpoint_batches(backbone, held_out, 64))
    assert abs(module.output_scale - on_train) < 1e-4  # a least-squares fixed point on the same images
    assert abs(module.output_scale - on_held_out) > 1e-3


def test_calibration_images_are_a_spread_subset_of_the_training_images():
    images = [f"img{i}" for i in range(130)]
    assert calibration_images(images) == images[::3]  # at most 64: every 3rd of 130
    assert calibration_images(images[:10]) == images[:10]


@requires_shared
def test_shipped_scale_was_fitted_on_training_images_only():
    shipped = find_shipped_checkpoint("vit_small_patch14_dinov2.lvd142m", 11, "token")
    module, config = load_checkpoint(shipped)
    fit = config.training["output_scale_fit"]
    assert fit["output_scale"] == module.output_scale and "training split" in fit["how"]
    args = config.training["args"]
    if IMAGENET_SAMPLE.is_dir():
        images = [TrainImage(it.path, it.relative.as_posix(), "") for it in collect_images([IMAGENET_SAMPLE])]
        train_images, held_out = split_images(images, args["val_fraction"], args["seed"])
        calibration = calibration_images(train_images)
        assert fit["images"] == len(calibration)
        assert not {im.relative for im in calibration} & {im.relative for im in held_out}
