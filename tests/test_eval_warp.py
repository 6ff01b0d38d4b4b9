"""`featlift eval warp`: homography geometry, matching and PCK, CLI end to end, real images and stereo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, TINY_TIMM_NAME
from PIL import Image

from featlift.cli import main
from featlift.evaluate.correspondence import match_keypoints
from featlift.evaluate.warp import (
    apply_homography,
    homography_from_points,
    keypoint_grid,
    pck,
    random_homography,
    warp_image,
)


def test_homography_from_points_recovers_a_known_warp():
    truth = np.array([[1.1, 0.05, 0.02], [-0.03, 0.95, 0.04], [0.1, -0.05, 1.0]])
    source = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    fitted = homography_from_points(source, apply_homography(truth, source))
    assert np.allclose(fitted, truth, atol=1e-9)
    points = np.random.default_rng(0).uniform(size=(10, 2))
    assert np.allclose(apply_homography(fitted, points), apply_homography(truth, points))


def test_random_homography_is_seeded_and_bounded():
    a = random_homography(np.random.default_rng([0, 3]), 0.1)
    b = random_homography(np.random.default_rng([0, 3]), 0.1)
    c = random_homography(np.random.default_rng([0, 4]), 0.1)
    assert np.array_equal(a, b) and not np.allclose(a, c)
    corners = apply_homography(a, np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert np.all(np.abs(corners - [[0, 0], [1, 1]]) <= 0.1 + 1e-9)


def test_identity_warp_and_shifted_warp_of_an_image():
    image = torch.rand(3, 20, 30)
    assert torch.allclose(warp_image(image, np.eye(3)), image, atol=1e-5)
    shift = np.array([[1.0, 0.0, 3 / 30], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 3 pixels right
    warped = warp_image(image, shift)
    assert (
        torch.allclose(warped[:, :, 3:], image[:, :, :-3], atol=1e-5) and warped[:, :, :3].abs().max() < 1e-5
    )


def test_identity_matching_gives_pck_one():
    h, w = 6, 8
    features = torch.randn(16, h, w)
    points = np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1).reshape(-1, 2)
    matched = match_keypoints(features, features, points)
    assert np.allclose(matched, points)
    hits = pck(matched, points, (224, 224))
    assert all(h.all() for h in hits.values())
    assert keypoint_grid(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]


def test_matching_across_grids_follows_a_shift_and_pck_thresholds():
    h, w = 4, 6
    torch.manual_seed(0)
    target = torch.randn(64, 2 * h, 2 * w)  # a 2x finer grid of the scene, which moved one fine cell right
    source = torch.roll(target, -1, dims=2)[
        :, 1::2, 1::2
    ]  # coarse cell (i, j) is seen at fine cell (2i + 1, 2j + 2)
    i, j = np.meshgrid(np.arange(h), np.arange(w - 1), indexing="ij")
    points = np.stack([(j.ravel() + 0.5) / w, (i.ravel() + 0.5) / h], axis=1)  # coarse cell centres
    matched = match_keypoints(source, target, points)
    expected = np.stack([(2 * j.ravel() + 2.5) / (2 * w), (2 * i.ravel() + 1.5) / (2 * h)], axis=1)
    assert np.allclose(matched, expected)
    truth = points.copy()
    hits = pck(truth + [[0.04, 0.0]] * len(points), truth, (100, 200), alphas=(0.1, 0.05, 0.01))
    # 0.04 of the width of 200 px = 8 px: within 0.1 * 200 and 0.05 * 200 px, not within 0.01 * 200 px
    assert hits[0.1].all() and hits[0.05].all() and not hits[0.01].any()


def test_known_answer_pck_of_position_features_under_the_identity_warp(tmp_path):
    """--strength 0 makes every homography the identity. Features that code each cell's position match a
    keypoint to the centre of its own cell: a 16x16 keypoint grid on an 8x8 feature grid sits a quarter cell
    (1/32 of the side, 2 px of 64) from a cell centre in x and in y, an error of hypot(2, 2) = 2.83 px: within
    0.1 * 64 and 0.05 * 64 px, not within 0.01 * 64 px."""
    from fake_variants import PositionFeatures

    from featlift.evaluate.warp import evaluate_variant

    images = write_photos(tmp_path / "photos", count=2)
    row = evaluate_variant(
        PositionFeatures(cell=8), sorted(images.iterdir()), (64, 64), strength=0.0, keypoints=16
    )
    assert row.metrics == {"PCK@0.1": 100.0, "PCK@0.05": 100.0, "PCK@0.01": 0.0}
    assert row.details["homography_keypoints"] == 2 * 16 * 16


def write_photos(folder, count=3):
    from skimage import data

    folder.mkdir(parents=True)
    for i, photo in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:count]):
        Image.fromarray(photo[::4, ::4]).save(folder / f"photo {i}.jpg")
    return folder


def warp_cli(data, weights, out, *extra):
    return main(
        ["-q", "eval", "warp", "--data", str(data), "--backbone", TINY_TIMM_NAME, "--weights", str(weights),
         "--size", "64", "--device", "cpu", "--out", str(out), *extra]
    )  # fmt: skip


def test_cli_homographies_and_stereo_are_deterministic(tmp_path, tiny_timm_weights, capsys):
    folder = write_photos(tmp_path / "photos")
    code = warp_cli(folder, tiny_timm_weights, tmp_path / "a", "--variant", "none,bilinear", "--variant", "input-2x",
                    "--stereo", "--keypoints", "8")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert warp_cli(folder, tiny_timm_weights, tmp_path / "b", "--variant", "none", "--keypoints", "8") == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert all(
        a["results"][0]["metrics"][k] == v for k, v in b["results"][0]["metrics"].items()
    )  # same warps
    rows = {r["variant"]: r for r in a["results"]}
    assert set(rows["none"]["metrics"]) == {
        f"{p}PCK@{x}" for p in ("", "stereo ") for x in ("0.1", "0.05", "0.01")
    }
    assert 0 < rows["none"]["details"]["homography_keypoints"] <= 3 * 64
    assert 0 < rows["none"]["details"]["stereo_keypoints"] <= 64
    assert rows["input-2x"]["details"]["feature_grid"] == [8, 8] and a["settings"]["images"] == 3
    code = warp_cli("stereo", tiny_timm_weights, tmp_path / "c", "--variant", "none", "--keypoints", "8")
    assert code == 0
    c = json.loads((tmp_path / "c" / "results.json").read_text())
    assert set(c["results"][0]["metrics"]) == {"stereo PCK@0.1", "stereo PCK@0.05", "stereo PCK@0.01"}
    # the stereo-only run gives the same stereo numbers as the combined run
    assert all(
        c["results"][0]["metrics"][k] == rows["none"]["metrics"][k] for k in c["results"][0]["metrics"]
    )


def test_missing_image_folder_is_an_error(tmp_path, tiny_timm_weights, capsys):
    assert warp_cli(tmp_path / "nowhere", tiny_timm_weights, tmp_path / "out") == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.shared
@pytest.mark.skipif(
    not (IMAGENET_SAMPLE.is_dir() and DINOV2_WEIGHTS.is_file()),
    reason=f"{IMAGENET_SAMPLE} or the real weights are absent",
)
def test_real_images_and_stereo_match_well(tmp_path, capsys):
    code = main(
        ["-q", "eval", "warp", "--data", str(IMAGENET_SAMPLE), "--limit", "3", "--stereo", "--backbone", DINOV2_NAME,
         "--weights", str(DINOV2_WEIGHTS), "--size", "112", "--device", "cpu", "--variant", "none", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "results.json").read_text())["results"]
    # chance level of PCK@0.1 is about pi * 0.1**2 = 3 %; real features do far better
    assert row["metrics"]["PCK@0.1"] > 30 and row["metrics"]["stereo PCK@0.1"] > 30
