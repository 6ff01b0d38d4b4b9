"""Checkpoint format: round trip, refusal for other features, fingerprint warning, original LiFT import."""

from __future__ import annotations

import json

import pytest
import torch

from featlift import (
    CheckpointError,
    CheckpointMismatchError,
    LiFT,
    import_original_lift,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from featlift.upsamplers.lift import ORIGINAL_KEY_PREFIXES


def trained_like_lift(channels, patch, seed=0):
    torch.manual_seed(seed)
    lift = LiFT(channels, patch)
    for parameter in lift.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    for module in lift.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    return lift.eval()


def test_round_trip_records_everything(tmp_path, tiny_backbone):
    backbone = tiny_backbone(patch_size=14, facet="key", layer=0)
    lift = trained_like_lift(backbone.channels, 14)
    save_checkpoint(tmp_path / "ckpt", lift, backbone, training={"epochs": 3})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["upsampler"] == {
        "name": "lift",
        "args": {"channels": 32, "patch_size": 14, "residual": False, "output_scale": 1.0},
    }
    assert config["backbone"] == {
        "name": "tiny_vit_p14",
        "fingerprint": backbone.fingerprint(),
        "layer": 0,
        "facet": "key",
        "channels": 32,
        "patch_size": 14,
        "num_prefix_tokens": 1,
    }
    assert config["normalization"] == backbone.normalization
    assert config["training"] == {"epochs": 3}
    loaded, loaded_config = load_checkpoint(tmp_path / "ckpt" / "model.safetensors", backbone=backbone)
    assert loaded_config.backbone.facet == "key" and not loaded.training
    features, image = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(features, image), lift(features, image))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(layer=1), "layer"),
        (dict(facet="value"), "facet"),
        (dict(name="other_vit"), "name"),
        (dict(embed_dim=48), "channels"),
        (dict(patch_size=16), "patch_size"),
    ],
)
def test_checkpoint_for_other_features_is_refused_naming_both_sides(tmp_path, tiny_backbone, change, field):
    trained_for = tiny_backbone(patch_size=14, facet="key", layer=0, name="tiny")
    save_checkpoint(tmp_path, LiFT(32, 14), trained_for)
    kwargs = dict(patch_size=14, facet="key", layer=0, name="tiny")
    kwargs.update(change)
    other = tiny_backbone(**kwargs)
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(tmp_path, backbone=other)
    message = str(error.value)
    assert "trained for backbone=tiny layer=0 facet=key channels=32 patch=14" in message
    assert f"you are using backbone={other.name} layer={other.layer} facet={other.facet}" in message
    assert f"differs in {field}" in message


def test_other_weights_for_the_same_backbone_only_warn(tmp_path, tiny_backbone):
    save_checkpoint(tmp_path, LiFT(32, 16), tiny_backbone(seed=0, name="tiny"))
    with pytest.warns(UserWarning, match="fingerprint"):
        load_checkpoint(tmp_path, backbone=tiny_backbone(seed=1, name="tiny"))


def test_broken_checkpoints_are_named(tmp_path, tiny_backbone):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_checkpoint(tmp_path / "missing")
    backbone = tiny_backbone()
    save_checkpoint(tmp_path, LiFT(32, 16), backbone)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_config_fail_strictly(tmp_path, tiny_backbone):
    backbone = tiny_backbone()
    save_checkpoint(tmp_path / "a", LiFT(32, 16), backbone)
    save_checkpoint(tmp_path / "b", LiFT(32, 16, residual=True), backbone)
    (tmp_path / "b" / "config.json").write_text(
        (tmp_path / "a" / "config.json").read_text().replace('"channels": 32,', '"channels": 64,', 1)
    )
    with pytest.raises(CheckpointError, match="weights do not fit lift"):
        load_checkpoint(tmp_path / "b")


def original_state_dict(lift: LiFT, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The key names the original LiFT code saves (with DataParallel's `module.` prefix)."""
    reverse = {ours: theirs for theirs, ours in ORIGINAL_KEY_PREFIXES.items()}
    state = {}
    for key, value in lift.state_dict().items():
        for ours, theirs in reverse.items():
            if key.startswith(ours):
                state[prefix + theirs + key[len(ours) :]] = value
    return state


def test_import_original_lift_pth(tmp_path, tiny_backbone):
    backbone = tiny_backbone(patch_size=16, facet="key")
    original = trained_like_lift(32, 16, seed=3)
    torch.save(original_state_dict(original), tmp_path / "lift_orig.pth")
    imported, config = import_original_lift(tmp_path / "lift_orig.pth", backbone, tmp_path / "converted")
    assert config.backbone.facet == "key" and config.training["source"] == "original LiFT code"
    reloaded, _ = load_checkpoint(tmp_path / "converted", backbone=backbone)
    features, image = torch.randn(2, 32, 3, 5), torch.randn(2, 3, 48, 80)
    torch.testing.assert_close(reloaded(features, image), original(features, image))


def test_import_refuses_wrong_channels_and_non_lift_files(tmp_path, tiny_backbone):
    torch.save(original_state_dict(trained_like_lift(48, 16)), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError, match="outputs 48 channels"):
        import_original_lift(tmp_path / "wide.pth", tiny_backbone(), tmp_path / "out")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a LiFT state dict"):
        import_original_lift(tmp_path / "other.pth", tiny_backbone(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
