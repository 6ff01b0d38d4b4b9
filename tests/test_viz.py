"""`featlift viz similarity|pca`: similarity maps, PCA colours, PNG layout, CLI (tiny and real ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM_NAME
from PIL import Image
from skimage import data as skdata
from toy_upsamplers import GuideRecorder

from featlift import create_backbone
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.images import image_to_tensor, resize_images
from featlift.upsamplers import LiFT
from featlift.variants import parse_variants
from featlift.viz import pca_rgb, short_label, similarity_figure, similarity_map, variant_features

TITLE_PX = 28


@pytest.fixture
def chelsea_path(tmp_path):
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(skdata.chelsea()).save(path)  # 451x300
    return path


def test_similarity_map_peaks_at_the_point():
    torch.manual_seed(0)
    features = torch.randn(16, 6, 9)
    # cell (row 2, col 7) of a 9x6 grid over a 180x120 image is centred on pixel (149.5, 49.5)
    sim = similarity_map(features, (149.5, 49.5), (180, 120))
    assert sim.shape == (6, 9)
    assert sim[2, 7] == pytest.approx(1.0, abs=1e-5) and sim.argmax().item() == 2 * 9 + 7
    assert sim.min() >= -1 - 1e-5


def test_pca_rgb_joint_colours_are_shared():
    torch.manual_seed(0)
    low = torch.randn(32, 8, 8)
    high = torch.nn.functional.interpolate(low[None], scale_factor=2, mode="nearest")[0]
    joint = pca_rgb([low, high])
    assert joint[0].shape == (8, 8, 3) and joint[1].shape == (16, 16, 3)
    assert all(0 <= rgb.min() and rgb.max() <= 1 for rgb in joint)
    assert np.allclose(joint[1][::2, ::2], joint[0], atol=1e-6)  # same cell, same colour in both panels
    alone = pca_rgb([low], joint=False)[0]
    assert alone.shape == (8, 8, 3) and alone.std() > 0.1


def viz(kind, image, weights, out, *extra):
    return main(["-q", "viz", kind, str(image), "--backbone", TINY_TIMM_NAME, "--weights", str(weights),
                 "--size", "64", "--device", "cpu", "--panel", "120", "--out", str(out), *extra])  # fmt: skip


def test_cli_similarity_and_pca_png_sizes(tmp_path, tiny_timm_weights, chelsea_path, capsys):
    out = tmp_path / "figs" / "sim.png"
    code = viz("similarity", chelsea_path, tiny_timm_weights, out, "--point", "200,150", "--point", "50,40")
    assert code == 0, capsys.readouterr().err
    panel_h = round(120 * 300 / 451)
    # default variants without a shipped checkpoint: none, bilinear, input-2x -> 1 + 3 columns, one row per point
    assert Image.open(out).size == (4 * 120, 2 * panel_h + TITLE_PX)
    assert list((tmp_path / "figs").iterdir()) == [out]  # atomic write leaves no temporary file

    out = tmp_path / "pca.png"
    code = viz(
        "pca", chelsea_path, tiny_timm_weights, out, "--variant", "none,bilinear:iters=2", "--per-variant"
    )
    assert code == 0, capsys.readouterr().err
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (panel_h + TITLE_PX, 3 * 120, 3)
    assert image[TITLE_PX:, 120:].std() > 10  # the PCA panels are not blank
    assert "per-variant PCA" in capsys.readouterr().out


def test_cli_five_panels_with_lift_checkpoint(tmp_path, tiny_timm_weights, chelsea_path, capsys):
    """The paper-style row: image, backbone, bilinear, input-2x, LiFT, LiFT x2 (a LiFT checkpoint given by path)."""
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size), backbone)
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "sim5.png"
    specs = f"none,bilinear,input-2x,lift:{ckpt},lift:{ckpt}:iters=2"
    code = viz("similarity", chelsea_path, tiny_timm_weights, out, "--point", "200,150", "--variant", specs)
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (6 * 120, round(120 * 300 / 451) + TITLE_PX)
    assert short_label(f"lift:{ckpt}:iters=2") == "lift:ckpt:iters=2" and short_label("none") == "backbone"


def test_cli_errors(tmp_path, tiny_timm_weights, chelsea_path, capsys):
    assert viz("similarity", chelsea_path, tiny_timm_weights, tmp_path / "a.png", "--point", "451,10") == 2
    assert "point 451,10 lies outside the 451x300" in capsys.readouterr().err
    assert (
        viz(
            "similarity",
            chelsea_path,
            tiny_timm_weights,
            tmp_path / "a.png",
            "--point",
            "1,1",
            "--variant",
            "lift",
        )
        == 2
    )
    assert "needs --checkpoint" in capsys.readouterr().err
    assert viz("pca", chelsea_path, tiny_timm_weights, tmp_path / "a.jpg", "--variant", "none") == 2
    assert "must be a .png" in capsys.readouterr().err
    assert viz("pca", tmp_path / "missing.jpg", tiny_timm_weights, tmp_path / "a.png") == 2
    assert "missing.jpg: no such file" in capsys.readouterr().err


def test_real_dinov2_similarity_figure(tmp_path, dinov2_backbone):
    """Real DINOv2 on a real photo: the PNG has the documented size, and the query point is the most similar area."""
    image = Image.fromarray(skdata.chelsea())
    variants = parse_variants(["none", "bilinear"], dinov2_backbone)
    path = similarity_figure(variants, image, [(260, 150)], tmp_path / "cat.png", panel=200)
    assert Image.open(path).size == (3 * 200, round(200 * 300 / 451) + TITLE_PX)
    features = variants[1](image_to_tensor(image, (224, 224))[None])[0]
    sim = similarity_map(features, (260, 150), (451, 300))
    # the cat's face (around the point) is more similar to the point than the image's top-left background corner
    assert sim[14:18, 16:20].mean() > sim[:4, :4].mean() + 0.2


def test_cli_with_methods_registered_outside_featlift(tmp_path, tiny_timm_weights, chelsea_path, capsys):
    """Any registered method and option: the 4x4 grid stretched 4 times, and a method guided at the output
    size, which gets its guide from the photo itself, not from the 64 px input."""
    out = tmp_path / "toys.png"
    specs = "toy-stretch:factor=4,toy-guide-recorder:size=48x48"
    GuideRecorder.seen.clear()
    code = viz("pca", chelsea_path, tiny_timm_weights, out, "--variant", specs)
    assert code == 0, capsys.readouterr().err
    assert Image.open(out).size == (3 * 120, round(120 * 300 / 451) + TITLE_PX)
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    photo = image_to_tensor(Image.open(chelsea_path))[None]
    [guide] = GuideRecorder.seen
    torch.testing.assert_close(guide, backbone.normalize(resize_images(photo, (48, 48))))
    variants = parse_variants([specs], backbone)
    grids = [tuple(f.shape[-2:]) for f in variant_features(variants, Image.open(chelsea_path), (64, 64))]
    assert grids == [(16, 16), (48, 48)]
