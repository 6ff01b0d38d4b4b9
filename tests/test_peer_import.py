"""``featlift import-peer``: the official JAFAR, AnyUp and FeatUp checkpoints in ../shared as featlift
checkpoints, used from the CLI next to LiFT."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import DINOV2_WEIGHTS, IMAGENET_SAMPLE, SHARED
from safetensors.torch import load_file

from featlift import load_checkpoint
from featlift.cli import main
from featlift.peer_import import read_official

PEER_WEIGHTS = SHARED / "weights" / "peers"
OFFICIAL = {
    "jafar": PEER_WEIGHTS / "jafar_vit_small_patch14_dinov2.lvd142m.pth",
    "anyup": PEER_WEIGHTS / "anyup_paper.pth",
    "featup": PEER_WEIGHTS / "featup_jbu_dinov2_cocostuff.ckpt",
}
UPSAMPLER = {"jafar": "jafar", "anyup": "anyup", "featup": "featup-jbu"}
requires_peers = pytest.mark.skipif(
    not all(path.is_file() for path in OFFICIAL.values()),
    reason=f"official peer checkpoints not found in {PEER_WEIGHTS} (../shared is absent)",
)


@requires_peers
@pytest.mark.parametrize("method", sorted(OFFICIAL))
def test_import_peer_writes_a_checkpoint_that_computes_what_the_official_file_does(tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["import-peer", method, str(OFFICIAL[method]), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["upsampler"]["name"] == UPSAMPLER[method]
    assert config["training"]["source_sha256"] and config["training"]["license"]
    if method == "anyup":
        assert config["backbone"] == {"name": "any"}
    else:
        assert config["backbone"]["name"] == "vit_small_patch14_dinov2.lvd142m"
        assert config["backbone"]["fingerprint"] == ""  # the official backbone weights are unknown here
        assert (config["backbone"]["channels"], config["backbone"]["patch_size"]) == (384, 14)
    imported, _ = load_checkpoint(out)
    official = read_official(method, OFFICIAL[method])
    torch.manual_seed(0)
    features, guide = torch.randn(1, 384, 8, 8), torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(imported(features, guide, (32, 32)), official(features, guide, (32, 32)))


@requires_peers
@pytest.mark.parametrize("method,other", [("jafar", "anyup"), ("anyup", "featup"), ("featup", "jafar")])
def test_a_checkpoint_of_another_method_is_refused_naming_the_file(tmp_path, method, other, capsys):
    assert main(["import-peer", method, str(OFFICIAL[other]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(OFFICIAL[other]) in err and "expected" in err
    assert not (tmp_path / "x").exists()


def test_a_file_that_is_no_checkpoint_is_refused_naming_it(tmp_path, capsys):
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    assert main(["import-peer", "jafar", str(junk), "--out", str(tmp_path / "x")]) == 2
    assert str(junk) in capsys.readouterr().err


@requires_peers
def test_extract_runs_each_imported_peer_on_the_real_backbone(tmp_path):
    images = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:1]
    for method in sorted(OFFICIAL):
        ckpt = tmp_path / f"ckpt-{method}"
        assert main(["import-peer", method, str(OFFICIAL[method]), "--out", str(ckpt)]) == 0
        out = tmp_path / f"features-{method}"
        argv = ["extract", str(images[0]), "--weights", str(DINOV2_WEIGHTS), "--upsampler", UPSAMPLER[method]]
        argv += ["--checkpoint", str(ckpt), "--size", "112", "--output-size", "64", "--out", str(out)]
        argv += ["--dtype", "float16"]
        assert main(argv) == 0
        (stored,) = out.rglob("*.safetensors")
        features = load_file(stored)["features"]
        assert features.shape == (384, 64, 64) and features.dtype == torch.float16
        assert torch.isfinite(features).all()


@requires_peers
def test_anyups_weights_for_any_backbone_take_the_patch_size_of_the_backbone_they_run_on(
    tmp_path, tiny_backbone
):
    assert main(["import-peer", "anyup", str(OFFICIAL["anyup"]), "--out", str(tmp_path / "anyup")]) == 0
    backbone = tiny_backbone(patch_size=16)  # 192 channels, patch 16: not the DINOv2 the file was made with
    module, _ = load_checkpoint(tmp_path / "anyup", backbone=backbone)
    assert module.native_output_size((4, 4)) == (64, 64)
    with torch.no_grad():
        out = module(torch.randn(1, backbone.channels, 4, 4), torch.randn(1, 3, 64, 64), (16, 16))
    assert out.shape == (1, backbone.channels, 16, 16)


@requires_peers
def test_extracts_max_memory_and_dtype_reach_the_chunked_method(tmp_path, monkeypatch):
    from featlift.upsamplers.jafar import JAFAR

    built = []
    original = JAFAR.__init__

    @functools.wraps(original)  # the same signature: checkpoints are checked against it
    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(JAFAR, "__init__", recording)
    ckpt = tmp_path / "jafar"
    assert main(["import-peer", "jafar", str(OFFICIAL["jafar"]), "--out", str(ckpt)]) == 0
    image = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[0]
    argv = [
        "extract",
        str(image),
        "--weights",
        str(DINOV2_WEIGHTS),
        "--upsampler",
        "jafar",
        "--checkpoint",
        str(ckpt),
    ]
    argv += [
        "--size",
        "56",
        "--output-size",
        "16",
        "--dtype",
        "float16",
        "--max-memory",
        "32",
        "--out",
        str(tmp_path / "f"),
    ]
    assert main(argv) == 0
    assert (built[-1].max_memory_mib, built[-1].output_dtype) == (32.0, "float16")


@requires_peers
def test_imported_peers_run_as_variants_in_bench_and_viz(tmp_path):
    specs = []
    for method in sorted(OFFICIAL):
        ckpt = tmp_path / f"ckpt-{method}"
        assert main(["import-peer", method, str(OFFICIAL[method]), "--out", str(ckpt)]) == 0
        specs.append(f"{UPSAMPLER[method]}:{ckpt}:size=16x16")
    backbone = ["--weights", str(DINOV2_WEIGHTS), "--device", "cpu"]
    bench = ["bench", *backbone, "--sizes", "56", "--variants", ",".join(["bilinear", *specs])]
    assert main([*bench, "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "bench")]) == 0
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert all(spec.split(":")[0] in table for spec in specs)
    image = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[0]
    viz = ["viz", "pca", str(image), *backbone, "--size", "56", "--variant", ",".join(specs)]
    assert main([*viz, "--out", str(tmp_path / "pca.png")]) == 0
    assert (tmp_path / "pca.png").stat().st_size > 0
