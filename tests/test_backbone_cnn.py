"""CNN stages as backbones (timm ``features_only``): ResNet-50 / ConvNeXt at a chosen stage, from the Python
API and from ``featlift extract --backbone resnet50 --layer 3`` on random weights."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import write_images
from safetensors.torch import save_file

from featlift import create_backbone
from featlift.backbones import CNNBackbone, ViTBackbone
from featlift.backbones.cnn import cnn_stages
from featlift.checkpoint import load_checkpoint, save_checkpoint
from featlift.cli import main
from featlift.errors import BackboneError, InputSizeError
from featlift.extract import load_features
from featlift.extract_tensors import extract_features
from featlift.images import load_image
from featlift.pipeline import build_pipeline
from featlift.upsamplers import LiFT


@pytest.mark.parametrize(
    ("name", "strides", "channels"),
    [
        ("resnet50", (2, 4, 8, 16, 32), (64, 256, 512, 1024, 2048)),
        ("convnext_tiny", (4, 8, 16, 32), (96, 192, 384, 768)),
    ],
)
def test_stage_table(name, strides, channels):
    stages = cnn_stages(name)
    assert tuple(s.stride for s in stages) == strides and tuple(s.channels for s in stages) == channels
    assert [s.index for s in stages] == list(range(len(strides)))


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    path = tmp_path_factory.mktemp("cnn") / "resnet50_random.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model.eval()


def test_resnet_stage_equals_timm_and_later_stages_are_not_kept(resnet50_weights):
    path, full = resnet50_weights
    backbone = create_backbone("resnet50", weights=path, layer=3)
    assert isinstance(backbone, CNNBackbone) and not isinstance(backbone, ViTBackbone)
    assert (backbone.channels, backbone.patch_size, backbone.layer, backbone.facet) == (1024, 16, 3, "token")
    assert backbone.num_prefix_tokens == 0 and backbone.output_shape().stride == 16
    assert "layer4" not in dict(backbone.model.named_children())  # stage 4 is never run
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = full.layer3(
            full.layer2(full.layer1(full.maxpool(full.act1(full.bn1(full.conv1(images))))))
        )
        got = backbone(images)
    assert got.shape == (1, 1024, 4, 6)
    torch.testing.assert_close(got, expected)


def test_convnext_stage_equals_timm(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("convnext_atto", pretrained=False).eval()
    save_file(full.state_dict(), str(tmp_path / "w.safetensors"))
    backbone = create_backbone("convnext_atto", weights=tmp_path / "w.safetensors", layer=1)
    images = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        expected = full.stages[1](full.stages[0](full.stem(images)))
        got = backbone(images)
    assert backbone.patch_size == 8 and got.shape == (2, backbone.channels, 4, 8)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"layer": 5},
            BackboneError,
            r"layer 5: resnet50 has 5 stages .* 0\.\.4 .*3 \(layer3: stride 16, 1024 channels\)",
        ),
        ({"layer": [2, 3]}, BackboneError, "tapped at one stage at a time"),
        ({"facet": "key"}, BackboneError, "facet 'key': resnet50 is a CNN"),
    ],
)
def test_bad_stages_and_facets_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        create_backbone("resnet50", pretrained=False, **kwargs)


def test_input_must_be_a_multiple_of_the_stride():
    backbone = create_backbone("resnet50", pretrained=False, layer=2)
    assert backbone.grid_size(64, 40) == (8, 5)
    with pytest.raises(InputSizeError, match="not a multiple of resnet50.a1_in1k's stride 8"):
        backbone.grid_size(60, 40)


def test_default_stage_is_the_last():
    backbone = create_backbone("convnext_atto", pretrained=False)
    assert backbone.layer == 3 and backbone.patch_size == 32


def test_cli_extract_resnet50_layer3_equals_the_python_api(tmp_path, resnet50_weights, capsys):
    path, _ = resnet50_weights
    images = write_images(tmp_path / "im", count=2)
    out = tmp_path / "out"
    argv = [
        "-q",
        "extract",
        str(tmp_path / "im"),
        "--backbone",
        "resnet50",
        "--weights",
        str(path),
        "--layer",
        "3",
    ]
    argv += ["--size", "32x48", "--upsampler", "bilinear", "--workers", "0", "--out", str(out)]
    assert main(argv) == 0
    features, meta = load_features(out / "img 0.jpg.safetensors")
    assert meta["backbone"] == "resnet50.a1_in1k" and meta["layer"] == "3" and meta["facet"] == "token"
    pipeline = build_pipeline("resnet50", weights=str(path), layer=3, upsampler="bilinear")
    expected = extract_features(pipeline, [load_image(p) for p in images], size=(32, 48))
    assert features.shape == expected.shape[1:] and features.shape[0] == 1024
    torch.testing.assert_close(features, expected[0])
    assert main([*argv[:-1], str(tmp_path / "o2"), "--facet", "value"]) == 2
    assert "facet 'value': resnet50 is a CNN" in capsys.readouterr().err


def test_checkpoint_for_a_cnn_stage(tmp_path):
    backbone = create_backbone("convnext_atto", pretrained=False, layer=1)
    save_checkpoint(tmp_path / "ck", LiFT(backbone.channels, backbone.patch_size), backbone)
    module, config = load_checkpoint(tmp_path / "ck", backbone=backbone)
    assert (config.backbone.patch_size, config.backbone.num_prefix_tokens, config.backbone.layer) == (8, 0, 1)
    other = create_backbone("convnext_atto", pretrained=False, layer=2)
    with pytest.raises(Exception, match="differs in layer"):
        load_checkpoint(tmp_path / "ck", backbone=other)
