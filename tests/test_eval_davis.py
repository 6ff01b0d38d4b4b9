"""`featlift eval davis`: DAVIS toolkit metrics, label propagation, layout checks, CLI end to end, real data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DAVIS, DINOV2_NAME, DINOV2_WEIGHTS, TINY_TIMM_NAME
from PIL import Image

from featlift.cli import main
from featlift.evaluate.davis import (
    LabelPropagation,
    boundary_f_measure,
    decode,
    labels_to_grid,
    norm_mask,
    read_annotation,
    region_similarity,
    seg2bmap,
)

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]


def write_davis(root, year=2016, frames=4, size=(96, 160), step=6, sequences=("coffee", "cat")):
    """A DAVIS-layout dataset from real skimage photos: a camera panning right over a static scene, objects as
    boxes fixed in the scene (so they move left in the frames)."""
    from skimage import data

    photos = {"coffee": data.coffee(), "cat": data.chelsea()}
    h, w = size
    for name in sequences:
        photo = photos[name]
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        world = np.zeros(photo.shape[:2], np.uint8)
        world[30:80, 60:120] = 1
        if year == 2017:
            world[20:60, 130:170] = 2
            world[19:21, 130:170] = 255  # void band, as DAVIS 2017 has around some objects
        for t in range(frames):
            x = 20 + step * t
            Image.fromarray(photo[10 : 10 + h, x : x + w]).save(
                root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg"
            )
            crop = world[10 : 10 + h, x : x + w]
            if year == 2016:
                Image.fromarray((crop > 0).astype(np.uint8) * 255, mode="L").save(
                    root / "Annotations" / "480p" / name / f"{t:05d}.png"
                )
            else:
                image = Image.fromarray(crop, mode="P")
                image.putpalette(PALETTE)
                image.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
    return root


# ---------------------------------------------------------------------------------------- metrics


def test_region_similarity_known_answers():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros_like(a)
    b[4:8, 2:6] = True  # overlaps a on 2 of its 4 rows
    assert region_similarity(a, a) == 1.0
    assert region_similarity(a, ~a) == 0.0
    assert region_similarity(a, b) == pytest.approx(8 / 24)
    assert region_similarity(np.zeros_like(a), np.zeros_like(a)) == 1.0
    void = np.zeros_like(a)
    void[6:8] = True  # the part of b outside a is void -> b counts as a's top half
    assert region_similarity(a, b, void) == pytest.approx(8 / 16)


def test_boundary_f_measure_tolerance():
    # 100 x 100 image: tolerance ceil(0.008 * 141.4) = 2 pixels
    stripe = np.zeros((100, 100), bool)
    stripe[:, 20:60] = True
    near = np.roll(stripe, 1, axis=1)
    far = np.roll(stripe, 10, axis=1)
    assert boundary_f_measure(stripe, stripe) == 1.0
    assert boundary_f_measure(stripe, near) == 1.0
    assert boundary_f_measure(stripe, far) == 0.0
    assert boundary_f_measure(stripe, np.zeros_like(stripe)) == 0.0
    assert boundary_f_measure(np.zeros_like(stripe), np.zeros_like(stripe)) == 1.0
    # the boundary of a full-height stripe: the column left of it and its own last column
    assert sorted(set(np.nonzero(seg2bmap(stripe))[1])) == [19, 59]


def test_boundary_f_half_matching():
    # prediction has the gt's two boundary columns plus a spurious third one far away: precision 2/3, recall 1
    gt = np.zeros((100, 100), bool)
    gt[:, 20:60] = True
    pred = gt.copy()
    pred[:, 80:] = True  # adds boundary at column 79 (and the image edge is not a boundary)
    assert boundary_f_measure(gt, pred) == pytest.approx(2 * (2 / 3) / (5 / 3))


# ---------------------------------------------------------------------------------------- propagation


def test_propagation_of_a_matching_sequence_copies_labels():
    h, w = 6, 7
    features = torch.eye(h * w).reshape(
        h * w, h, w
    )  # every cell has its own feature, the same in every frame
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 3, size=(h, w)))
    one_hot = labels_to_grid(labels.numpy(), (h, w), 3)
    soft = LabelPropagation(topk=5, temperature=0.1, radius=2)(
        features, [features, features], [one_hot, one_hot]
    )
    assert soft.shape == (3, h, w)
    assert torch.allclose(soft.sum(0), torch.ones(h, w))
    assert torch.equal(soft.argmax(0), labels)
    assert torch.equal(torch.from_numpy(decode(soft, (h, w))), labels)


def test_propagation_follows_a_shift_and_respects_the_radius():
    h, w = 5, 8
    base = torch.eye(h * w).reshape(h * w, h, w)
    shifted = torch.roll(base, 1, dims=2)  # the scene moved one cell right
    labels = torch.zeros(2, h, w)
    labels[0] = 1
    labels[:, :, 3] = torch.tensor([0.0, 1.0])[:, None]
    out = LabelPropagation(radius=1)(shifted, [base], [labels])
    assert torch.equal(out.argmax(0)[:, 4], torch.ones(h, dtype=torch.long))
    assert out.argmax(0)[:, [0, 1, 2, 3, 5, 6, 7]].sum() == 0
    # radius 0 means unrestricted; a far target that only matches outside the radius gets no exact match
    far = torch.roll(base, 4, dims=2)
    restricted = LabelPropagation(radius=1)(far, [base], [labels])
    free = LabelPropagation(radius=0)(far, [base], [labels])
    assert free.argmax(0)[:, 7].eq(1).all() and restricted.argmax(0)[:, 7].eq(0).all()


def test_norm_mask_rescales_channels():
    soft = torch.tensor([[[0.2, 0.4]], [[0.0, 0.1]]])
    assert torch.allclose(norm_mask(soft), torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]]))


# ---------------------------------------------------------------------------------------- dataset + CLI


def davis_cli(data, weights, out, *extra):
    return main(
        ["-q", "eval", "davis", "--data", str(data), "--backbone", TINY_TIMM_NAME, "--weights", str(weights),
         "--size", "64x96", "--device", "cpu", "--out", str(out), *extra]
    )  # fmt: skip


def test_cli_2016_all_variants(tmp_path, tiny_timm_weights, capsys):
    from featlift import create_backbone
    from featlift.checkpoint import save_checkpoint
    from featlift.upsamplers import LiFT

    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size, residual=True), backbone)
    lift = f"lift:{tmp_path / 'ckpt'}:iters=2"
    data = write_davis(tmp_path / "DAVIS")
    code = davis_cli(data, tiny_timm_weights, tmp_path / "out", "--variant", "none,bilinear", "--variant", "input-2x",
                     "--variant", "bilinear:iters=2", "--variant", lift, "--save-masks")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert list(rows) == ["none", "bilinear", "input-2x", "bilinear:iters=2", lift]
    assert rows[lift]["details"]["feature_grid"] == [16, 24] and rows[lift]["details"]["radius"] == 48
    for row in rows.values():
        assert set(row["metrics"]) == {"J&F", "J", "F"} and 0 <= row["metrics"]["J&F"] <= 100
        assert set(row["details"]["per_sequence"]) == {"cat", "coffee"} and row["ms_per_image"] > 0
    assert rows["none"]["details"]["feature_grid"] == [4, 6] and rows["none"]["details"]["radius"] == 12
    assert (
        rows["input-2x"]["details"]["feature_grid"] == [8, 12] and rows["input-2x"]["details"]["radius"] == 24
    )
    assert rows["bilinear:iters=2"]["details"]["radius"] == 48
    settings = result["settings"]
    assert settings["norm_mask"] is False and "argmax" in settings["decode"] and settings["frames"] == 8
    assert {v["spec"]: v["input_size"] for v in settings["variants"]}["input-2x"] == [128, 192]
    masks = sorted((tmp_path / "out" / "masks" / "input-2x" / "cat").glob("*.png"))
    assert len(masks) == 4 and Image.open(masks[1]).size == (160, 96)
    assert "J&F per sequence" in (tmp_path / "out" / "results.md").read_text()


def test_cli_2017_objects_void_and_norm_mask(tmp_path, tiny_timm_weights, capsys):
    data = write_davis(tmp_path / "DAVIS", year=2017, sequences=("coffee",))
    (data / "ImageSets" / "2017").mkdir(parents=True)
    (data / "ImageSets" / "2017" / "val.txt").write_text("coffee\n")
    assert read_annotation(data / "Annotations" / "480p" / "coffee" / "00000.png", 2017).max() == 255
    assert set(np.unique(read_annotation(data / "Annotations" / "480p" / "coffee" / "00000.png", 2016))) == {
        0,
        1,
    }
    code = davis_cli(
        data, tiny_timm_weights, tmp_path / "out", "--year", "2017", "--variant", "none", "--norm-mask"
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["results"][0]["details"]["per_sequence"]["coffee"]["objects"] == 2
    assert result["settings"]["norm_mask"] is True and "norm_mask" in result["settings"]["decode"]


def test_layout_errors_name_the_missing_path(tmp_path, tiny_timm_weights, capsys):
    data = write_davis(tmp_path / "DAVIS", sequences=("coffee",))
    missing = data / "Annotations" / "480p" / "coffee" / "00002.png"
    missing.unlink()
    assert davis_cli(data, tiny_timm_weights, tmp_path / "out", "--variant", "none") == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Annotations/480p/<sequence>/<frame>.png" in err
    assert davis_cli(data, tiny_timm_weights, tmp_path / "out", "--sequences", "nope") == 2
    assert "JPEGImages/480p/nope" in capsys.readouterr().err
    shutil.rmtree(data / "Annotations")
    assert davis_cli(data, tiny_timm_weights, tmp_path / "out", "--variant", "none") == 2
    err = capsys.readouterr().err
    assert str(data / "Annotations" / "480p") in err and "expected DAVIS layout" in err


def test_known_answer_j_and_f_of_a_whole_sequence(tmp_path):
    """Four identical 64x64 frames, a white full-height stripe (columns 16..39) on black; the features are the
    mean colours of 8x8 cells, so the propagation carries the first mask unchanged (the stripe's edges fall on
    cell edges, where the bilinear decode switches). The scored frames are 1 and 2 (first and last excluded):

    - frame 1's ground truth is the stripe: J = F = 1;
    - frame 2's is the stripe 2 px narrower (columns 16..37): J = 22 / 24. The boundary of a full-height
      stripe is the column left of it and its own last column (64 pixels each): 15 and 39 predicted, 15 and 37
      true; the tolerance is ceil(0.008 * 90.5) = 1 px, so only column 15 matches: precision = recall = 1/2,
      F = 1/2.

    J = (1 + 22/24) / 2, F = (1 + 1/2) / 2. The last frame's ground truth is empty: counted, it would lower J.
    """
    from fake_variants import ColourFeatures

    from featlift.evaluate.davis import evaluate_variant, list_sequences

    frames, annotations = tmp_path / "JPEGImages" / "480p" / "box", tmp_path / "Annotations" / "480p" / "box"
    frames.mkdir(parents=True)
    annotations.mkdir(parents=True)
    stripe = np.zeros((64, 64), bool)
    stripe[:, 16:40] = True
    narrower = np.zeros_like(stripe)
    narrower[:, 16:38] = True
    for t, truth in enumerate([stripe, stripe, narrower, np.zeros_like(stripe)]):
        Image.fromarray(np.repeat(stripe[..., None], 3, 2).astype(np.uint8) * 255).save(
            frames / f"{t:05d}.png"
        )
        Image.fromarray(truth.astype(np.uint8) * 255, mode="L").save(annotations / f"{t:05d}.png")
    row = evaluate_variant(ColourFeatures(cell=8), list_sequences(tmp_path), (64, 64))
    j, f = 100 * (1 + 22 / 24) / 2, 100 * (1 + 1 / 2) / 2
    assert row.metrics == pytest.approx({"J": j, "F": f, "J&F": (j + f) / 2})
    assert row.details["per_sequence"]["box"]["J&F"] == pytest.approx((j + f) / 2)


# ---------------------------------------------------------------------------------------- real data


@pytest.mark.shared
@pytest.mark.skipif(
    not (DAVIS.is_dir() and DINOV2_WEIGHTS.is_file()), reason=f"{DAVIS} or the real weights are absent"
)
def test_real_davis_input_2x_beats_raw_tokens(tmp_path, capsys):
    code = main(
        ["-q", "eval", "davis", "--data", str(DAVIS), "--sequences", "blackswan,dog", "--max-frames", "4",
         "--backbone", DINOV2_NAME, "--weights", str(DINOV2_WEIGHTS), "--size", "112", "--device", "cpu",
         "--variant", "none,input-2x", "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = {
        r["variant"]: r["metrics"] for r in json.loads((tmp_path / "results.json").read_text())["results"]
    }
    assert rows["input-2x"]["J&F"] > rows["none"]["J&F"] + 3
    assert rows["none"]["J&F"] > 30  # real features track the object far better than chance


def test_boundary_dilation_equals_the_toolkit_disk():
    from scipy.ndimage import binary_dilation, distance_transform_edt
    from skimage.morphology import disk

    mask = np.zeros((60, 80), bool)
    mask[10:40, 15:50] = True
    mask[25:55, 40:70] = True
    boundary = seg2bmap(mask)
    for radius in (1, 2, 5):
        assert np.array_equal(
            binary_dilation(boundary, structure=disk(radius).astype(bool)),
            distance_transform_edt(~boundary) <= radius,
        )
