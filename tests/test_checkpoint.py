"""Checkpoint format: round trip, refusal for other features, fingerprint warning, original LiFT import."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import TINY_TIMM_NAME, write_images
from original_lift import ORIGINAL_LIFT_32_CHANNELS, original_lift_state
from safetensors.torch import load_file, save_file

import featlift.checkpoint
from featlift import CheckpointError, CheckpointMismatchError, load_checkpoint
from featlift.checkpoint import BackboneSpec, read_checkpoint_config, save_checkpoint
from featlift.cli import main
from featlift.lift_import import import_original_lift
from featlift.pretrained import shipped_checkpoints
from featlift.upsamplers import LiFT


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
    torch.testing.assert_close(loaded(features, image, (8, 8)), lift(features, image, (8, 8)))


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
    save_checkpoint(tmp_path / "b", LiFT(32, 16, residual=True), backbone)
    (tmp_path / "b" / "config.json").write_text(
        (tmp_path / "b" / "config.json").read_text().replace('"channels": 32,', '"channels": 64,', 1)
    )
    with pytest.raises(CheckpointError, match="weights do not fit lift"):
        load_checkpoint(tmp_path / "b")


def test_import_original_lift_pth(tmp_path, tiny_backbone):
    """Each tensor of a file with the original code's key names lands in the featlift parameter of the
    literal table, and the converted checkpoint reloads to the same module."""
    backbone = tiny_backbone(patch_size=16, facet="key")
    original = original_lift_state(seed=3)
    torch.save(original, tmp_path / "lift_orig.pth")
    imported, config = import_original_lift(tmp_path / "lift_orig.pth", backbone, tmp_path / "converted")
    assert config.backbone.facet == "key" and config.training["source"] == "original LiFT code"
    ours = imported.state_dict()
    for original_name, our_name, _ in ORIGINAL_LIFT_32_CHANNELS:
        torch.testing.assert_close(ours[our_name], original["module." + original_name], rtol=0, atol=0)
    reloaded, _ = load_checkpoint(tmp_path / "converted", backbone=backbone)
    features, image = torch.randn(2, 32, 3, 5), torch.randn(2, 3, 48, 80)
    torch.testing.assert_close(reloaded(features, image, (6, 10)), imported(features, image, (6, 10)))


def test_import_refuses_wrong_channels_and_non_lift_files(tmp_path, tiny_backbone):
    torch.save(original_lift_state(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointMismatchError, match="outputs 32 channels, but .* gives 48"):
        import_original_lift(tmp_path / "narrow.pth", tiny_backbone(embed_dim=48), tmp_path / "out")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a LiFT state dict"):
        import_original_lift(tmp_path / "other.pth", tiny_backbone(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_save_killed_between_its_two_writes_is_refused_on_load(tmp_path, tiny_backbone, monkeypatch):
    """The new weights next to the old config.json (and its output_scale) must not load as one checkpoint."""
    backbone = tiny_backbone()
    save_checkpoint(tmp_path, trained_like_lift(32, 16, seed=0), backbone)
    newer = trained_like_lift(32, 16, seed=1)
    newer.output_scale = 0.5

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after model.safetensors, before config.json

    monkeypatch.setattr(featlift.checkpoint, "save_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, newer, backbone)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="is not the file its config.json was written with") as error:
        load_checkpoint(tmp_path, backbone=backbone)
    assert "different saves" in str(error.value)
    save_checkpoint(tmp_path, newer, backbone)  # a complete save makes the pair whole again
    assert load_checkpoint(tmp_path, backbone=backbone)[0].output_scale == 0.5


def test_config_json_records_the_sha256_of_the_weights_file(tmp_path, tiny_backbone):
    save_checkpoint(tmp_path, LiFT(32, 16), tiny_backbone())
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "config.json").read_text())["weights_sha256"] == digest
    shipped = shipped_checkpoints()
    assert shipped, "featlift ships a LiFT checkpoint"
    for directory in shipped:
        digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
        assert read_checkpoint_config(directory).weights_sha256 == digest, directory


def test_a_checkpoint_saved_before_the_hash_loads_with_a_warning(tmp_path, tiny_backbone):
    backbone = tiny_backbone()
    save_checkpoint(tmp_path, trained_like_lift(32, 16), backbone)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no weights_sha256"):
        module, loaded = load_checkpoint(tmp_path, backbone=backbone)
    assert loaded.weights_sha256 is None and not module.training


def edit_config(directory, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(edit(config)))


def setting(path: str, value):
    """An edit of config.json that sets the field at dotted `path` to `value`."""

    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
        return config

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: [c], "config.json: the top level must be an object, got [{"),
        (lambda c: None, "config.json: the top level must be an object, got null"),
        (
            setting("backbone.layer", "11"),
            'config.json: backbone.layer must be an integer >= 0, got "11" (a string)',
        ),
        (setting("backbone.layer", True), "backbone.layer must be an integer >= 0, got true (a boolean)"),
        (setting("backbone.facet", "keys"), "backbone.facet must be one of token, query, key, value"),
        (setting("backbone.extra", 1), "backbone has unknown field(s) extra (expected name, fingerprint,"),
        (lambda c: c["backbone"].pop("channels") and c, "backbone.channels is missing"),
        (
            setting("upsampler.args.output_scale", -1),
            'upsampler.args {"channels": 32, "patch_size": 16, "residual": false, "output_scale": -1}: ',
        ),
        (setting("upsampler.args.output_scale", -1), "LiFT output_scale must be > 0 and finite, got -1"),
        (setting("upsampler.args.output_scale", 0.0), "LiFT output_scale must be > 0 and finite, got 0.0"),
        (
            setting("upsampler.args.output_scale", "1"),
            'upsampler.args.output_scale must be a finite number, got "1"',
        ),
        (setting("upsampler.args.channels", 32.0), "upsampler.args.channels must be an integer, got 32.0"),
        (
            setting("upsampler.args.residual", "yes"),
            'upsampler.args.residual must be true or false, got "yes"',
        ),
        (
            setting("upsampler.args.dropout", 0.1),
            "upsampler.args: lift takes no argument(s) dropout (it takes",
        ),
        (lambda c: c["upsampler"]["args"].pop("channels") and c, "upsampler.args.channels is missing"),
        (setting("upsampler.args", [32, 16]), "upsampler.args must be an object, got [32, 16] (a list)"),
        (
            setting("upsampler.name", "nope"),
            "upsampler.name: unknown upsampler 'nope'; available: anyup, bilinear",
        ),
        (
            setting("normalization.std", [0.2, 0, 0.2]),
            "normalization.std must be a list of 3 finite numbers > 0",
        ),
        (setting("training", "none"), 'training must be an object, got "none" (a string)'),
        (setting("weights_sha256", "abc"), "weights_sha256 must be a sha256 (64 lowercase hex digits)"),
        (setting("format_version", True), "format_version True is not supported (this featlift reads 1)"),
    ],
)
def test_malformed_config_json_is_refused_naming_the_field(tmp_path, tiny_backbone, edit, message):
    save_checkpoint(tmp_path, LiFT(32, 16), tiny_backbone())
    edit_config(tmp_path, edit)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert message in str(error.value)
    assert str(tmp_path / "config.json") in str(error.value)


def save_tiny_timm_checkpoint(directory):
    """A LiFT checkpoint for the last block of `TINY_TIMM_NAME` (other weights: only a fingerprint warning)."""
    spec = BackboneSpec(f"{TINY_TIMM_NAME}.augreg_in21k_ft_in1k", "0" * 16, 11, "token", 192, 16, 1)
    return save_checkpoint(
        directory, LiFT(192, 16), spec, normalization={"mean": [0.5] * 3, "std": [0.5] * 3}
    )


def test_extract_with_a_malformed_checkpoint_exits_2_naming_the_field(tmp_path, tiny_timm_weights, capsys):
    save_tiny_timm_checkpoint(tmp_path / "ckpt")
    edit_config(tmp_path / "ckpt", setting("backbone.layer", "11"))
    write_images(tmp_path / "images", count=1)
    argv = ["-q", "extract", str(tmp_path / "images"), "--backbone", TINY_TIMM_NAME]
    argv += ["--weights", str(tiny_timm_weights), "--checkpoint", str(tmp_path / "ckpt")]
    argv += ["--size", "32x48", "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert 'backbone.layer must be an integer >= 0, got "11" (a string)' in capsys.readouterr().err


def nan_lift(channels=32, patch=16):
    lift = trained_like_lift(channels, patch)
    with torch.no_grad():
        lift.head.weight[0, 0, 0, 0] = float("nan")
        lift.fuse[1].running_var[3] = float("inf")
    return lift


def test_non_finite_weights_are_refused_on_save_naming_the_tensors(tmp_path, tiny_backbone):
    with pytest.raises(CheckpointError, match="NaN or infinite values in fuse.1.running_var, head.weight"):
        save_checkpoint(tmp_path / "ckpt", nan_lift(), tiny_backbone())
    diverged = trained_like_lift(32, 16)
    diverged.output_scale = 0.0  # what a diverged run's least-squares fit gives
    with pytest.raises(CheckpointError, match="output_scale must be > 0 and finite, got 0.0"):
        save_checkpoint(tmp_path / "ckpt", diverged, tiny_backbone())
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.filterwarnings(
    "ignore:checkpoint .* was trained against"
)  # save_tiny_timm_checkpoint's fingerprint
def test_extract_refuses_a_checkpoint_with_nan_weights(tmp_path, tiny_timm_weights, capsys):
    """A NaN tensor in model.safetensors (with a matching hash) is refused by name, nothing extracted."""
    ckpt = save_tiny_timm_checkpoint(tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    state["head.bias"][5] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    edit_config(ckpt, setting("weights_sha256", digest))
    write_images(tmp_path / "images", count=1)
    argv = ["-q", "extract", str(tmp_path / "images"), "--backbone", TINY_TIMM_NAME]
    argv += ["--weights", str(tiny_timm_weights), "--checkpoint", str(ckpt)]
    argv += ["--size", "32x48", "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'model.safetensors'}: NaN or infinite values in head.bias" in err
    assert not (tmp_path / "out").exists()


def test_import_refuses_an_original_lift_file_with_nan(tmp_path, tiny_backbone):
    state = original_lift_state()
    state["module.outc.weight"][0, 0, 0, 0] = float("inf")
    torch.save(state, tmp_path / "lift.pth")
    with pytest.raises(
        CheckpointError, match=r"LiFT file .*lift.pth: NaN or infinite values in module.outc.weight"
    ):
        import_original_lift(tmp_path / "lift.pth", tiny_backbone(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_names_a_file_that_is_not_a_weights_file(tmp_path, tiny_timm_weights, capsys):
    (tmp_path / "notes.pth").write_text("this is not a checkpoint\n")
    argv = ["import-lift", str(tmp_path / "notes.pth"), "--backbone", TINY_TIMM_NAME]
    argv += ["--weights", str(tiny_timm_weights), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"LiFT file {tmp_path / 'notes.pth'}: not a PyTorch or safetensors weights file" in err
    assert "it starts with b'this is not a ch'" in err


def test_saving_leaves_the_random_state_and_the_weights_hash_as_written(tmp_path, tiny_backbone):
    """The check that a saved config loads builds no real module (no RNG draws); the hash is the file's."""
    backbone = tiny_backbone()
    lift = LiFT(backbone.channels, backbone.patch_size)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    save_checkpoint(tmp_path / "ckpt", lift, backbone)
    torch.testing.assert_close(torch.rand(3), expected)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    assert config["weights_sha256"] == hashlib.sha256(weights).hexdigest()
