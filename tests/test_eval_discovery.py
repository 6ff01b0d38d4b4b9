"""`featlift eval discovery`: TokenCut's normalised cut, CorLoc, VOC/COCO layouts, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, TINY_TIMM_NAME
from PIL import Image
from skimage import data as skdata

from featlift import FeatliftError
from featlift.cli import main
from featlift.evaluate.discovery import (
    box_iou,
    check_graph_size,
    grid_box_to_pixels,
    is_correct_localization,
    load_coco,
    load_voc,
    ncut,
    second_eigenvector,
)

SPORTS_CAR = IMAGENET_SAMPLE / "n04285008_sports_car.JPEG"
SPORTS_CAR_BOX = (45, 60, 525, 255)  # hand-drawn box of the car body (563x302 image), reflection excluded


def two_blob_features(height=16, width=16, blob=(4, 5, 10, 12), channels=16, seed=0) -> torch.Tensor:
    """Background cells along one axis, a rectangular blob (rows 4:10, cols 5:12) along an orthogonal one, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    background, foreground = torch.eye(channels)[:2, :, None, None]
    features = background + 0.1 * torch.randn(channels, height, width, generator=generator)
    r0, c0, r1, c1 = blob
    features[:, r0:r1, c0:c1] = foreground + 0.1 * torch.randn(
        channels, r1 - r0, c1 - c0, generator=generator
    )
    return features


def test_ncut_finds_the_blob_and_both_solvers_agree():
    features = two_blob_features()
    dense = ncut(features, dense_limit=10**6)
    lanczos = ncut(features, dense_limit=0)
    for result in (dense, lanczos):
        assert result.box == (5, 4, 12, 10)  # (x1, y1, x2, y2) in cells, exclusive
        assert result.mask.sum() == 6 * 7 and result.mask[4:10, 5:12].all()
        assert 4 <= result.seed[0] < 10 and 5 <= result.seed[1] < 12
    a, b = dense.eigenvector.ravel(), lanczos.eigenvector.ravel()
    assert abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9999


def test_second_eigenvector_solves_the_generalised_problem():
    rng = np.random.default_rng(0)
    weights = (rng.random((60, 60)) > 0.6).astype(np.float64)
    weights = np.maximum(weights, weights.T) + 1e-5
    degree = np.diag(weights.sum(1))
    x = second_eigenvector(weights, dense_limit=0)
    laplacian = degree - weights
    lam = (x @ laplacian @ x) / (x @ degree @ x)
    assert np.allclose(laplacian @ x, lam * degree @ x, atol=1e-6 * np.abs(degree @ x).max())
    assert (
        abs(x @ degree @ np.ones(60)) < 1e-6 * np.linalg.norm(x) * degree.sum()
    )  # D-orthogonal to the trivial one


def test_iou_corloc_and_box_scaling():
    truth = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], dtype=float)
    assert box_iou((0, 0, 10, 10), truth).tolist() == [1.0, 0.0]
    assert box_iou((5, 0, 15, 10), truth)[0] == pytest.approx(50 / 150)
    assert is_correct_localization((20, 20, 40, 30), truth)  # IoU exactly 0.5 with the second box
    assert not is_correct_localization((20, 20, 40, 29), truth)
    assert not is_correct_localization((0, 0, 1, 1), np.zeros((0, 4)))
    # 16x16 cells over a 451x300 image, cells 5..11 x 4..9 -> pixels, clipped to the image
    assert grid_box_to_pixels((5, 4, 12, 10), (16, 16), (448, 320)).tolist() == [140, 80, 336, 200]
    assert grid_box_to_pixels((0, 0, 16, 16), (16, 16), (451, 300)).tolist() == [0, 0, 451, 300]
    with pytest.raises(FeatliftError, match="16384-node graph, more than --max-nodes 8192"):
        check_graph_size((128, 128))


VOC_XML = """<annotation>
  <folder>VOC2007</folder>
  <filename>{name}.jpg</filename>
  <source><database>The VOC2007 Database</database><annotation>PASCAL VOC2007</annotation></source>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  <segmented>0</segmented>
  {objects}
</annotation>
"""
VOC_OBJECT = """<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root: Path, extra: dict[str, tuple[Image.Image, list]] | None = None) -> Path:
    """VOCdevkit/VOC2007 with real photos and hand-drawn 1-based inclusive boxes, as in the VOC release."""
    images = {
        "000005": (Image.fromarray(skdata.coffee()), [("cup", 76, 16, 480, 390, 0)]),
        "000007": (
            Image.fromarray(skdata.chelsea()),
            [("cat", 100, 20, 420, 300, 0), ("cat", 1, 1, 40, 40, 1)],
        ),
        "000009": (Image.fromarray(skdata.astronaut()), [("person", 30, 1, 450, 512, 0)]),
        **(extra or {}),
    }
    voc = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    for name, (image, objects) in images.items():
        image.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        body = "\n  ".join(
            VOC_OBJECT.format(label=label, x1=x1, y1=y1, x2=x2, y2=y2, difficult=difficult)
            for label, x1, y1, x2, y2, difficult in objects
        )
        (voc / "Annotations" / f"{name}.xml").write_text(
            VOC_XML.format(name=name, width=image.width, height=image.height, objects=body)
        )
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{n}\n" for n in images))
    return root


def write_coco(root: Path) -> Path:
    """COCO train2014-style images, an instances JSON (xywh boxes, one crowd box) and TokenCut's 20k list."""
    (root / "images" / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    photos = {1: skdata.coffee(), 2: skdata.chelsea(), 3: skdata.astronaut()}
    images, annotations = [], []
    for image_id, array in photos.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(array).save(root / "images" / "train2014" / name)
        images.append({"id": image_id, "file_name": name, "width": array.shape[1], "height": array.shape[0]})
    annotations.append(
        {"id": 10, "image_id": 1, "category_id": 47, "bbox": [75, 15, 405, 375], "iscrowd": 0, "area": 1.0}
    )
    annotations.append(
        {"id": 11, "image_id": 2, "category_id": 17, "bbox": [0, 0, 451, 300], "iscrowd": 1, "area": 1.0}
    )
    annotations.append(
        {"id": 12, "image_id": 3, "category_id": 1, "bbox": [29, 0, 421, 512], "iscrowd": 0, "area": 1.0}
    )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}
    (root / "annotations" / "instances_train2014_sel20k.json").write_text(json.dumps(coco))
    (root / "coco_20k_filenames.txt").write_text(
        "train2014/COCO_train2014_000000000001.jpg\ntrain2014/COCO_train2014_000000000002.jpg\n"
    )
    return root


def test_voc_and_coco_loaders(tmp_path):
    items = load_voc(write_voc(tmp_path / "VOC2007"))
    assert [i.path.name for i in items] == ["000005.jpg", "000007.jpg", "000009.jpg"]
    assert items[1].boxes.tolist() == [[99, 19, 420, 300], [0, 0, 40, 40]]  # difficult kept, xmin/ymin - 1
    assert len(load_voc(tmp_path / "VOC2007", limit=2)) == 2
    coco = load_coco(write_coco(tmp_path / "COCO"))
    # image 3 is not in the 20k list; image 2 has only a crowd box and is skipped
    assert [i.path.name for i in coco] == ["COCO_train2014_000000000001.jpg"]
    assert coco[0].boxes.tolist() == [[75, 15, 480, 390]]


def test_missing_annotation_names_the_file(tmp_path):
    root = write_voc(tmp_path / "VOC2007")
    (root / "VOCdevkit" / "VOC2007" / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FeatliftError, match=r"Annotations/000007\.xml: no such file; expected layout"):
        load_voc(root)
    with pytest.raises(FeatliftError, match=r"ImageSets/Main/test\.txt: no such file"):
        load_voc(root, split="test")
    with pytest.raises(FeatliftError, match=r"annotations/instances_train2014_sel20k\.json: no such file"):
        load_coco(tmp_path)


def discovery_cli(root, weights, out, *extra, backbone=TINY_TIMM_NAME):
    return main(["-q", "eval", "discovery", "--data", str(root), "--backbone", backbone, "--weights", str(weights),
                 "--device", "cpu", "--out", str(out), *extra])  # fmt: skip


def test_cli_voc_and_coco_tiny_vit(tmp_path, tiny_timm_weights, capsys):
    voc = write_voc(tmp_path / "VOC2007")
    out = tmp_path / "voc"
    code = discovery_cli(
        voc, tiny_timm_weights, out, "--format", "voc07", "--size", "64", "--variant", "none,bilinear:iters=2"
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    rows = {row["variant"]: row for row in result["results"]}
    assert list(rows) == ["none", "bilinear:iters=2"]
    assert (
        rows["none"]["details"]["graph_nodes"] == 16
        and rows["bilinear:iters=2"]["details"]["graph_nodes"] == 256
    )
    for row in rows.values():
        assert row["details"]["images"] == 3 and len(row["details"]["boxes"]) == 3
        assert row["metrics"]["CorLoc"] == pytest.approx(100 * row["details"]["hits"] / 3)
    assert result["settings"]["tau"] == 0.2 and result["task"] == "discovery (voc07)"

    coco = write_coco(tmp_path / "COCO")
    code = discovery_cli(
        coco, tiny_timm_weights, tmp_path / "coco", "--format", "coco20k", "--size", "64", "--variant", "none"
    )
    assert code == 0, capsys.readouterr().err
    assert (
        json.loads((tmp_path / "coco" / "results.json").read_text())["results"][0]["details"]["images"] == 1
    )


def test_cli_refuses_huge_graphs_and_bad_layouts(tmp_path, tiny_timm_weights, capsys):
    voc = write_voc(tmp_path / "VOC2007")
    code = discovery_cli(voc, tiny_timm_weights, tmp_path / "o", "--format", "voc12", "--size", "64",
                         "--variant", "bilinear:iters=2", "--max-nodes", "100")  # fmt: skip
    assert (
        code == 2
        and "bilinear:iters=2: a 16x16 feature map gives a 256-node graph" in capsys.readouterr().err
    )
    (voc / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000009.jpg").unlink()
    assert (
        discovery_cli(voc, tiny_timm_weights, tmp_path / "o", "--format", "voc07", "--variant", "none") == 2
    )
    assert "JPEGImages/000009.jpg: no such file" in capsys.readouterr().err


@pytest.mark.skipif(
    not (DINOV2_WEIGHTS.is_file() and SPORTS_CAR.is_file()), reason="real weights or imagenet-sample absent"
)
def test_real_dinov2_discovers_the_car(tmp_path, capsys):
    """Real DINOv2 + TokenCut on a real photo with one obvious object: the box overlaps the car (IoU >= 0.5)."""
    car = Image.open(SPORTS_CAR).convert("RGB")
    x1, y1, x2, y2 = SPORTS_CAR_BOX
    voc = tmp_path / "VOC2007"
    write_voc(voc, {"000011": (car, [("car", x1 + 1, y1 + 1, x2, y2, 0)])})
    (voc / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("000011\n")
    out = tmp_path / "out"
    code = discovery_cli(
        voc, DINOV2_WEIGHTS, out, "--format", "voc07", "--variant", "none,bilinear", backbone=DINOV2_NAME
    )
    assert code == 0, capsys.readouterr().err
    for row in json.loads((out / "results.json").read_text())["results"]:
        box = row["details"]["boxes"]["000011.jpg"]
        assert box_iou(box, np.array([SPORTS_CAR_BOX]))[0] >= 0.5, (row["variant"], box)
        assert row["metrics"]["CorLoc"] == 100.0
