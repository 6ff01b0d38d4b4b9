"""The named probe protocols: metrics by hand, the new dataset layouts, schedules, crop alignment, the cached /
streamed / token paths agreeing, and ``featlift eval probe --protocol`` end to end on tiny fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TIMM_NAME
from fake_variants import ColourFeatures
from PIL import Image
from test_eval_probe import QUADRANT_COLOURS, write_quadrants, write_voc

from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.evaluate.dense_maps import centre_square
from featlift.evaluate.probe import (
    FORMATS,
    PROTOCOLS,
    ProbeConfig,
    evaluate_variant,
    head_logits,
    make_schedule,
    protocol_label,
)
from featlift.evaluate.probe_protocols import ProbeProtocol
from featlift.evaluate.segmentation_metrics import (
    IGNORE,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
    pixel_accuracy,
)
from featlift.upsamplers.base import resize_features


def test_two_class_iou_by_hand():
    """Target (rows) vs prediction on 3x4 pixels, one pixel ignored:

        target  0 0 0 1        pred  0 0 1 1
                0 0 1 1              0 1 1 1
                0 1 1 255            0 0 1 0

    Labelled pixels: 11. Truth 0 (6 pixels): predicted 0 at (0,0) (0,1) (1,0) (2,0) = 4, predicted 1 at (0,2) (1,1)
    = 2. Truth 1 (5 pixels): predicted 1 at (0,3) (1,2) (1,3) (2,2) = 4, predicted 0 at (2,1) = 1.
    Confusion (rows truth, cols pred) [[4, 2], [1, 4]]. IoU0 = 4 / (4 + 2 + 1) = 4/7 (TP, FN, FP),
    IoU1 = 4 / (4 + 1 + 2) = 4/7; mIoU = 4/7; pixel accuracy 8/11."""
    target = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0]])
    confusion = confusion_matrix(pred, target, 2)
    assert confusion.tolist() == [[4, 2], [1, 4]]
    iou, present = iou_from_confusion(confusion)
    assert iou.tolist() == pytest.approx([4 / 7, 4 / 7]) and present.tolist() == [True, True]
    assert mean_iou(confusion) == pytest.approx(100 * 4 / 7)
    assert pixel_accuracy(confusion) == pytest.approx(100 * 8 / 11)
    # a class absent from the truth but predicted does not count in the mean
    three = confusion_matrix(pred, target, 3)
    assert mean_iou(three) == pytest.approx(100 * 4 / 7) and iou_from_confusion(three)[1].tolist() == [
        True,
        True,
        False,
    ]


def test_confusion_refuses_a_class_beyond_the_count():
    with pytest.raises(ValueError, match="class 5: expected 0..2"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 5), 3)


def write_cityscapes(root):
    """One train and one val image; labelIds 7 (road), 26 (car), 33 (bicycle), 0 (unlabelled), 4 (static)."""
    ids = np.array([[7, 7, 26, 26], [33, 0, 4, 7]], np.uint8)
    for split in ("train", "val"):
        (root / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (root / "gtFine" / split / "aachen").mkdir(parents=True)
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(
            root / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png"
        )
        Image.fromarray(ids).save(
            root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
        )
    return root


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    root = write_cityscapes(tmp_path / "cs")
    fmt = FORMATS["cityscapes"]
    (image, label), = fmt.pairs(root, "val")  # fmt: skip
    assert image.name == "aachen_000000_000019_leftImg8bit.png" and label.name.endswith(
        "_gtFine_labelIds.png"
    )
    assert fmt.read_label(label).tolist() == [[0, 0, 13, 13], [18, IGNORE, IGNORE, 0]]
    (root / "gtFine" / "val" / "aachen" / label.name).unlink()
    with pytest.raises(FeatliftError, match="_gtFine_labelIds.png: no such file; expected cityscapes layout"):
        fmt.pairs(root, "val")


def test_cocostuff_coarse_and_fine_ids(tmp_path):
    """stuffthingmaps ids: 0 person -> coarse 9 (person), 2 car -> 11 (vehicle), 156 sky-other -> 23 (sky),
    12 stop sign -> 8 (outdoor), 181 wood -> 24 (solid), 90 (unused) -> 4 (indoor run), 11 (COCO's unused id
    12) -> 8 but not a fine class, 255 unlabelled; fine: 0 -> 0, 2 -> 2, 12 -> 11
    (one unused id before it), 181 -> 170."""
    stored = np.array([[0, 2, 156, 255], [12, 181, 11, 90]], np.uint8)
    for split in ("train2017", "val2017"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "images" / split / "000000000139.jpg")
        Image.fromarray(stored).save(tmp_path / "annotations" / split / "000000000139.png")
    coarse, fine = FORMATS["cocostuff"], FORMATS["cocostuff171"]
    label = tmp_path / "annotations" / "val2017" / "000000000139.png"
    assert coarse.pairs(tmp_path, "val2017") == [
        (tmp_path / "images" / "val2017" / "000000000139.jpg", label)
    ]
    assert coarse.read_label(label).tolist() == [[9, 11, 23, IGNORE], [8, 24, 8, 4]]
    assert fine.read_label(label).tolist() == [[0, 2, 156 - 11, IGNORE], [11, 170, IGNORE, IGNORE]]
    assert coarse.num_classes == 27 and fine.num_classes == 171
    assert len({int(v) for v in coarse.table[:182]}) == 27 and sorted(
        set(fine.table[:182].tolist()) - {IGNORE}
    ) == list(range(171))
    (tmp_path / "curated" / "val2017").mkdir(parents=True)
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("000000000777\n")
    with pytest.raises(FeatliftError, match="000000000777.jpg: no such file"):
        coarse.pairs(tmp_path, "val2017")  # the curated list, when present, is the split


def lrs(protocol: ProbeProtocol, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimizer step of a run under `protocol`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=protocol.lr)
    scheduler, per_iteration = make_schedule(optimizer, protocol, steps_per_epoch)
    out = []
    for _ in range(protocol.epochs):
        for _ in range(steps_per_epoch):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_iteration:
                scheduler.step()
        if not per_iteration:
            scheduler.step()
    return out


def test_schedules_per_epoch_fix_and_jafar_bug():
    """Per epoch (AnyUp's fix): constant within an epoch, cos((e / E) pi) decay. JAFAR's bug (T_max = E epochs,
    stepped each iteration): at iteration E the rate is 0 and at 2E back to lr, whatever the epoch."""
    fixed = PROTOCOLS["jafar"].with_overrides(epochs=4, lr=1.0)
    rates = lrs(fixed, 3)
    assert rates[:3] == [1.0] * 3
    assert rates[3] == pytest.approx((1 + np.cos(np.pi / 4)) / 2) and rates[9] == pytest.approx(
        (1 + np.cos(3 * np.pi / 4)) / 2
    )
    bug = PROTOCOLS["jafar-original"].with_overrides(epochs=4, lr=1.0)
    rates = lrs(bug, 3)
    assert rates[4] == pytest.approx(0, abs=1e-12) and rates[8] == pytest.approx(1.0)
    whole = PROTOCOLS["featlift"].with_overrides(epochs=2, lr=1.0)
    rates = lrs(whole, 3)
    assert rates[3] == pytest.approx(0.5) and min(rates) > 0


def test_centre_crop_of_labels_matches_the_image_crop(tmp_path):
    """A 6x10 label whose columns are their index: the centred 6x6 square holds columns 2..7."""
    label = np.tile(np.arange(10, dtype=np.uint8), (6, 1))
    (tmp_path / "labels" / "val").mkdir(parents=True)
    Image.fromarray(label).save(tmp_path / "labels" / "val" / "a.png")
    assert centre_square(torch.from_numpy(label))[0].tolist() == [2, 3, 4, 5, 6, 7]
    protocol = PROTOCOLS["cpu"].with_overrides(label_size=3)
    out = protocol_label(FORMATS["camvid"], tmp_path / "labels" / "val" / "a.png", protocol)
    assert (
        out.tolist() == [[3, 5, 7]] * 3
    )  # nearest-exact: the centres of 2-column blocks 2-3, 4-5, 6-7 (ids >10 ignore)


def test_logits_of_resized_tokens_equal_logits_of_resized_features():
    torch.manual_seed(0)
    tokens, head = torch.randn(2, 6, 4, 5), torch.nn.Conv2d(6, 3, 1)
    direct = head(resize_features(tokens, (16, 20)))
    assert torch.allclose(head_logits(head, tokens, (16, 20), tokens=True), direct, atol=1e-5)
    assert not torch.allclose(
        head_logits(head, tokens, (16, 20), tokens=True)[..., 1:], direct[..., :-1], atol=1e-3
    )


def quadrant_data(root):
    right = [0, 3, 6, 9]
    for i, layout in enumerate([[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]):
        write_quadrants(root, "train", f"t{i}", layout, right)
    write_quadrants(root, "val", "v0", [3, 2, 1, 0], right)
    fmt = FORMATS["camvid"]
    return fmt, fmt.pairs(root, "train"), fmt.pairs(root, "val")


def quadrant_protocol(**changes) -> ProbeProtocol:
    """The cpu protocol at 64 px with 8x8 labels, a large learning rate and flips, on the colour features."""
    base = PROTOCOLS["cpu"].with_overrides(input_size=64, label_size=8, lr=0.1, epochs=40, flip=True)
    return base.with_overrides(feature_size="native", **changes)


def test_separable_features_give_miou_100_cached_and_streamed(tmp_path):
    """Colour features separate the four quadrant classes perfectly: mIoU 100, pixel accuracy 100, whether the
    training features are cached (both flip views) or recomputed every epoch (cache budget 0)."""
    fmt, train, val = quadrant_data(tmp_path)
    rows = [
        evaluate_variant(
            ColourFeatures(cell=8), fmt, train, val, (64, 64), quadrant_protocol(), cache_mib=mib
        )
        for mib in (100, 0)
    ]
    assert [r.details["features"] for r in rows] == ["cached", "stream"]
    for row in rows:
        assert row.metrics == pytest.approx({"mIoU": 100, "pixel acc": 100})
        assert row.details["classes_present"] == 4 and len(row.details["seconds_per_epoch"]) == 40
    # a mislabelled val quadrant: the hand-computed answer of test_eval_probe's known-answer test, here under a
    # protocol: classes 0, 3 right (IoU 1), class 6 = 16 right of 32 (IoU 1/2), class 9 absent from the truth
    write_quadrants(tmp_path, "val", "v0", [0, 1, 2, 3], [0, 3, 6, 6])
    row = evaluate_variant(
        ColourFeatures(cell=8), fmt, train, fmt.pairs(tmp_path, "val"), (64, 64), quadrant_protocol()
    )
    assert row.metrics == pytest.approx({"mIoU": 100 * (1 + 1 + 1 / 2) / 3, "pixel acc": 100 * 48 / 64})


def test_protocol_names_and_overrides_are_checked():
    with pytest.raises(FeatliftError, match="ProbeConfig.protocol = 'fast'"):
        ProbeConfig(data="x", format="voc", protocol="fast")
    config = ProbeConfig(data="x", format="voc", protocol="jafar", epochs=2)
    assert config.resolved_protocol().name == "jafar(epochs=2)" and config.base_size() == (448, 448)
    assert ProbeConfig(data="x", format="voc", protocol="jafar").resolved_protocol() is PROTOCOLS["jafar"]
    with pytest.raises(FeatliftError, match="schedule 'cosine'"):
        ProbeProtocol("x", 224, "crop", 224, "label", 1, 0.1, 0, 1, "cosine", False, False)


def test_cli_protocol_cpu_on_voc_records_every_setting(tmp_path, tiny_timm_weights, capsys):
    data = write_voc(tmp_path / "voc", train=3, val=2)
    code = main(
        ["-q", "eval", "probe", "--data", str(data), "--format", "voc", "--protocol", "cpu", "--backbone",
         TINY_TIMM_NAME, "--weights", str(tiny_timm_weights), "--device", "cpu", "--epochs", "2",
         "--variant", "none,bilinear", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "protocol cpu(epochs=2)" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    settings = results["settings"]
    assert settings["protocol"] == "cpu(epochs=2)" and settings["base_size"] == [224, 224]
    recipe = settings["recipe"]
    assert (recipe["input_size"], recipe["label_size"], recipe["feature_size"], recipe["schedule"]) == (
        224, 224, "grid4x", "per-epoch",
    )  # fmt: skip
    rows = {row["variant"]: row for row in results["results"]}
    grid = 4 * (224 // 16)
    for name in ("none", "bilinear"):
        assert (
            rows[name]["details"]["feature_grid"] == [grid, grid]
            and rows[name]["details"]["features"] == "tokens"
        )
    # none and bilinear both become the tokens resized to 4x the grid: the same probe, the same numbers
    assert rows["none"]["metrics"] == pytest.approx(rows["bilinear"]["metrics"], abs=1e-6)


assert QUADRANT_COLOURS  # the fixture helpers come from test_eval_probe
