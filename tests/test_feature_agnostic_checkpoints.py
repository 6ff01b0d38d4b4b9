"""Checkpoints of weights that serve any backbone (as AnyUp's do): backbone "any", the warning of a
method declared for any backbone, imported weights with no known backbone fingerprint, and the options the
CLI hands every method that computes in chunks (``--max-memory``, extract's ``--dtype``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from featlift import CheckpointError, CheckpointMismatchError, load_checkpoint
from featlift.checkpoint import BackboneSpec, read_checkpoint_config, save_checkpoint
from featlift.upsamplers import Capabilities, Upsampler, register_upsampler, registry
from featlift.upsamplers.base import check_inputs, resize_features
from featlift.variants import parse_variants

NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class ChannelFreeGain(Upsampler):
    """One learned gain for any channel count; records the chunking options it was built with."""

    capabilities = Capabilities(guide="none", objective="lift", backbones="any")
    options = ("max_memory_mib", "output_dtype")

    def __init__(self, max_memory_mib: float | None = None, output_dtype: str | None = None):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.5))
        self.max_memory_mib = max_memory_mib
        self.output_dtype = output_dtype

    def forward(self, features, guide, output_size):
        size = check_inputs(features, guide, output_size, needs_guide=False)
        out = resize_features(features * self.gain, size)
        return out if self.output_dtype is None else out.to(getattr(torch, self.output_dtype))


class TrainedForOneBackbone(ChannelFreeGain):
    capabilities = Capabilities(guide="none", objective="lift")


@pytest.fixture(autouse=True)
def registered():
    register_upsampler("toy-any-gain")(ChannelFreeGain)
    register_upsampler("toy-one-gain")(TrainedForOneBackbone)
    yield
    registry.UPSAMPLERS.unregister("toy-any-gain")
    registry.UPSAMPLERS.unregister("toy-one-gain")


def test_a_checkpoint_for_any_backbone_loads_for_every_backbone_without_a_warning(tmp_path, tiny_backbone):
    save_checkpoint(tmp_path / "any", ChannelFreeGain(), BackboneSpec.any(), normalization=NORMALIZATION)
    stored = json.loads((tmp_path / "any" / "config.json").read_text())
    assert stored["backbone"] == {"name": "any"}
    assert read_checkpoint_config(tmp_path / "any").backbone.is_any
    for backbone in (tiny_backbone(patch_size=16), tiny_backbone(patch_size=14, embed_dim=48, facet="key")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module, config = load_checkpoint(tmp_path / "any", backbone=backbone)
        assert float(module.gain.detach()) == 1.5 and config.backbone.describe().startswith("backbone=any")


def test_backbone_any_takes_no_other_field(tmp_path):
    save_checkpoint(tmp_path / "any", ChannelFreeGain(), BackboneSpec.any(), normalization=NORMALIZATION)
    path = tmp_path / "any" / "config.json"
    data = json.loads(path.read_text())
    data["backbone"]["layer"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="backbone has unknown field"):
        read_checkpoint_config(tmp_path / "any")


def test_a_method_for_any_backbone_only_warns_on_another_backbone(tmp_path, tiny_backbone):
    trained_on = tiny_backbone(patch_size=16)
    other = tiny_backbone(patch_size=14, embed_dim=48)
    save_checkpoint(tmp_path / "agnostic", ChannelFreeGain(), trained_on)
    with pytest.warns(UserWarning, match="designed for any backbone"):
        load_checkpoint(tmp_path / "agnostic", backbone=other)
    save_checkpoint(tmp_path / "specific", TrainedForOneBackbone(), trained_on)
    with pytest.raises(CheckpointMismatchError, match="differs in"):
        load_checkpoint(tmp_path / "specific", backbone=other)


def test_an_unknown_fingerprint_is_not_compared_but_a_known_one_is(tmp_path, tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    spec = BackboneSpec.of(backbone)
    save_checkpoint(
        tmp_path / "unknown",
        TrainedForOneBackbone(),
        BackboneSpec(**{**spec.__dict__, "fingerprint": ""}),
        normalization=NORMALIZATION,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "unknown", backbone=backbone)
    save_checkpoint(
        tmp_path / "other",
        TrainedForOneBackbone(),
        BackboneSpec(**{**spec.__dict__, "fingerprint": "0" * 16}),
        normalization=NORMALIZATION,
    )
    with pytest.warns(UserWarning, match="fingerprint"):
        load_checkpoint(tmp_path / "other", backbone=backbone)


def test_memory_defaults_reach_the_methods_that_take_them_under_the_specs_own(tiny_backbone, tmp_path):
    backbone = tiny_backbone(patch_size=16)
    save_checkpoint(tmp_path / "any", ChannelFreeGain(), BackboneSpec.any(), normalization=NORMALIZATION)
    specs = [
        f"toy-any-gain:{tmp_path / 'any'}",
        f"toy-any-gain:{tmp_path / 'any'}:max_memory_mib=7",
        "bilinear",
    ]
    variants = parse_variants(specs, backbone, {"max_memory_mib": 64.0})
    assert variants[0].pipeline.upsampler.max_memory_mib == 64.0
    assert variants[1].pipeline.upsampler.max_memory_mib == 7.0
    assert variants[2].pipeline.upsampler is not None  # bilinear takes no budget, and is not refused for it


def test_a_method_asked_for_float16_keeps_its_float16_output_through_the_pipeline(tiny_backbone, tmp_path):
    backbone = tiny_backbone(patch_size=16)
    save_checkpoint(tmp_path / "any", ChannelFreeGain(), BackboneSpec.any(), normalization=NORMALIZATION)
    half, full = parse_variants(
        [f"toy-any-gain:{tmp_path / 'any'}:output_dtype=float16", f"toy-any-gain:{tmp_path / 'any'}"],
        backbone,
    )
    images = torch.rand(1, 3, 32, 32)
    assert half(images).dtype == torch.float16
    assert full(images).dtype == torch.float32
    torch.testing.assert_close(half(images).float(), full(images), atol=1e-2, rtol=1e-3)
