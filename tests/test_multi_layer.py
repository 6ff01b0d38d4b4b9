"""Several ViT layers at once (``--layer 3,6,9,11``): one forward pass, concat or separate outputs,
checkpoints that record their layers, cache keys that include them."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import TINY_TIMM_NAME, write_images
from safetensors import safe_open

from featlift import create_backbone
from featlift.checkpoint import BackboneSpec, load_checkpoint, save_checkpoint
from featlift.cli import main
from featlift.commands.common import layer_arg
from featlift.errors import BackboneError, CheckpointError, CheckpointMismatchError, FeatliftError
from featlift.extract import SETTINGS_KEYS, load_features, load_layer_features, read_metadata
from featlift.extract_tensors import extract_features
from featlift.images import load_image
from featlift.pipeline import FeaturePipeline, build_pipeline
from featlift.train.cache import cache_key
from featlift.train.views import View
from featlift.upsamplers import LiFT, create_upsampler

LAYERS = (3, 6, 9, 11)


@pytest.mark.parametrize("facet", ["token", "key"])
def test_several_layers_equal_each_layer_alone_concatenated(tiny_backbone, facet):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 48)
    several = tiny_backbone(facet=facet, layer=[0, 2, 3], depth=4)
    assert several.layers == (0, 2, 3) and several.layer == 3 and several.layer_label == "0,2,3"
    alone = [tiny_backbone(facet=facet, layer=k, depth=4)(images) for k in (0, 2, 3)]
    got = several(images)
    assert got.shape == (2, 3 * 32, 2, 3) and several.channels == 96 and several.layer_channels == (32,) * 3
    torch.testing.assert_close(got, torch.cat(alone, dim=1), rtol=0, atol=0)
    for layer, part in several.split_layers(got).items():
        torch.testing.assert_close(part, alone[(0, 2, 3).index(layer)], rtol=0, atol=0)


@pytest.mark.parametrize("facet", ["token", "value"])
def test_one_forward_pass_stops_at_the_deepest_layer(tiny_backbone, facet):
    backbone = tiny_backbone(facet=facet, layer=[0, 1], depth=4)
    calls = []
    hooks = [
        block.register_forward_pre_hook(lambda m, a, k=k: calls.append(k))
        for k, block in enumerate(backbone.model.blocks)
    ]
    backbone(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    # token: blocks 0 and 1 run once each; attention facets stop on entering block 1 (its input is all they need)
    assert calls == [0, 1]


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ([3, 1], "each layer must be deeper than the one before"),
        ([1, 1], "each layer must be deeper than the one before"),
        ([0, 4], "layer 4: tiny_vit_p16 has 4 blocks, so layer must be in 0..3"),
        ([], "non-empty list"),
    ],
)
def test_bad_layer_lists_are_refused(tiny_backbone, layer, message):
    with pytest.raises(BackboneError, match=message):
        tiny_backbone(layer=layer, depth=4)


def test_negative_layers_resolve_from_the_end(tiny_backbone):
    assert tiny_backbone(layer=[1, -1], depth=4).layers == (1, 3)


def test_layer_argument_parses_one_or_several():
    assert layer_arg("11") == 11 and layer_arg("-1") == -1
    assert layer_arg("3, 6,9,11") == (3, 6, 9, 11)
    with pytest.raises(argparse.ArgumentTypeError, match="'3;6': expected a layer index"):
        layer_arg("3;6")


@pytest.fixture(scope="module")
def tiny_vit_layers(tiny_timm_weights):
    return create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=list(LAYERS))


def test_checkpoint_records_its_layers_and_refuses_others(tmp_path, tiny_timm_weights, tiny_vit_layers):
    several = tiny_vit_layers
    last = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=11)
    save_checkpoint(tmp_path / "several", LiFT(several.channels, several.patch_size), several)
    save_checkpoint(tmp_path / "last", LiFT(last.channels, last.patch_size), last)
    stored = json.loads((tmp_path / "several" / "config.json").read_text())["backbone"]
    assert stored["layers"] == list(LAYERS) and stored["layer"] == 11 and stored["channels"] == 4 * 192
    # one layer: the config has the format written before several layers existed (no "layers")
    assert "layers" not in json.loads((tmp_path / "last" / "config.json").read_text())["backbone"]
    module, config = load_checkpoint(tmp_path / "several", backbone=several)
    assert config.backbone.tapped_layers == LAYERS and module.channels == 4 * 192
    load_checkpoint(tmp_path / "last", backbone=last)
    with pytest.raises(
        CheckpointMismatchError, match=r"trained for backbone=\S+ layer=11 .*layer=3,6,9,11.*layers"
    ):
        load_checkpoint(tmp_path / "last", backbone=several)
    with pytest.raises(CheckpointMismatchError, match=r"layer=3,6,9,11 .* you are using .* layer=11 "):
        load_checkpoint(tmp_path / "several", backbone=last)


def test_a_checkpoint_with_the_same_deepest_layer_and_width_is_still_refused(tmp_path, tiny_timm_weights):
    """Layers 9,11 and 10,11 have the same `layer` (11) and channels: only the recorded list tells them apart."""
    a = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=[9, 11])
    b = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=[10, 11])
    save_checkpoint(tmp_path / "a", LiFT(a.channels, a.patch_size), a)
    with pytest.raises(CheckpointMismatchError, match="differs in layers"):
        load_checkpoint(tmp_path / "a", backbone=b)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([11], "at least 2 increasing integers"),
        ([9, 9, 11], "at least 2 increasing integers"),
        (["3", 11], "at least 2 increasing integers"),
        ([3, 6], "must end with backbone.layer"),
    ],
)
def test_bad_layers_in_a_config_are_refused(tmp_path, tiny_vit_layers, layers, message):
    save_checkpoint(tmp_path / "c", LiFT(tiny_vit_layers.channels, 16), tiny_vit_layers)
    path = tmp_path / "c" / "config.json"
    data = json.loads(path.read_text())
    data["backbone"]["layers"] = layers
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c")


def test_old_single_layer_spec_loads():
    spec = BackboneSpec(name="x", fingerprint="", layer=11, facet="token", channels=8, patch_size=14)
    assert spec.tapped_layers == (11,) and "layers" not in spec.to_json()
    assert BackboneSpec.from_json(spec.to_json(), "config.json") == spec


def test_cache_key_includes_every_layer(tiny_timm_weights, tiny_vit_layers):
    last = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=11)
    views = (View("s1", 1.0),)
    several_key, last_key = cache_key(tiny_vit_layers, 64, views), cache_key(last, 64, views)
    assert "-layer3,6,9,11-" in several_key and "-layer11-" in last_key and several_key != last_key


def extract(tmp_path, weights, *args):
    return main(
        ["-q", "extract", *args, "--backbone", TINY_TIMM_NAME, "--weights", str(weights), "--size", "32x48"]
        + ["--workers", "0", "--upsampler", "bilinear", "--output-size", "4x6"]
    )


def test_cli_concat_and_separate(tmp_path, tiny_timm_weights, tiny_vit_layers):
    images = write_images(tmp_path / "im", count=2)
    expected = extract_features(
        FeaturePipeline(tiny_vit_layers, create_upsampler("bilinear"), output_size=(4, 6)),
        [load_image(p) for p in images],
        size=(32, 48),
    )
    assert (
        extract(
            tmp_path,
            tiny_timm_weights,
            str(tmp_path / "im"),
            "--layer",
            "3,6,9,11",
            "--out",
            str(tmp_path / "c"),
        )
        == 0
    )
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "im"), "--layer", "3,6,9,11", "--layers-as", "separate",
                   "--out", str(tmp_path / "s")) == 0  # fmt: skip
    concat_file = tmp_path / "c" / "img 0.jpg.safetensors"
    separate_file = tmp_path / "s" / "img 0.jpg.safetensors"
    features, meta = load_features(concat_file)
    assert meta["layer"] == "3,6,9,11" and meta["layers_as"] == "concat"
    torch.testing.assert_close(features, expected[0], rtol=0, atol=0)
    with safe_open(str(separate_file), framework="pt") as handle:
        assert sorted(handle.keys()) == [f"features_layer{k}" for k in (11, 3, 6, 9)]
    layers, meta = load_layer_features(separate_file)
    assert list(layers) == list(LAYERS) and meta["layers_as"] == "separate"
    for k, part in zip(LAYERS, expected[0].chunk(4), strict=True):
        torch.testing.assert_close(layers[k], part, rtol=0, atol=0)  # bilinear is per channel: same numbers
    assert list(load_layer_features(concat_file)[0]) == list(LAYERS)
    with pytest.raises(
        FeatliftError, match="--layers-as separate; read it with featlift.extract.load_layer_features"
    ):
        load_features(separate_file)


def test_cli_rerun_with_other_layers_as_is_refused(tmp_path, tiny_timm_weights, capsys):
    write_images(tmp_path / "im", count=1)
    args = [str(tmp_path / "im"), "--layer", "9,11", "--out", str(tmp_path / "o")]
    assert extract(tmp_path, tiny_timm_weights, *args) == 0
    assert extract(tmp_path, tiny_timm_weights, *args, "--layers-as", "separate") == 2
    assert "layers_as" in capsys.readouterr().err


def test_one_layer_output_has_the_metadata_it_had_before(tmp_path, tiny_timm_weights):
    write_images(tmp_path / "im", count=1)
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "im"), "--layer", "11", "--layers-as", "separate",
                   "--out", str(tmp_path / "o")) == 0  # fmt: skip
    path = tmp_path / "o" / "img 0.jpg.safetensors"
    meta = read_metadata(path)
    assert meta["layer"] == "11" and "layers_as" not in meta
    assert set(SETTINGS_KEYS) - set(meta) == {"layers_as"}
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["features"]


def test_separate_refuses_a_trained_method(tmp_path, tiny_vit_layers):
    save_checkpoint(tmp_path / "ck", LiFT(tiny_vit_layers.channels, 16), tiny_vit_layers)
    tiny_vit_layers.set_layers_as("separate")
    try:
        with pytest.raises(
            FeatliftError, match="is trained, so it cannot upsample layers 3,6,9,11 separately"
        ):
            build_pipeline(tiny_vit_layers, upsampler="lift", checkpoint=str(tmp_path / "ck"))
    finally:
        tiny_vit_layers.set_layers_as("concat")
    pipe = build_pipeline(tiny_vit_layers, upsampler="lift", checkpoint=str(tmp_path / "ck"))
    assert pipe(torch.rand(1, 3, 32, 32)).shape == (1, 4 * 192, 4, 4)


def test_separate_runs_the_method_on_each_layer(tiny_vit_layers):
    """A method that mixes channels (here: scales each map by its own mean) tells separate from concat."""

    class PerMapScale(torch.nn.Module):
        capabilities = create_upsampler("bilinear").capabilities
        output_dtype = None

        def native_output_size(self, grid):
            return grid

        def forward(self, features, guide, size):
            return features / features.abs().mean()

    pipe = FeaturePipeline(tiny_vit_layers, PerMapScale())
    images = torch.rand(1, 3, 32, 32)
    tiny_vit_layers.set_layers_as("separate")
    try:
        separate = pipe(images)
    finally:
        tiny_vit_layers.set_layers_as("concat")
    raw = tiny_vit_layers(tiny_vit_layers.normalize(images))
    expected = torch.cat([part / part.abs().mean() for part in raw.chunk(4, dim=1)], dim=1)
    torch.testing.assert_close(separate, expected)
    assert not torch.allclose(pipe(images), expected)


def test_train_on_several_layers_records_them_and_extract_uses_the_checkpoint(tmp_path):
    from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "images", count=3, corrupt=False)
    run = tmp_path / "run"
    with one_thread():
        assert main([*train_args(images, run, weights, "--layer", "10,11", "--epochs", "1")]) == 0
        config = json.loads((run / "config.json").read_text())
        assert config["backbone"]["layers"] == [10, 11] and config["backbone"]["layer"] == 11
        assert config["backbone"]["channels"] == 2 * 192
        out = tmp_path / "features"
        extract = ["extract", str(images), "--backbone", "vit_tiny_patch16_224", "--weights", str(weights)]
        assert main([*extract, "--layer", "10,11", "--checkpoint", str(run), "--out", str(out)]) == 0
        assert main([*extract, "--layer", "11", "--checkpoint", str(run), "--out", str(tmp_path / "x")]) == 2
    first = sorted(out.rglob("*.safetensors"))[0]
    features, _ = load_features(first)
    assert features.shape[0] == 2 * 192
