"""`featlift train` end to end on tiny folders: odd names, corrupt files, cache, resume, errors, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import create_backbone, load_checkpoint
from featlift.backbones import ViTBackbone
from featlift.cli import main
from featlift.train.augment import color_jitter
from featlift.train.data import scan_images, split_images
from featlift.train.objectives.lift import (
    calibration_images,
    checkpoint_batches,
    fit_output_scale,
    validate_checkpoint,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_train_odd_tree_cache_resume_and_load(tmp_path, weights, monkeypatch, capsys):
    images = write_image_tree(tmp_path / "my images")
    run = tmp_path / "run dir"
    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0.34", "--augment")) == 0
    log = read_log(run)
    start = log[0]
    assert (
        start["type"] == "start"
        and start["image_files"] == 7
        and start["images"] == 6
        and start["skipped_images"] == 1
    )
    assert start["skipped"][0].endswith("broken image.jpg")
    assert start["train_images"] == 4 and start["val_images"] == 2
    first = [r for r in log if r["type"] == "epoch"][0]
    assert first["cache_misses"] > 0
    assert 0.0 < first["val_cosine_bilinear"] <= 1.0 and 0.0 < first["val_cosine_lift"] <= 1.0
    assert sum(r["type"] == "step" for r in log) == 2  # 4 train images, batch 2
    capsys.readouterr()

    # Second epoch via --resume: every feature must come from the cache, so the backbone must not run.
    def no_backbone(self, images):
        raise AssertionError("backbone called although its features are cached")

    monkeypatch.setattr(ViTBackbone, "forward", no_backbone)
    assert (
        main(
            train_args(
                images, run, weights, "--epochs", "2", "--val-fraction", "0.34", "--augment", "--resume"
            )
        )
        == 0
    )
    monkeypatch.undo()
    assert "2 epochs on 4 images (1 unreadable skipped)" in capsys.readouterr().out
    epochs = [r for r in read_log(run) if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[1]["cache_misses"] == 0 and epochs[1]["cache_hits"] == 6  # 4 train + 2 val

    backbone = create_backbone(TINY_NAME, weights=weights)
    module, config = load_checkpoint(run, backbone=backbone)
    assert config.training["epochs"] == 2 and config.training["completed"]
    assert config.training["skipped_images"] == 1 and len(config.training["val"]) == 2
    assert config.training["resumed_with"] and "--resume" in config.training["resumed_with"][0]
    assert config.upsampler_args["residual"] is True
    assert config.backbone.fingerprint == backbone.fingerprint()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = module(backbone(backbone.normalize(image)), backbone.normalize(image), (8, 8))
    assert out.shape == (1, backbone.channels, 8, 8)

    # output_scale: fitted every epoch on training images, saved in the checkpoint, and a least-squares fixed
    # point: fitting again on the same images gives the same scale, and scaling keeps the held-out cosine
    assert module.output_scale == epochs[1]["output_scale"] != 1.0
    train_images, held_out = split_images(scan_images(images).images, 0.34, 0)
    size = config.training["args"]["image_size"]
    refit = fit_output_scale(module, checkpoint_batches(backbone, calibration_images(train_images), size))
    assert abs(refit - module.output_scale) < 1e-4
    held_out_cosine = validate_checkpoint(module, checkpoint_batches(backbone, held_out, size))[
        "val_cosine_lift"
    ]
    assert abs(held_out_cosine - epochs[1]["val_cosine_lift"]) < 1e-4
    cache_files = list((run / "cache").rglob("*.safetensors"))
    assert len(cache_files) == 6 and all(f.stat().st_size > 0 for f in cache_files)


def test_existing_run_needs_resume_and_same_settings(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=3, corrupt=False)
    run = tmp_path / "run"
    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0")) == 0
    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0")) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (
        main(
            train_args(
                images, run, weights, "--epochs", "2", "--val-fraction", "0", "--lr", "0.01", "--resume"
            )
        )
        == 2
    )
    assert "lr: was 0.001, now 0.01" in capsys.readouterr().err


def test_empty_and_unusable_folders(tmp_path, weights, capsys):
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    assert main(train_args(empty, tmp_path / "run1", weights)) == 2
    assert "contains no image files" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"garbage")
    (broken / "b.png").write_bytes(b"")
    assert main(train_args(broken, tmp_path / "run2", weights)) == 2
    assert "none of its 2 image files could be decoded" in capsys.readouterr().err


def test_unwritable_out_and_cache_fail_before_work(tmp_path, weights, capsys, monkeypatch):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    blocker = tmp_path / "a file"
    blocker.write_text("x")

    def fail(*args, **kwargs):
        raise AssertionError("work started before the folders were checked")

    monkeypatch.setattr("featlift.train.loop.create_backbone", fail)
    monkeypatch.setattr("featlift.train.loop.scan_images", fail)
    assert main(train_args(images, blocker / "run", weights)) == 2
    assert "output folder --out" in capsys.readouterr().err
    assert main(train_args(images, tmp_path / "run", weights, "--cache", str(blocker / "cache"))) == 2
    assert "cache folder --cache" in capsys.readouterr().err


def test_image_size_must_keep_all_scales_on_the_patch_grid(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    assert main([*train_args(images, tmp_path / "run", weights), "--image-size", "96"]) == 2
    err = capsys.readouterr().err
    assert "--image-size 96" in err and "multiple of 64" in err


def test_split_is_deterministic_and_disjoint(tmp_path):
    images = write_image_tree(tmp_path / "imgs", count=9, corrupt=False)
    scan = scan_images(images)
    train_a, val_a = split_images(scan.images, 0.3, seed=1)
    train_b, val_b = split_images(scan.images, 0.3, seed=1)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 3
    assert not {im.relative for im in train_a} & {im.relative for im in val_a}
    assert {im.relative for im in split_images(scan.images, 0.3, seed=2)[1]} != {im.relative for im in val_a}


def test_color_jitter_is_seeded():
    image = torch.rand(3, 16, 16)
    assert torch.equal(color_jitter(image.clone(), 5), color_jitter(image.clone(), 5))
    assert not torch.allclose(color_jitter(image.clone(), 5), color_jitter(image.clone(), 6))
    out = color_jitter(image.clone(), 7)
    assert out.min() >= 0 and out.max() <= 1


def test_ctrl_c_leaves_last_epoch_checkpoint_usable(tmp_path, weights, monkeypatch, capsys):
    images = write_image_tree(tmp_path / "imgs", count=4, corrupt=False)
    run = tmp_path / "run"
    original, calls = torch.optim.Adam.step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # 2 steps per epoch: Ctrl-C during epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    assert main(train_args(images, run, weights, "--epochs", "3", "--val-fraction", "0")) == 130
    monkeypatch.undo()
    assert "interrupted" in capsys.readouterr().err
    module, config = load_checkpoint(run)
    assert config.training["epochs"] == 1 and not config.training["completed"]
    assert main(train_args(images, run, weights, "--epochs", "3", "--val-fraction", "0", "--resume")) == 0
    assert load_checkpoint(run)[1].training["epochs"] == 3
