"""`featlift train --upsampler NAME:key=value`: constructor settings chosen for a training run, stored in the
checkpoint, kept by --resume, and refused clearly when unknown or mistyped."""

from __future__ import annotations

import json

import pytest
from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import load_checkpoint
from featlift.cli import main
from featlift.commands.train import config_command
from featlift.errors import FeatliftError
from featlift.train import TrainConfig
from featlift.upsamplers import get_upsampler_class
from featlift.variants import parse_training_spec

TRAINABLE = ("lift", "fade", "sapa")


def test_a_spec_gives_typed_constructor_settings():
    assert parse_training_spec("fade:gating=false", TRAINABLE) == ("fade", {"gating": False})
    assert parse_training_spec("sapa:up_kernel=3:variant=gated", TRAINABLE) == (
        "sapa",
        {"up_kernel": 3, "variant": "gated"},
    )
    assert parse_training_spec("lift", TRAINABLE) == ("lift", {})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bilinear", "'bilinear' is not a trainable upsampler; choose from lift, fade, sapa"),
        ("fade:gate=false", "fade has no setting 'gate'; its settings: scale, up_kernel"),
        ("fade:gating=maybe", "gating='maybe' is not a valid bool"),
        ("fade:up_kernel=3.5", "up_kernel='3.5' is not a valid int"),
        ("lift:residual=false", "lift has no setting 'residual' (use --no-residual)"),
        ("lift:iters=2", "lift has no setting 'iters'"),  # a run-time option, not a trained setting
        ("fade:runs/x", "unexpected part 'runs/x'"),
    ],
)
def test_a_bad_spec_is_refused_naming_it(spec, message):
    with pytest.raises(FeatliftError, match="--upsampler") as caught:
        parse_training_spec(spec, TRAINABLE)
    assert message in str(caught.value)


def test_setting_names_leave_out_shape_and_run_time_options():
    fade = get_upsampler_class("fade")
    assert "gating" in fade.setting_names()
    assert not {"channels", "patch_size", "chunk_size", "max_memory_mib"} & set(fade.setting_names())
    assert get_upsampler_class("lift").setting_names() == ["output_scale"]


def test_the_recorded_command_gives_the_settings_back():
    config = TrainConfig(images="imgs", out="run", upsampler="fade", upsampler_args={"gating": False})
    assert "--upsampler fade:gating=False" in config_command(config)
    assert "--upsampler" not in config_command(TrainConfig(images="imgs", out="run"))


def test_python_api_refuses_an_unknown_setting(tmp_path):
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "images", count=3, corrupt=False)
    from featlift.train import train

    config = TrainConfig(
        images=str(images), out=str(tmp_path / "run"), backbone="vit_tiny_patch16_224", weights=str(weights),
        upsampler="fade", upsampler_args={"gate": False}, image_size=64, epochs=1, device="cpu", progress=False,
    )  # fmt: skip
    with pytest.raises(FeatliftError, match=r"upsampler_args \['gate'\]: fade has no such setting"):
        train(config)


def test_trains_fade_without_its_gate_and_resume_keeps_the_setting(tmp_path, capsys):
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "images", count=4, corrupt=False)
    run = tmp_path / "run"
    args = train_args(images, run, weights, "--upsampler", "fade:gating=false", "--val-fraction", "0.25")
    with one_thread():
        assert main([*args, "--epochs", "1"]) == 0
        upsampler, _ = load_checkpoint(run)
        assert upsampler.config()["gating"] is False
        assert not any("gate" in name for name, _ in upsampler.named_parameters())
        recorded = json.loads((run / "config.json").read_text())
        assert "fade:gating=False" in recorded["training"]["command"]
        # the default fade has a gate: the setting made the difference
        gated = tmp_path / "gated"
        assert main([*train_args(images, gated, weights, "--upsampler", "fade", "--epochs", "1")]) == 0
        assert any("gate" in name for name, _ in load_checkpoint(gated)[0].named_parameters())
        # a resume with another setting does not fit the run; with the same one it goes on
        capsys.readouterr()
        assert (
            main([*train_args(images, run, weights, "--upsampler", "fade", "--epochs", "2", "--resume")]) == 2
        )
        assert "gating" in capsys.readouterr().err
        assert main([*args, "--epochs", "2", "--resume"]) == 0
    assert load_checkpoint(run)[0].config()["gating"] is False
