"""The upsamplers carafe, sapa, fade and dysample (featlift.upsamplers.dynamic_operators): built from the
registry, iterated passes sharing weights, the image stem of the guided ones, chunking options, and
`featlift train` / `extract` / `bench` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import load_checkpoint
from featlift.backbones import create_backbone
from featlift.cli import main
from featlift.errors import InputSizeError
from featlift.extract import load_features
from featlift.images import image_to_tensor, load_image
from featlift.pipeline import FeaturePipeline
from featlift.upsamplers import available_upsamplers, create_upsampler, get_upsampler_class
from featlift.upsamplers.operator_upsampler import ImageStem

METHODS = ("carafe", "sapa", "fade", "dysample")
GUIDED = ("sapa", "fade")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def build(name: str, channels: int = 64, **args):
    torch.manual_seed(0)
    return get_upsampler_class(name).from_features(channels, 14, **args)


def inputs(channels: int = 64, grid=(4, 5)):
    torch.manual_seed(1)
    return torch.randn(2, channels, *grid), torch.randn(2, 3, 14 * grid[0], 14 * grid[1])


@pytest.mark.parametrize("name", METHODS)
def test_each_builds_from_the_registry_and_declares_its_contract(name):
    assert name in available_upsamplers()
    up = build(name)
    assert up.name == name and up.capabilities.objective == "lift" and up.trainable
    assert up.capabilities.guide == ("input" if name in GUIDED else "none")
    assert up.capabilities.output_sizes == "power-of-two"
    assert set(up.options) == {"iters", "chunk_size", "max_memory_mib", "output_dtype"}
    assert not set(up.options) & set(up.config())
    assert (up.stem is not None) == (name in GUIDED)
    rebuilt = create_upsampler(name, **up.config())
    assert rebuilt.config() == up.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in up.state_dict().items()
    }


@pytest.mark.parametrize("name", METHODS)
def test_forward_shapes_at_2x_4x_and_a_size_between(name):
    up = build(name)
    features, guide = inputs()
    assert up.native_output_size((4, 5)) == (8, 10)
    with torch.no_grad():
        assert up(features, guide, (8, 10)).shape == (2, 64, 8, 10)
        assert up(features, guide, (16, 20)).shape == (2, 64, 16, 20)
        assert up(features, guide, (11, 13)).shape == (2, 64, 11, 13)  # the 4x output resized down
    assert build(name, iters=2).native_output_size((4, 5)) == (16, 20)
    assert build(name, iters=3).passes_for((4, 5), (8, 10)) == 3
    assert up.passes_for((4, 5), (9, 10)) == 2 and up.passes_for((4, 5), (8, 10)) == 1


@pytest.mark.parametrize("name", METHODS)
def test_passes_share_the_weights_and_the_guide(name):
    up = build(name)
    features, guide = inputs()
    with torch.no_grad():
        twice = up.one_pass(up.one_pass(features, guide, None), guide, None)
        torch.testing.assert_close(up(features, guide, (16, 20)), twice)
        torch.testing.assert_close(up(features, guide, (8, 10)), up.upsample_2x(features, guide))


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_every_parameter(name):
    up = build(name)
    features, guide = inputs()
    up(features, guide, (16, 20)).square().mean().backward()
    for key, parameter in up.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", GUIDED)
def test_the_guided_ones_follow_the_image_and_need_it(name):
    up = build(name)
    features, guide = inputs()
    with torch.no_grad():
        changed = up(features, guide, (8, 10)) - up(features, guide.flip(-1), (8, 10))
    assert changed.abs().max() > 1e-4
    with pytest.raises(InputSizeError, match="needs a guide image"):
        up(features, None, (8, 10))


@pytest.mark.parametrize("name", GUIDED)
def test_a_pass_feeds_the_operator_the_stem_of_the_image_resized_to_four_times_its_output(name):
    up = build(name)
    features, guide = inputs()  # guide 56 x 70 for a 4 x 5 grid: the 8 x 10 pass's stem sees it at 32 x 40
    with torch.no_grad():
        image = torch.nn.functional.interpolate(
            guide, (32, 40), mode="bilinear", align_corners=False, antialias=True
        )
        encoder = up.stem.project(up.stem.layers(image))
        assert encoder.shape == (2, up.operator.guide_channels, 8, 10)
        torch.testing.assert_close(up.one_pass(features, guide, None), up.operator(features, encoder))


@pytest.mark.parametrize("name", ("carafe", "dysample"))
def test_the_unguided_ones_ignore_the_image(name):
    up = build(name)
    features, guide = inputs()
    with torch.no_grad():
        torch.testing.assert_close(up(features, guide, (8, 10)), up(features, None, (8, 10)))


def test_the_image_stem_lands_on_each_pass_output_size():
    stem = ImageStem(24)
    assert sum(p.numel() for p in stem.parameters()) == (3 * 9 * 32 + 32) + 64 + (32 * 9 * 32 + 32) + 64 + (
        32 * 24 + 24
    )
    image = torch.randn(1, 3, 70, 98)
    for size in ((5, 7), (10, 14), (20, 28), (9, 13)):
        assert stem(image, size).shape == (1, 24, *size)


def test_the_operators_arguments_reach_it_and_the_checkpoint_config():
    carafe = build("carafe", up_kernel=3, compressed_channels=16, groups=2)
    assert (carafe.operator.up_kernel, carafe.operator.compressed_channels, carafe.operator.groups) == (
        3,
        16,
        2,
    )
    sapa = build("sapa", variant="G", embedding_dim=8, up_kernel=3)
    assert (sapa.operator.variant, sapa.operator.embedding_dim, sapa.operator.up_kernel) == ("G", 8, 3)
    fade = build("fade", lite=True, up_kernel=3)
    assert fade.operator.lite and fade.operator.up_kernel == 3
    dysample = build("dysample", style="pl", groups=2, dyscope=True)
    assert (dysample.operator.style, dysample.operator.groups, dysample.operator.dyscope) == ("pl", 2, True)
    assert dysample.config() == {"channels": 64, "scale": 2, "style": "pl", "groups": 2, "dyscope": True}
    for up in (carafe, sapa, fade, dysample):
        rebuilt = create_upsampler(up.name, **up.config())
        rebuilt.load_state_dict(up.state_dict())  # same shapes: the config rebuilds the same module


def test_guide_channels_follow_the_operator():
    assert build("sapa").operator.guide_channels == 32
    assert build("sapa", variant="I").operator.guide_channels == 64
    assert build("fade").operator.guide_channels == 64  # gating mixes encoder and decoder channel by channel
    assert build("fade", gating=False).operator.guide_channels == 32
    assert build("fade", gating=False, lite=True).stem.project.out_channels == 32


@pytest.mark.parametrize("name", METHODS)
def test_chunk_size_and_output_dtype_change_nothing_but_the_dtype(name):
    up = build(name, iters=2)
    features, guide = inputs()
    chunked = create_upsampler(name, **up.config(), iters=2, chunk_size=25, output_dtype="bfloat16")
    chunked.load_state_dict(up.state_dict())
    with torch.no_grad():
        want = up(features, guide, (16, 20))
        got = chunked(features, guide, (16, 20))
    assert got.dtype == torch.bfloat16 and chunked.operator.chunk_rows is None  # restored after the call
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    with torch.no_grad():
        chunked.output_dtype = None
        torch.testing.assert_close(chunked(features, guide, (16, 20)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ("dysample", "carafe", "sapa"))
def test_a_scale_of_three(name):
    up = build(name, scale=3, channels=64)
    features, guide = inputs()
    assert up.config()["scale"] == 3 and up.native_output_size((4, 5)) == (12, 15)
    with torch.no_grad():
        assert up(features, guide, (36, 45)).shape == (2, 64, 36, 45)
    with pytest.raises(ValueError, match="scale=3 has no 2x pass"):
        up.upsample_2x(features, guide)


def test_bad_arguments_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="dysample scale must be an integer >= 2.*got 1"):
        build("dysample", scale=1)
    with pytest.raises(ValueError, match="sapa iters must be >= 1.*got 0"):
        build("sapa", iters=0)
    with pytest.raises(ValueError, match="fade chunk_size must be >= 1"):
        build("fade", chunk_size=0)
    with pytest.raises(ValueError, match="carafe output_dtype 'float8'"):
        build("carafe", output_dtype="float8")
    with pytest.raises(ValueError, match="style 'ab'"):
        build("dysample", style="ab")
    up = build("dysample")
    with pytest.raises(InputSizeError, match=r"built for 64 channels, got features \[2, 32, 4, 5\]"):
        up(torch.randn(2, 32, 4, 5), None, (8, 10))


# ---- through the CLI, on a tiny random ViT ---------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights):
    """For dysample and sapa: a 2-epoch run, and a 1-epoch run resumed to 2 epochs, from the CLI."""
    root = tmp_path_factory.mktemp("trained")
    images = write_image_tree(root / "imgs", count=3, corrupt=False)

    def train(method: str, run: str, *extra: str) -> int:
        args = train_args(images, root / method / run, weights, "--upsampler", method)
        cache = str(root / method / "cache")
        with one_thread():
            return main([*args, "--val-fraction", "0.34", "--cache", cache, "--seed", "1", *extra])

    codes = {}
    for method in ("dysample", "sapa"):
        codes[method] = (
            train(method, "straight", "--epochs", "2"),
            train(method, "resumed", "--epochs", "1"),
            train(method, "resumed", "--epochs", "2", "--resume"),
        )
    return root, images, codes


def steps(run: Path) -> list[tuple[int, int, float]]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [(r["epoch"], r["step"], r["loss"]) for r in map(json.loads, lines) if r["type"] == "step"]


@pytest.mark.parametrize("method", ["dysample", "sapa"])
def test_trains_with_lifts_objective_and_resumes_as_an_uninterrupted_run(trained, method):
    root, _, codes = trained
    assert codes[method] == (0, 0, 0)
    config = json.loads((root / method / "straight" / "config.json").read_text())
    assert config["upsampler"]["name"] == method and config["training"]["objective_name"] == "lift"
    straight, resumed = steps(root / method / "straight"), steps(root / method / "resumed")
    assert [s[:2] for s in straight] == [s[:2] for s in resumed] and len(straight) == 2
    for (_, _, a), (_, _, b) in zip(straight, resumed, strict=True):
        assert abs(a - b) <= 1e-5
    a, b = (load_file(str(root / method / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert (
        straight[0][2] != straight[1][2]
    )  # the same batch in both epochs: the first step changed the module
    module, _ = load_checkpoint(root / method / "straight")
    assert module.name == method and module.config() == build(method, channels=192).config()


def test_extract_with_a_trained_checkpoint(trained, weights, tmp_path):
    root, images, _ = trained
    checkpoint = root / "sapa" / "straight"
    out = tmp_path / "out"
    argv = ["-q", "extract", str(images), "--backbone", TINY_NAME, "--weights", str(weights), "--size", "64"]
    argv += ["--upsampler", "sapa", "--checkpoint", str(checkpoint), "--iters", "2", "--out", str(out)]
    assert main([*argv, "--workers", "0", "--device", "cpu"]) == 0
    features, meta = load_features(out / "img 0's.jpg.safetensors")
    assert features.shape == (192, 16, 16) and meta["upsampler"] == "sapa"
    backbone = create_backbone(TINY_NAME, weights=weights)
    module, _ = load_checkpoint(checkpoint, backbone=backbone, options={"iters": 2})
    image = image_to_tensor(load_image(images / "img 0's.jpg"), (64, 64))[None]
    with torch.no_grad():
        torch.testing.assert_close(features, FeaturePipeline(backbone, module.eval())(image)[0])


def test_bench_with_trained_checkpoints(trained, weights, tmp_path):
    root, _, _ = trained
    dysample, sapa = root / "dysample" / "straight", root / "sapa" / "straight"
    variants = f"bilinear,dysample:{dysample},sapa:{sapa}:iters=2"
    argv = ["bench", "--backbone", TINY_NAME, "--weights", str(weights), "--device", "cpu", "--sizes", "64"]
    argv += ["--variants", variants, "--batch-sizes", "1", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--out", str(tmp_path / "bench")]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench" / "bench.json").read_text())["results"]}
    assert rows[f"dysample:{dysample}"]["output_grid"] == [8, 8]
    assert rows[f"sapa:{sapa}:iters=2"]["output_grid"] == [16, 16]
    for spec, method in ((f"dysample:{dysample}", "dysample"), (f"sapa:{sapa}:iters=2", "sapa")):
        params = sum(p.numel() for p in build(method, channels=192).parameters())
        assert rows[spec]["upsampler_params"] == params
        assert rows[spec]["upsampler"]["ms"] > 0 and rows[spec]["upsampler"]["peak_memory_mib"] > 0
