"""Inference speed options: BN folding is exact, and extraction with the options writes the same files."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import write_images
from safetensors.torch import save_file

from featlift import create_backbone
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.extract import load_features
from featlift.pipeline import FeaturePipeline
from featlift.speedups import InferenceOptions, fold_batchnorm, optimize_pipeline
from featlift.upsamplers import LiFT

NAME = "test_vit"  # timm's 64-dim, 6-block ViT for tests


def randomize_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN layer non-trivial statistics and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.randn(n, generator=generator))
            layer.bias.data.copy_(torch.randn(n, generator=generator))
    head = getattr(module, "head", None)
    if head is not None:
        torch.nn.init.normal_(head.weight, std=0.1, generator=generator)


@pytest.mark.parametrize("residual", [False, True])
def test_folded_lift_equals_unfolded_and_leaves_the_original_alone(residual):
    torch.manual_seed(0)
    lift = LiFT(48, 14, residual=residual)
    randomize_batchnorm(lift)
    lift.eval()
    keys, before = list(lift.state_dict()), copy.deepcopy(lift.state_dict())
    folded = fold_batchnorm(lift)
    assert folded.folded_batchnorms == 5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert list(lift.state_dict()) == keys and all(
        torch.equal(before[k], v) for k, v in lift.state_dict().items()
    )
    features, image = torch.randn(2, 48, 6, 5), torch.randn(2, 3, 84, 70)
    with torch.inference_mode():
        for size in ((12, 10), (24, 20)):
            expected, got = lift(features, image, size), folded(features, image, size)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_fold_batchnorm_keeps_a_training_module_trainable():
    lift = LiFT(16, 8).train()
    fold_batchnorm(lift)
    assert lift.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in lift.modules()) == 5


def test_optimized_pipeline_matches_plain(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    lift = LiFT(backbone.channels, 16)
    randomize_batchnorm(lift, seed=1)
    lift.iters = 2
    plain = FeaturePipeline(backbone, lift)
    images = torch.rand(2, 3, 64, 48)
    expected = plain(images)
    for options in (InferenceOptions(), InferenceOptions(channels_last=False)):
        got = optimize_pipeline(plain, options)(images)
        assert got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    bf16 = optimize_pipeline(plain, InferenceOptions(amp="bf16"))(images)
    cosine = torch.nn.functional.cosine_similarity(bf16, expected, dim=1)
    assert bf16.dtype == torch.float32 and cosine.min() > 0.98
    assert plain.upsampler is lift  # the input pipeline is untouched
    with pytest.raises(ValueError, match="amp"):
        InferenceOptions(amp="int8")


def test_optimize_pipeline_keeps_the_callers_amp_and_channels_last(tiny_backbone):
    backbone = tiny_backbone(patch_size=16)
    mine = FeaturePipeline(backbone, LiFT(backbone.channels, 16), amp="bf16", channels_last=True)
    kept = optimize_pipeline(mine)  # the default options add BN folding, they take nothing away
    assert (kept.amp, kept.channels_last) == ("bf16", True)
    kept = optimize_pipeline(mine, InferenceOptions(fold_bn=True, channels_last=False))
    assert (kept.amp, kept.channels_last) == ("bf16", True)
    asked = optimize_pipeline(mine, InferenceOptions(amp="fp16"))  # an explicit amp is what was asked for
    assert asked.amp == "fp16"
    plain = optimize_pipeline(
        FeaturePipeline(backbone, LiFT(backbone.channels, 16)), InferenceOptions(amp="bf16")
    )
    assert (plain.amp, plain.channels_last) == ("bf16", True)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    backbone = create_backbone(NAME, weights=weights)
    lift = LiFT(backbone.channels, backbone.patch_size, residual=True)
    randomize_batchnorm(lift, seed=2)
    save_checkpoint(root / "lift", lift, backbone)
    write_images(root / "images", count=5, size=(40, 56))
    return root, weights


def extract_argv(root, weights, out, *extra):
    return [
        "extract",
        str(root / "images"),
        "--backbone",
        NAME,
        "--weights",
        str(weights),
        "--checkpoint",
        str(root / "lift"),
        "--size",
        "64",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def extract(root, weights, out, *extra):
    assert main(extract_argv(root, weights, out, *extra)) == 0
    return {p.relative_to(out): load_features(p) for p in sorted(out.rglob("*.safetensors"))}


def test_extract_with_and_without_speed_options_writes_the_same_files(tiny_files, tmp_path):
    root, weights = tiny_files
    plain = extract(
        root, weights, tmp_path / "plain", "--no-fold-bn", "--no-channels-last", "--write-threads", "0"
    )
    fast = extract(root, weights, tmp_path / "fast", "--no-channels-last", "--write-threads", "2")
    default = extract(root, weights, tmp_path / "default")
    assert len(plain) == 5 and plain.keys() == fast.keys() == default.keys()
    for key, (features, meta) in plain.items():
        assert features.shape == (64, 16, 16)
        for other in (fast, default):
            torch.testing.assert_close(other[key][0], features, atol=1e-5, rtol=1e-4)
            assert other[key][1]["amp"] == meta["amp"] == "none"


def test_extract_amp_is_recorded_and_close(tiny_files, tmp_path, capsys):
    root, weights = tiny_files
    out = tmp_path / "amp"
    plain = extract(root, weights, tmp_path / "plain")
    amp = extract(root, weights, out, "--amp", "bf16")
    for key, (features, _) in plain.items():
        assert amp[key][1]["amp"] == "bf16"
        cosine = torch.nn.functional.cosine_similarity(amp[key][0], features, dim=0)
        assert cosine.min() > 0.98
    # outputs computed in bf16 are not taken for float32 ones on resume
    code = main(extract_argv(root, weights, out))
    assert code == 2 and "amp" in capsys.readouterr().err


def test_speed_options_keep_real_dinov2_lift_features(dinov2_backbone):
    """On the real DINOv2 ViT-S/14, the default options (BN folding, channels-last) change nothing."""
    torch.manual_seed(0)
    lift = LiFT(dinov2_backbone.channels, dinov2_backbone.patch_size, residual=True)
    randomize_batchnorm(lift, seed=3)
    plain = FeaturePipeline(dinov2_backbone, lift)
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = plain(images)
    got = optimize_pipeline(plain, InferenceOptions())(images)
    assert got.shape == (1, 384, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() > 0.99999


def test_compile_wraps_the_upsampler_forward_that_the_pipeline_calls(tiny_backbone, monkeypatch):
    """--compile compiles ``forward(features, guide, output_size)`` (a real compile takes ~30 s on this CPU:
    torch.compile is replaced by a recorder that runs the function as it is)."""
    compiled = []

    def fake_compile(fn, **kwargs):
        def run(*args):
            compiled.append(tuple(arg.shape if isinstance(arg, torch.Tensor) else arg for arg in args))
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    backbone = tiny_backbone(patch_size=16)
    pipeline = FeaturePipeline(backbone, LiFT(backbone.channels, 16, iters=2))
    images = torch.rand(1, 3, 32, 32)
    expected = pipeline(images)
    optimized = optimize_pipeline(pipeline, InferenceOptions(compile=True))
    torch.testing.assert_close(optimized(images), expected, atol=1e-5, rtol=1e-4)
    assert compiled == [(torch.Size([1, backbone.channels, 2, 2]), torch.Size([1, 3, 32, 32]), (8, 8))]
