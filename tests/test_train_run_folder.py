"""`featlift train --out RUN_DIR` safety: no unpickling, no silent overwrite, no shortening, no empty
leftovers, no diverged weights on disk, and messages that name the real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, requires_shared
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

import featlift
from featlift import load_checkpoint
from featlift.cli import main
from featlift.train.state import load_state

SHIPPED_LIFT = Path(featlift.__file__).parent / "pretrained" / "lift_vit_small_patch14_dinov2_lvd142m"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("imgs") / "images", count=4, corrupt=False)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: the classic pickle code-execution payload, made harmless."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_train_state_is_never_unpickled(tmp_path, images, weights, capsys):
    run = tmp_path / "downloaded run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"epoch": _CreatesFile(marker)}, run / "train_state.pt")  # as older featlift saved its state

    code = main(train_args(images, run, weights, "--epochs", "1"))
    assert not marker.exists()
    assert code == 2 and "already holds a training run" in capsys.readouterr().err
    code = main(train_args(images, run, weights, "--epochs", "1", "--resume"))
    assert not marker.exists()
    err = capsys.readouterr().err
    assert code == 2 and "train_state.pt" in err and "pickle" in err and "--overwrite" in err

    # --overwrite replaces it unread with the pickle-free state, which --resume then continues
    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0", "--overwrite")) == 0
    assert not marker.exists() and not (run / "train_state.pt").exists()
    assert load_file(str(run / "train_state.safetensors"))  # plain tensors, nothing to unpickle
    assert load_state(run)["epoch"] == 1
    assert main(train_args(images, run, weights, "--epochs", "2", "--val-fraction", "0", "--resume")) == 0
    assert load_state(run)["epoch"] == 2


def test_damaged_state_is_reported_with_its_file(tmp_path, images, weights, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert main(train_args(images, run, weights, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run / 'train_state.safetensors'}: cannot read the training state" in err


def test_existing_checkpoint_is_not_overwritten(tmp_path, images, weights, capsys):
    run = tmp_path / "my lift"
    shutil.copytree(SHIPPED_LIFT, run)
    before = folder_bytes(run)

    assert main(train_args(images, run, weights, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"--out {run}: already holds model.safetensors, config.json" in err and "--overwrite" in err
    assert main(train_args(images, run, weights, "--epochs", "1", "--resume")) == 2
    assert "no training state" in capsys.readouterr().err
    assert main(train_args(images, run, weights, "--resume", "--overwrite")) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert folder_bytes(run) == before

    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0", "--overwrite")) == 0
    assert json.loads((run / "config.json").read_text())["training"]["epochs"] == 1
    assert folder_bytes(run)["model.safetensors"] != before["model.safetensors"]


def real_train_args(tmp_path: Path, count: int, run: Path, *extra: str) -> list[str]:
    """`featlift train` on the real DINOv2 and `count` real images at 56 px (4 x 14, the smallest size), on CPU."""
    images = tmp_path / "real images"
    images.mkdir()
    for path in sorted(IMAGENET_SAMPLE.iterdir())[:count]:
        shutil.copy(path, images)
    backbone = ["--backbone", DINOV2_NAME, "--weights", str(DINOV2_WEIGHTS), "--device", "cpu"]
    return ["train", str(images), *backbone, "--out", str(run), "--image-size", "56", "--no-progress", *extra]


@requires_shared
def test_copy_of_shipped_lift_is_refused_with_the_real_backbone(tmp_path, capsys):
    run = tmp_path / "lift copy"
    shutil.copytree(SHIPPED_LIFT, run)
    before = folder_bytes(run)
    # two images keep even a run that is wrongly not refused short
    assert main(real_train_args(tmp_path, 2, run, "--epochs", "1")) == 2
    assert "already holds model.safetensors, config.json" in capsys.readouterr().err
    assert folder_bytes(run) == before


def test_failed_train_leaves_no_empty_folders(tmp_path, images, weights, capsys):
    run = tmp_path / "new" / "run"
    assert main([*train_args(images, run, weights), "--image-size", "96"]) == 2
    assert "--image-size 96" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    cache = tmp_path / "my cache"
    assert main([*train_args(images, existing, weights), "--image-size", "96", "--cache", str(cache)]) == 2
    assert (existing / "notes").is_dir() and sorted(p.name for p in existing.iterdir()) == ["notes"]
    assert not cache.exists()


def test_undecodable_image_is_named_not_its_buffer(tmp_path, weights, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "not really.jpg").write_text("a text file, not a JPEG")
    assert main(train_args(folder, tmp_path / "run", weights)) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'not really.jpg'}: cannot decode image" in err
    assert "BytesIO" not in err and "0x" not in err


def test_resume_never_shortens_a_finished_run(tmp_path, images, weights, capsys):
    run = tmp_path / "run"
    options = ("--val-fraction", "0", "--resume")
    assert main(train_args(images, run, weights, "--epochs", "2", "--val-fraction", "0")) == 0
    capsys.readouterr()
    before = folder_bytes(run)

    assert main(train_args(images, run, weights, "--epochs", "1", *options)) == 2
    err = capsys.readouterr().err
    assert "--resume --epochs 1" in err and "already trained 2 epochs" in err and "N > 2" in err
    assert folder_bytes(run) == before

    assert main(train_args(images, run, weights, "--epochs", "2", *options)) == 0
    assert "already trained all 2 epochs; nothing to do" in capsys.readouterr().out
    assert folder_bytes(run) == before


def test_nan_weights_stop_training_and_keep_the_last_good_epoch(
    tmp_path, images, weights, monkeypatch, capsys
):
    run = tmp_path / "run"
    original, calls = torch.optim.Adam.step, [0]

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 4:  # 2 steps per epoch: the 2nd step of epoch 2 leaves a NaN weight
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    argv = train_args(images, run, weights, "--epochs", "3", "--val-fraction", "0")
    assert main(argv) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "training diverged in epoch 2, step 2" in err and "not finite" in err and "--lr 0.0001" in err
    assert (
        f"nothing of epoch 2 was saved; the checkpoint and training state of epoch 1 in {run} are kept" in err
    )
    assert load_state(run)["epoch"] == 1
    module, config = load_checkpoint(run)
    assert config.training["epochs"] == 1
    assert all(torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("loss", ["cosine", "l2"])
def test_huge_lr_stops_without_writing_a_checkpoint(tmp_path, images, weights, loss, capsys):
    run = tmp_path / "run"
    assert main(train_args(images, run, weights, "--epochs", "2", "--lr", "1e30", "--loss", loss)) == 2
    err = capsys.readouterr().err
    assert "featlift train: error: training diverged in epoch 1" in err
    assert "nothing was saved (no epoch was completed)" in err and "--lr 1e+29" in err
    assert not (run / "model.safetensors").exists() and not (run / "config.json").exists()
    assert not (run / "train_state.safetensors").exists()


@requires_shared
def test_huge_lr_on_the_real_backbone_stops_without_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    options = ("--epochs", "2", "--lr", "1e30", "--batch-size", "2", "--val-fraction", "0.34")
    assert main(real_train_args(tmp_path, 3, run, *options)) == 2
    assert "training diverged in epoch 1" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists() and not (run / "train_state.safetensors").exists()


def test_weights_from_the_environment_variable_are_used(tmp_path, monkeypatch):
    """`$FEATLIFT_WEIGHTS` stands in for --weights in train as in every other command; the fingerprint shows it."""
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "images", count=4, corrupt=False)
    argv = train_args(images, tmp_path / "run", weights, "--epochs", "1")
    at = argv.index("--weights")
    del argv[at : at + 2]
    monkeypatch.setenv("FEATLIFT_WEIGHTS", str(weights))
    with one_thread():
        assert main(argv) == 0
    expected = featlift.create_backbone(TINY_NAME, weights=str(weights)).fingerprint()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backbone"]["fingerprint"] == expected
