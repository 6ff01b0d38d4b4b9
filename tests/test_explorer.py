"""`featlift viz explore`: quantisation, principal basis, budget rule, and the HTML page the CLI writes (tiny ViT).

The page is read back here the way its JavaScript reads it (the JSON in ``#featlift-data``, base64 codes laid
out cell by cell); tests/test_explorer_browser.py runs the JavaScript itself in Chromium.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM_NAME
from PIL import Image
from skimage import data as skdata

from featlift import create_backbone
from featlift.cli import main
from featlift.explorer import (
    BITS,
    MEGABYTE,
    cosine_maps,
    pool_to_cells,
    principal_basis,
    quantise,
)
from featlift.variants import parse_variants
from featlift.viz import variant_features

DATA_SCRIPT = re.compile(r'<script type="application/json" id="featlift-data">(.*?)</script>', re.S)


@pytest.fixture
def two_images(tmp_path):
    """A non-square photo (451x300) and a square one, so a swapped x/y shows."""
    chelsea, coffee = tmp_path / "chelsea.jpg", tmp_path / "coffee.png"
    Image.fromarray(skdata.chelsea()).save(chelsea)
    Image.fromarray(skdata.coffee()[:, :400]).save(coffee)  # 400x400
    return [chelsea, coffee]


def explore(images, weights, out, *extra):
    return main(["-q", "viz", "explore", *map(str, images), "--backbone", TINY_TIMM_NAME, "--weights", str(weights),
                 "--size", "64", "--device", "cpu", "--panel", "160", "--out", str(out), *extra])  # fmt: skip


def page_data(html: str) -> dict:
    (text,) = DATA_SCRIPT.findall(html)
    return json.loads(text)


def decoded_cells(variant: dict) -> np.ndarray:
    """``[N, K]`` float32, decoded as the page's JavaScript does: code * scale + offset, cells row by row."""
    codes = np.frombuffer(base64.b64decode(variant["codes"]), dtype=np.uint8)
    scale = np.frombuffer(base64.b64decode(variant["scale"]), dtype="<f4")
    offset = np.frombuffer(base64.b64decode(variant["offset"]), dtype="<f4")
    height, width = variant["grid"]
    assert codes.size == height * width * variant["components"]
    return codes.reshape(height * width, variant["components"]).astype(np.float32) * scale + offset


def reference_features(weights, image_path, specs, size=(64, 64)):
    backbone = create_backbone(TINY_TIMM_NAME, weights=weights)
    variants = parse_variants(specs, backbone)
    with torch.inference_mode():
        return variant_features(variants, Image.open(image_path).convert("RGB"), size)


def test_quantise_decodes_within_half_a_step():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(500, 6, generator=generator) * torch.tensor([0.01, 1.0, 30.0, 5.0, 2.0, 1.0])
    values[:, 5] = 0.25  # a constant column decodes exactly
    quantised = quantise(values)
    assert quantised.codes.dtype == np.uint8 and quantised.codes.shape == (500, 6)
    assert quantised.codes[:, :5].min() == 0 and quantised.codes[:, :5].max() == 255  # the full 8-bit range
    error = np.abs(quantised.decode() - values.numpy())
    step = quantised.scale
    assert (error <= step / 2 * (1 + 1e-4) + 1e-7).all()
    assert error[:, 2].max() > 0.4 * step[2]  # the bound is tight: a coarser code would break it
    assert np.allclose(quantised.decode()[:, 5], 0.25) and quantised.max_error == pytest.approx(
        step.max() / 2
    )
    with pytest.raises(Exception, match="NaN or infinite"):
        quantise(torch.tensor([[0.0, float("nan")]]))


def test_principal_basis_keeps_the_dot_products_of_low_rank_cells():
    generator = torch.Generator().manual_seed(0)
    # cells of rank 4 in 32 dimensions, far from the origin (an uncentred basis must keep the mean direction)
    cells = torch.randn(300, 4, generator=generator) @ torch.randn(4, 32, generator=generator) + 3.0
    cells = cells - cells.mean(0) + torch.randn(32, generator=generator) * 3
    basis = principal_basis(cells, 5)
    assert basis.shape == (32, 5)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    projected = cells @ basis
    assert torch.allclose(projected @ projected.T, cells @ cells.T, rtol=1e-4, atol=1e-3)
    # the first direction carries the most energy: components come in order
    energy = projected.pow(2).sum(0)
    assert (energy[:-1] >= energy[1:]).all()
    queries = np.arange(20)
    assert np.abs(cosine_maps(projected.numpy(), queries) - cosine_maps(cells.numpy(), queries)).max() < 1e-4


def test_pool_to_cells_halves_until_it_fits():
    features = torch.arange(2 * 6 * 10, dtype=torch.float32).reshape(2, 6, 10)
    assert pool_to_cells(features, 60) is features
    pooled = pool_to_cells(features, 59)
    assert pooled.shape == (2, 3, 5)
    assert pooled[0, 0, 0] == features[0, :2, :2].mean()
    assert pool_to_cells(features, 6).shape == (2, 2, 3) and pool_to_cells(features, 4).shape == (2, 1, 2)


def test_cli_page_is_self_contained_within_budget_and_decodes(
    tmp_path, tiny_timm_weights, two_images, capsys
):
    out = tmp_path / "pages" / "explore.html"
    assert (
        explore(two_images, tiny_timm_weights, out, "--variant", "none,bilinear", "--max-mb-per-image", "1")
        == 0
    )
    printed = capsys.readouterr().out
    html = out.read_text(encoding="utf-8")
    assert list(out.parent.iterdir()) == [out]  # written atomically: no temp file left

    # self-contained: nothing fetched from anywhere, no external script, style sheet or frame
    assert not re.search(r"https?://", html, re.I)
    assert not re.search(r"<(link|iframe|object|embed)\b", html, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"\bsrc\s*=\s*[\"'](?!data:)", html, re.I)
    assert not re.search(r"url\(|@import|fetch\(|XMLHttpRequest", html)

    data = page_data(html)
    assert [image["name"] for image in data["images"]] == ["chelsea.jpg", "coffee.png"]
    assert data["budgetBytes"] == MEGABYTE and data["bits"] == BITS == 8
    for image in data["images"]:
        assert image["entryBytes"] == len(json.dumps({k: v for k, v in image.items() if k != "entryBytes"},
                                                     separators=(",", ":")))  # fmt: skip
        assert image["entryBytes"] <= data["budgetBytes"]
        assert f"{image['name']}: {image['entryBytes'] / MEGABYTE:.2f} MB of 1 MB" in printed
    template_bytes = len(html) - len(DATA_SCRIPT.findall(html)[0])
    assert len(html.encode()) <= len(data["images"]) * data["budgetBytes"] + template_bytes + 2048

    # every variant's channels embedded (the budget allows it), decoding to the features within half a step
    for path, image in zip(two_images, data["images"], strict=True):
        reference = reference_features(tiny_timm_weights, path, ["none", "bilinear"])
        assert [v["grid"] for v in image["variants"]] == [[4, 4], [8, 8]]
        for variant, features in zip(image["variants"], reference, strict=True):
            assert not variant["projected"] and variant["components"] == variant["channels"] == 192
            cells = features.reshape(192, -1).T.numpy()  # [N, C], row by row
            scale = np.frombuffer(base64.b64decode(variant["scale"]), dtype="<f4")
            error = np.abs(decoded_cells(variant) - cells)
            assert (error <= scale / 2 * (1 + 1e-4) + 1e-6).all()
            assert variant["maxError"] == pytest.approx(scale.max() / 2)
            assert variant["codeBytes"] == cells.size
            expected = f"{variant['title']}: {variant['grid'][0]}x{variant['grid'][1]}, 192 channels, 8 bits"
            assert expected in printed
    assert "2 image(s) x 2 variant(s)" in printed


def test_cli_small_budget_projects_onto_principal_components(tmp_path, tiny_timm_weights, two_images, capsys):
    out = tmp_path / "small.html"
    budget = 0.06  # all 192 channels of 8x8 + 16x16 + 16x16 cells need ~150 kB of base64
    code = explore(two_images[:1], tiny_timm_weights, out, "--variant", "none,bilinear,input-2x", "--size", "128",
                   "--max-mb-per-image", str(budget))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = page_data(out.read_text())
    (image,) = data["images"]
    assert image["entryBytes"] <= budget * MEGABYTE
    reference = reference_features(
        tiny_timm_weights, two_images[0], ["none", "bilinear", "input-2x"], (128, 128)
    )
    for variant, features in zip(image["variants"], reference, strict=True):
        assert variant["projected"] and variant["components"] in (128, 64, 32, 16)
        assert variant["grid"] == variant["sourceGrid"]  # PCA first, the grid kept
        cells = features.reshape(192, -1).T.numpy().astype(np.float64)
        decoded = decoded_cells(variant).astype(np.float64)
        # the codes are projections onto orthonormal directions: their energy is the stated share of the cells'
        kept = (decoded**2).sum() / (cells**2).sum()
        assert kept == pytest.approx(variant["keptEnergy"], rel=0.01) and 0.5 < kept < 1
        # cosine similarities from the codes are those of the features, within the stated (measured) error
        every = np.arange(len(cells))
        error = np.abs(cosine_maps(decoded, every) - cosine_maps(cells, every)).max()
        assert variant["similarityError"] <= error + 1e-6 and error < 2 * variant["similarityError"] + 0.02
        assert error < 0.1
    assert "PCA components of 192" in capsys.readouterr().out


def test_cli_tiny_budget_pools_the_largest_grid(tmp_path, tiny_timm_weights, two_images, capsys):
    out = tmp_path / "pooled.html"
    code = explore(two_images[:1], tiny_timm_weights, out, "--variant", "none,bilinear:iters=2",
                   "--max-mb-per-image", "0.006", "--panel", "32")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (image,) = page_data(out.read_text())["images"]
    none, bilinear = image["variants"]
    assert image["entryBytes"] <= 6_000
    assert bilinear["sourceGrid"] == [16, 16] and bilinear["grid"][0] < 16
    assert none["grid"] == [4, 4] and none["components"] == bilinear["components"] == 16
    assert "(pooled from 16x16)" in capsys.readouterr().out


def test_cli_errors(tmp_path, tiny_timm_weights, two_images, capsys):
    assert explore(two_images, tiny_timm_weights, tmp_path / "x.png") == 2
    assert "must be an .html file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        explore(two_images, tiny_timm_weights, tmp_path / "x.html", "--max-mb-per-image", "0")
    assert exit_info.value.code == 2 and "--max-mb-per-image: 0 must be" in capsys.readouterr().err
    code = explore(two_images[:1], tiny_timm_weights, tmp_path / "x.html", "--variant", "none",
                   "--max-mb-per-image", "0.001")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "over the budget of 1,000 bytes per image (--max-mb-per-image 0.001)" in err
    assert explore([tmp_path / "missing.jpg"], tiny_timm_weights, tmp_path / "x.html") == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_cli_images_of_one_name_in_two_folders(tmp_path, tiny_timm_weights, two_images):
    """Like DAVIS frames 00000.jpg of two sequences: both shown, named by their paths; a repeated file once."""
    first, second = tmp_path / "a" / "00000.jpg", tmp_path / "b" / "00000.jpg"
    for path, source in ((first, two_images[0]), (second, two_images[1])):
        path.parent.mkdir()
        Image.open(source).convert("RGB").save(path)
    out = tmp_path / "same.html"
    assert explore([first, second, first], tiny_timm_weights, out, "--variant", "none") == 0
    images = page_data(out.read_text())["images"]
    assert [image["name"] for image in images] == [str(first), str(second)]
    assert [image["size"] for image in images] == [[451, 300], [400, 400]]
