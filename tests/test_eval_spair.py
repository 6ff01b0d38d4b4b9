"""`featlift eval spair`: SPair-71k layout, keypoint transfer, PCK, CLI end to end (tiny and real ViT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, TINY_TIMM_NAME
from PIL import Image
from skimage import data as skdata

from featlift import FeatliftError
from featlift.cli import main
from featlift.evaluate.spair import load_spair_pairs, pck_correct, transfer_keypoints

CROP = (60, 30, 411, 280)  # (x1, y1, x2, y2) of the target crop in chelsea (451x300)


def _write_pair(
    root: Path,
    split: str,
    pair_id: int,
    category: str,
    src: str,
    trg: str,
    src_kps,
    trg_kps,
    src_box,
    trg_box,
):
    """One pair JSON exactly as the SPair-71k release writes it (file name and keys)."""
    sizes = {name: Image.open(root / "JPEGImages" / category / f"{name}.jpg").size for name in (src, trg)}
    record = {
        "pair_id": pair_id,
        "src_imname": f"{src}.jpg",
        "trg_imname": f"{trg}.jpg",
        "src_imsize": [*sizes[src], 3],
        "trg_imsize": [*sizes[trg], 3],
        "src_bndbox": list(src_box),
        "trg_bndbox": list(trg_box),
        "category": category,
        "src_pose": "Frontal",
        "trg_pose": "Frontal",
        "src_kps": [list(map(int, p)) for p in src_kps],
        "trg_kps": [list(map(int, p)) for p in trg_kps],
        "mirror": 0,
        "vp_var": 0,
        "sc_var": 0,
        "truncn": 0,
        "occln": 0,
        "kps_ids": [str(i) for i in range(len(src_kps))],
        "viewpoint_variation": 0,
        "scale_variation": 0,
        "truncation": 0,
        "occlusion": 0,
    }
    folder = root / "PairAnnotation" / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{pair_id:06d}-{src}-{trg}:{category}.json").write_text(json.dumps(record))


def write_spair(root: Path) -> Path:
    """A tiny SPair-71k tree from real photos: 'cat' (chelsea and a crop of it) and 'person' (astronaut, flipped)."""
    chelsea = Image.fromarray(skdata.chelsea())
    astronaut = Image.fromarray(skdata.astronaut()).resize((256, 256))
    images = {
        ("cat", "2009_000001"): chelsea,
        ("cat", "2009_000002"): chelsea.crop(CROP),
        ("person", "2009_000003"): astronaut,
        ("person", "2009_000004"): astronaut.transpose(Image.FLIP_LEFT_RIGHT),
    }
    for (category, name), image in images.items():
        folder = root / "JPEGImages" / category
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}.jpg", quality=95)
        ann = root / "ImageAnnotation" / category
        ann.mkdir(parents=True, exist_ok=True)
        (ann / f"{name}.json").write_text(
            json.dumps({"filename": f"{name}.jpg", "category": category, "image_width": image.width,
                        "image_height": image.height, "bndbox": [0, 0, image.width, image.height], "kps": {}})
        )  # fmt: skip
    cat_src = np.array([[x, y] for x in (130, 180, 230, 280, 330) for y in (70, 120, 170, 220, 260)])
    cat_trg = cat_src - np.array(CROP[:2])
    cat_box_src, cat_box_trg = (100, 30, 420, 300), (40, 0, 351, 250)
    person_src = np.array([[x, y] for x in (90, 128, 160) for y in (40, 90, 150)])
    person_trg = np.stack([255 - person_src[:, 0], person_src[:, 1]], 1)
    for split in ("test", "trn"):
        _write_pair(
            root, split, 1, "cat", "2009_000001", "2009_000002", cat_src, cat_trg, cat_box_src, cat_box_trg
        )
        _write_pair(
            root, split, 2, "cat", "2009_000002", "2009_000001", cat_trg, cat_src, cat_box_trg, cat_box_src
        )
        _write_pair(
            root,
            split,
            3,
            "person",
            "2009_000003",
            "2009_000004",
            person_src,
            person_trg,
            (0, 0, 256, 256),
            (0, 0, 256, 256),
        )
    return root


def test_perfect_matches_have_pck_one_and_known_misses():
    truth = np.array([[10.0, 10.0], [50.0, 40.0]])
    assert all(ok.all() for ok in pck_correct(truth, truth, (0, 0, 100, 60)).values())
    # box max side 100: distance 6 passes at alpha 0.1 (10 px), fails at 0.05 (5 px) and 0.01 (1 px)
    result = pck_correct(truth + [6.0, 0.0], truth, (0, 0, 100, 60))
    assert result[0.1].all() and not result[0.05].any() and not result[0.01].any()


def test_match_keypoints_recovers_identity_and_flip_on_distinct_features():
    torch.manual_seed(0)
    features = torch.randn(32, 8, 12)  # distinct cells: the nearest neighbour of a cell is itself
    size = (240, 160)  # (W, H): 20 px per cell
    cells = np.array([[c * 20 + 9.5, r * 20 + 9.5] for r in range(8) for c in range(12)])  # cell centres
    assert np.allclose(transfer_keypoints(features, features, cells, size, size), cells)
    flipped = features.flip(-1)
    predicted = transfer_keypoints(features, flipped, cells, size, size)
    assert np.allclose(predicted[:, 0], 239 - cells[:, 0]) and np.allclose(predicted[:, 1], cells[:, 1])
    # another target size: centres map to the target's own pixel grid
    predicted = transfer_keypoints(features, features, cells, size, (120, 80))
    assert np.allclose(predicted, (cells + 0.5) / 2 - 0.5)


def test_loader_samples_deterministically_and_checks_layout(tmp_path):
    root = write_spair(tmp_path / "SPair-71k")
    pairs = load_spair_pairs(root, "test")
    assert [p.category for p in pairs] == ["cat", "cat", "person"]
    assert pairs[0].source_keypoints.shape == (25, 2) and pairs[0].target_box == (40.0, 0.0, 351.0, 250.0)
    one = load_spair_pairs(root, "test", pairs_per_category=1, seed=3)
    assert [p.name for p in one] == [
        p.name for p in load_spair_pairs(root, "test", pairs_per_category=1, seed=3)
    ]
    assert len(one) == 2 and {p.category for p in one} == {"cat", "person"}
    assert len(load_spair_pairs(root, "test", categories=["person"])) == 1

    with pytest.raises(FeatliftError, match=r"PairAnnotation/val.*expected layout"):
        load_spair_pairs(root, "val")
    (root / "JPEGImages" / "person" / "2009_000004.jpg").unlink()
    with pytest.raises(FeatliftError, match=r"2009_000004\.jpg: no such file"):
        load_spair_pairs(root, "test")
    bad = root / "PairAnnotation" / "trn" / "000009-a-b:cat.json"
    bad.write_text(json.dumps({"src_imname": "a.jpg"}))
    with pytest.raises(FeatliftError, match=r"000009-a-b:cat\.json: missing key\(s\) trg_imname"):
        load_spair_pairs(root, "trn", categories=["cat"])


def test_the_pairs_drawn_for_a_category_do_not_depend_on_the_other_categories(tmp_path):
    root = write_spair(tmp_path / "SPair-71k")
    for pair_id in range(4, 10):  # 7 person pairs, 2 cat pairs: both categories are sampled
        _write_pair(root, "test", pair_id, "person", "2009_000003", "2009_000004",
                    [[10, 10]], [[245, 10]], (0, 0, 256, 256), (0, 0, 256, 256))  # fmt: skip
    for seed in range(5):
        alone = load_spair_pairs(root, "test", pairs_per_category=1, categories=["person"], seed=seed)
        together = load_spair_pairs(root, "test", pairs_per_category=1, seed=seed)
        assert [p.name for p in alone] == [p.name for p in together if p.category == "person"]
    drawn = {load_spair_pairs(root, "test", 1, ["person"], seed=seed)[0].name for seed in range(5)}
    assert len(drawn) > 1  # the seed does choose the sample


def test_known_answer_pck_per_category_and_its_mean(tmp_path):
    """Features that code each cell's position match every keypoint to the centre of its own cell in the
    target. 72x72 images on an 8x8 grid: 9 px cells with centres at 9c + 4. 'cat' pairs an image with itself,
    keypoints at cell centres: error 0, PCK 100 at every alpha. 'dog' has the true target keypoints 6 px to
    the right of the source ones, box side 100: within 10 px (alpha 0.1), not 5 or 1: PCK 100, 0, 0. The
    headline is the mean over categories: 100, 50, 50."""
    from fake_variants import PositionFeatures

    from featlift.evaluate.spair import evaluate_variant

    root = tmp_path / "SPair-71k"
    for category in ("cat", "dog"):
        (root / "JPEGImages" / category).mkdir(parents=True)
        Image.fromarray(np.zeros((72, 72, 3), np.uint8)).save(root / "JPEGImages" / category / "a.jpg")
    centres = [[9 * c + 4, 9 * r + 4] for r in (0, 3, 7) for c in (1, 5)]
    box = (0, 0, 100, 60)
    _write_pair(root, "test", 1, "cat", "a", "a", centres, centres, box, box)
    _write_pair(root, "test", 2, "dog", "a", "a", centres, [[x + 6, y] for x, y in centres], box, box)
    row = evaluate_variant(PositionFeatures(cell=8), load_spair_pairs(root, "test"), (64, 64))
    assert row.metrics == {"PCK@0.1": 100.0, "PCK@0.05": 50.0, "PCK@0.01": 50.0}
    assert row.details["per_category"]["dog"] == {
        "PCK@0.1": 100.0, "PCK@0.05": 0.0, "PCK@0.01": 0.0, "pairs": 1, "keypoints": 6
    }  # fmt: skip


def spair_cli(root, weights, out, *extra, backbone=TINY_TIMM_NAME):
    return main(["-q", "eval", "spair", "--data", str(root), "--backbone", backbone, "--weights", str(weights),
                 "--device", "cpu", "--out", str(out), *extra])  # fmt: skip


def test_cli_end_to_end_tiny_vit(tmp_path, tiny_timm_weights, capsys):
    root = write_spair(tmp_path / "SPair-71k")
    out = tmp_path / "out"
    code = spair_cli(
        root, tiny_timm_weights, out, "--size", "64", "--variant", "none,bilinear", "--variant", "input-2x"
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    rows = {row["variant"]: row for row in result["results"]}
    assert list(rows) == ["none", "bilinear", "input-2x"]
    for row in rows.values():
        assert set(row["metrics"]) == {"PCK@0.1", "PCK@0.05", "PCK@0.01"}
        assert all(0 <= v <= 100 for v in row["metrics"].values())
        assert row["metrics"]["PCK@0.01"] <= row["metrics"]["PCK@0.05"] <= row["metrics"]["PCK@0.1"]
        per_category = row["details"]["per_category"]
        assert per_category["cat"]["pairs"] == 2 and per_category["cat"]["keypoints"] == 50
        mean = np.mean([per_category[c]["PCK@0.1"] for c in ("cat", "person")])
        assert row["metrics"]["PCK@0.1"] == pytest.approx(mean)
        assert row["ms_per_image"] > 0
    assert result["settings"]["pairs"] == 3 and result["settings"]["variants"][2]["input_size"] == [128, 128]
    markdown = (out / "results.md").read_text()
    assert "PCK@0.1 per category" in markdown and "| person |" in markdown
    assert "`input-2x`" in capsys.readouterr().out


def test_cli_layout_errors_exit_2(tmp_path, tiny_timm_weights, capsys):
    root = tmp_path / "SPair-71k"
    (root / "JPEGImages").mkdir(parents=True)
    assert spair_cli(root, tiny_timm_weights, tmp_path / "out", "--variant", "none") == 2
    err = capsys.readouterr().err
    assert "PairAnnotation/test: no such folder" in err and "JPEGImages/<category>" in err


@pytest.mark.skipif(not DINOV2_WEIGHTS.is_file(), reason=f"real weights not found at {DINOV2_WEIGHTS}")
def test_real_dinov2_finds_crop_correspondences(tmp_path, capsys):
    """Real DINOv2 on a real photo and a crop of it: nearly every keypoint lands within 0.1 of the box."""
    root = write_spair(tmp_path / "SPair-71k")
    out = tmp_path / "out"
    code = spair_cli(root, DINOV2_WEIGHTS, out, "--size", "224", "--variant", "none,bilinear", "--categories", "cat",
                     backbone=DINOV2_NAME)  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    for row in rows.values():
        assert row["metrics"]["PCK@0.1"] >= 80, row["metrics"]
