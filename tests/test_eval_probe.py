"""`featlift eval probe`: mIoU arithmetic, the three dataset layouts, CLI end to end, real CamVid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CAMVID, DINOV2_NAME, DINOV2_WEIGHTS, TINY_TIMM_NAME
from PIL import Image

from featlift.cli import main
from featlift.evaluate.probe import FORMATS, IGNORE, confusion_matrix, iou_from_confusion

VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def photos(count: int, size=(48, 64)):
    """Real photos from scikit-image, cropped to `size` at different offsets."""
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(count):
        photo = sources[i % len(sources)]
        y, x = 20 * (i // len(sources)), 30 * (i // len(sources))
        out.append(np.ascontiguousarray(photo[y : y + 4 * size[0] : 4, x : x + 4 * size[1] : 4]))
    return out


def brightness_classes(photo: np.ndarray, classes: int) -> np.ndarray:
    """A label map a probe can learn from the pixels: brightness quantised into `classes` bins."""
    grey = photo.mean(2)
    return np.minimum((grey / 256 * classes).astype(np.uint8), classes - 1)


def write_camvid(root, train=4, val=2):
    for split, count, offset in (("train", train, 0), ("val", val, train)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i, photo in enumerate(photos(offset + count)[offset:]):
            label = brightness_classes(photo, 4) * 3  # classes 0, 3, 6, 9
            label[:2] = 11  # unlabelled rows
            Image.fromarray(photo).save(root / "images" / split / f"f{i:03d}.jpg")
            Image.fromarray(label).save(root / "labels" / split / f"f{i:03d}.png")
    return root


def write_voc(root, train=3, val=2):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = []
    for i, photo in enumerate(photos(train + val)):
        name = f"2007_{i:06d}"
        label = brightness_classes(photo, 3) * 7  # classes 0, 7, 14
        label[:, :2] = 255  # void border
        image = Image.fromarray(label, mode="P")
        image.putpalette(VOC_PALETTE)
        image.save(root / "SegmentationClass" / f"{name}.png")
        Image.fromarray(photo).save(root / "JPEGImages" / f"{name}.jpg")
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:train]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[train:]) + "\n")
    return root


def write_ade(root, train=3, val=2):
    for split, count, offset in (("training", train, 0), ("validation", val, train)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, photo in enumerate(photos(offset + count)[offset:]):
            label = brightness_classes(photo, 3) * 70 + 10  # ADE ids 10, 80, 150 -> classes 9, 79, 149
            label[-2:] = 0  # "other" = ignore
            Image.fromarray(photo).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def probe_cli(data, fmt, weights, out, *extra):
    return main(
        ["-q", "eval", "probe", "--data", str(data), "--format", fmt, "--backbone", TINY_TIMM_NAME,
         "--weights", str(weights), "--size", "32x48", "--device", "cpu", "--epochs", "3", "--out", str(out), *extra]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- metrics


def test_confusion_and_iou_known_answers():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.sum() == 6  # ignored pixels do not count
    iou, present = iou_from_confusion(confusion)
    assert present.tolist() == [True, True, True, False]
    assert iou[:3].tolist() == pytest.approx([1 / 2, 2 / 3, 1.0])
    perfect, _ = iou_from_confusion(confusion_matrix(target.clamp(max=3), target, 4))
    assert perfect[:3].tolist() == [1.0, 1.0, 1.0]


def test_label_mapping_of_each_format(tmp_path):
    camvid = write_camvid(tmp_path / "camvid", 1, 1)
    label = FORMATS["camvid"].read_label(camvid / "labels" / "train" / "f000.png")
    assert label[0, 0] == IGNORE and set(np.unique(label)) <= {0, 3, 6, 9, IGNORE}
    voc = write_voc(tmp_path / "voc", 1, 1)
    label = FORMATS["voc"].read_label(voc / "SegmentationClass" / "2007_000000.png")
    assert label[0, 0] == IGNORE and set(np.unique(label)) <= {0, 7, 14, IGNORE}
    ade = write_ade(tmp_path / "ade", 1, 1)
    label = FORMATS["ade20k"].read_label(ade / "annotations" / "training" / "ADE_training_00000000.png")
    assert label[-1, 0] == IGNORE and set(np.unique(label)) <= {9, 79, 149, IGNORE}


QUADRANT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)]  # CamVid classes 0, 3, 6, 9


def write_quadrants(root, split, name, layout, label_of_colour):
    """A 64x64 PNG of four flat-coloured quadrants (colour indices `layout`, row by row) and its 8x8 label map
    (one label per 8x8 cell of the features, so the logits need no upsampling)."""
    image, label = np.zeros((64, 64, 3), np.uint8), np.zeros((8, 8), np.uint8)
    for index, colour in enumerate(layout):
        r, c = divmod(index, 2)
        image[32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)] = QUADRANT_COLOURS[colour]
        label[4 * r : 4 * (r + 1), 4 * c : 4 * (c + 1)] = label_of_colour[colour]
    for kind, array in (("images", image), ("labels", label)):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / kind / split / f"{name}.png")


def test_known_answer_miou_of_separable_features_and_a_mislabelled_quadrant(tmp_path):
    """The features are the cells' colours, so a linear probe (lr 0.1, 30 epochs) separates the four classes. The val
    image is labelled right except its black quadrant, labelled 6 (blue's class): per class, IoU 1 for 0 and 3,
    16 / 32 for 6 (16 cells right, 16 predicted 9), class 9 absent from the val ground truth and not counted:
    mIoU = (1 + 1 + 1/2) / 3, pixel accuracy 48 / 64."""
    from fake_variants import ColourFeatures

    from featlift.evaluate.probe import ProbeRecipe, evaluate_variant

    right = [0, 3, 6, 9]
    for i, layout in enumerate([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]):
        write_quadrants(tmp_path, "train", f"t{i}", layout, right)
    write_quadrants(tmp_path, "val", "v0", [0, 1, 2, 3], [0, 3, 6, 6])
    fmt = FORMATS["camvid"]
    row = evaluate_variant(
        ColourFeatures(cell=8), fmt, fmt.pairs(tmp_path, "train"), fmt.pairs(tmp_path, "val"), (64, 64),
        ProbeRecipe(epochs=30, lr=0.1),
    )  # fmt: skip
    assert row.metrics == pytest.approx({"mIoU": 100 * (1 + 1 + 1 / 2) / 3, "pixel acc": 100 * 48 / 64})
    assert row.details["per_class_iou"] == pytest.approx({"sky": 100, "road": 100, "sign/symbol": 50})


# ---------------------------------------------------------------------------------------- CLI


def test_cli_camvid_variants(tmp_path, tiny_timm_weights, capsys):
    data = write_camvid(tmp_path / "camvid")
    code = probe_cli(data, "camvid", tiny_timm_weights, tmp_path / "out", "--variant", "none,bilinear:iters=2",
                     "--variant", "input-2x")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert list(rows) == ["none", "bilinear:iters=2", "input-2x"]
    for row in rows.values():
        assert 0 <= row["metrics"]["mIoU"] <= 100 and row["ms_per_image"] > 0
        assert set(row["details"]["per_class_iou"]) <= {"sky", "road", "sign/symbol", "pedestrian"}
    assert rows["bilinear:iters=2"]["details"]["feature_grid"] == [8, 12]
    assert rows["input-2x"]["details"]["feature_grid"] == [4, 6]
    settings = result["settings"]
    assert settings["train_images"] == 4 and settings["val_images"] == 2 and settings["recipe"]["epochs"] == 3
    assert "mIoU" in (tmp_path / "out" / "results.md").read_text()


def test_cli_voc_and_ade20k(tmp_path, tiny_timm_weights, capsys):
    assert (
        probe_cli(write_voc(tmp_path / "voc"), "voc", tiny_timm_weights, tmp_path / "o1", "--variant", "none")
        == 0
    )
    voc = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert set(voc["results"][0]["details"]["per_class_iou"]) <= {"background", "car", "motorbike"}
    ade = write_ade(tmp_path / "ade")
    assert (
        probe_cli(
            ade, "ade20k", tiny_timm_weights, tmp_path / "o2", "--variant", "bilinear", "--limit-val", "1"
        )
        == 0
    )
    result = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert result["settings"]["num_classes"] == 150 and result["settings"]["val_images"] == 1
    assert set(result["results"][0]["details"]["per_class_iou"]) <= {"9", "79", "149"}


def test_layout_errors_name_the_file(tmp_path, tiny_timm_weights, capsys):
    data = write_camvid(tmp_path / "camvid")
    missing = data / "labels" / "val" / "f001.png"
    missing.unlink()
    assert probe_cli(data, "camvid", tiny_timm_weights, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "labels/{train,val}" in err
    voc = write_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    assert probe_cli(voc, "voc", tiny_timm_weights, tmp_path / "out") == 2
    assert "ImageSets/Segmentation/val.txt" in capsys.readouterr().err
    assert probe_cli(tmp_path / "camvid", "ade20k", tiny_timm_weights, tmp_path / "out") == 2
    assert "images/training" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real data


@pytest.mark.shared
@pytest.mark.skipif(
    not (CAMVID.is_dir() and DINOV2_WEIGHTS.is_file()), reason=f"{CAMVID} or the real weights are absent"
)
def test_real_camvid_probe_learns(tmp_path, capsys):
    code = main(
        ["-q", "eval", "probe", "--data", str(CAMVID), "--format", "camvid", "--limit-train", "8", "--limit-val", "3",
         "--backbone", DINOV2_NAME, "--weights", str(DINOV2_WEIGHTS), "--size", "112x154", "--device", "cpu",
         "--variant", "bilinear", "--epochs", "15", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "results.json").read_text())["results"]
    # majority class (road/sky/building) alone gives about 25-30 % pixel accuracy on CamVid
    assert row["metrics"]["pixel acc"] > 60 and row["metrics"]["mIoU"] > 15
