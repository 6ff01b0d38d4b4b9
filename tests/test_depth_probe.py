"""`featlift eval depth`: the bin-depth probe's pieces, the NYUv2 layouts, the CLI end to end, real weights."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DINOV2_NAME, DINOV2_WEIGHTS, IMAGENET_SAMPLE, TINY_TIMM_NAME
from PIL import Image
from test_eval_probe import photos

from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.evaluate.depth import (
    LAYOUTS,
    DepthBinProbe,
    DepthConfig,
    DepthRecipe,
    DepthSplit,
    evaluate_variant,
    gradient_loss,
    linear_resize_matrix,
    read_depth,
    sig_loss,
    warmup_cosine_factor,
)

# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def one_thread():
    """The probe's many small ops run fastest on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def content_depth(photo: np.ndarray) -> np.ndarray:
    """The fixture's depth: benchmarks/make_depth_fixture.py's (1 + 4 x smoothed brightness + 2 x row, with holes)."""
    return _fixture_script().content_depth(photo)


def _fixture_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_depth_fixture.py"
    spec = importlib.util.spec_from_file_location("make_depth_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_nyu(root, train=4, test=2, npy_every=2, size=(48, 64), images=None):
    """The `nyu` layout: images/{train,test}/*.png with depth/{train,test}/*.png (uint16 mm) or, every
    `npy_every`-th image, *.npy (float metres)."""
    sources = images if images is not None else photos(train + test, size)
    for split, names in (("train", range(train)), ("test", range(train, train + test))):
        (root / "images" / split).mkdir(parents=True)
        (root / "depth" / split).mkdir(parents=True)
        for i in names:
            photo = sources[i]
            depth = content_depth(photo)
            Image.fromarray(photo).save(root / "images" / split / f"{i:04d}.png")
            if npy_every and i % npy_every == 1:
                np.save(root / "depth" / split / f"{i:04d}.npy", depth)
            else:
                Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(
                    root / "depth" / split / f"{i:04d}.png"
                )
    return root


def depth_cli(data, weights, out, *extra):
    return main(
        ["-q", "eval", "depth", "--data", str(data), "--backbone", TINY_TIMM_NAME, "--weights", str(weights),
         "--size", "32x32", "--device", "cpu", "--epochs", "2", "--train-label-side", "24", "--out", str(out),
         *extra]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- probe pieces


def test_uniform_scores_give_the_mean_bin_centre_and_one_bin_dominates():
    """Equal scores -> equal weights -> the mean of 256 centres uniform in [0.001, 10] = 5.0005 m. A score s on
    bin k alone: weights (s + 0.1) for k, 0.1 elsewhere -> depth = (s c_k + 0.1 sum c) / (s + 25.6)."""
    probe = DepthBinProbe(3)
    centres = torch.linspace(1e-3, 10, 256)
    assert probe.depth_from_scores(torch.zeros(1, 256, 2, 2)) == pytest.approx(torch.full((1, 2, 2), 5.0005))
    scores = torch.full((1, 256, 1, 1), -1.0)  # relu -> 0
    scores[0, 10] = 100.0
    expected = (100 * centres[10] + 0.1 * centres.sum()) / (100 + 25.6)
    assert float(probe.depth_from_scores(scores)) == pytest.approx(float(expected), rel=1e-5)


def test_banded_prediction_equals_the_whole_upsampling():
    """`predict` (bands of rows, separable bilinear as two matrix products) == `forward` (F.interpolate of the
    whole score map), also with a budget so small that every row is its own band."""
    torch.manual_seed(0)
    probe = DepthBinProbe(5, bins=16)
    torch.nn.init.normal_(probe.scores.weight, std=2.0)
    features = torch.randn(5, 3, 4)
    whole = probe(features[None], (13, 19))[0]
    assert torch.allclose(probe.predict(features, (13, 19)), whole, atol=1e-5)
    assert torch.allclose(probe.predict(features, (13, 19), max_memory_mib=1e-6), whole, atol=1e-5)
    matrix = linear_resize_matrix(4, 9)
    line = torch.randn(2, 4)
    assert torch.allclose(line @ matrix.T, F.interpolate(line[None], size=9, mode="linear")[0], atol=1e-6)


def test_sig_loss_known_answer_and_invalid_pixels():
    """pred = 2 gt on valid pixels (eps 0): g = log 2 everywhere -> sqrt(log^2 2 - 0.85 log^2 2) = log 2 sqrt(0.15);
    the invalid pixel (gt 0, pred 9) changes nothing. A perfect prediction -> 0 (up to the sqrt floor)."""
    gt = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    pred = torch.tensor([[2.0, 4.0], [6.0, 9.0]])
    valid = gt > 0
    assert float(sig_loss([pred], [gt], [valid], eps=0)) == pytest.approx(math.log(2) * math.sqrt(0.15))
    assert float(sig_loss([gt], [gt], [valid], eps=0)) < 1e-5
    # pooled over the batch: a second image off by the same factor leaves it unchanged
    assert float(sig_loss([pred, 2 * gt], [gt, gt], [valid, valid], eps=0)) == pytest.approx(
        math.log(2) * math.sqrt(0.15)
    )


def test_gradient_loss_known_answer():
    """A 1x5 map with log error [0, 0, a, 0, 0], a = log 2 (stride 1 only, eps 0): the horizontal pairs two
    apart (0, 2), (1, 3), (2, 4) differ by a, 0, a -> 2a / 5 valid pixels. With pixel 4 invalid, the pair
    (2, 4) drops out -> a / 4. An error that is a constant factor everywhere has no gradient -> 0."""
    gt = torch.ones(1, 5)
    pred = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]])
    a = math.log(2)
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert float(gradient_loss(pred, gt, valid, eps=0, strides=(1,))) == pytest.approx(2 * a / 5)
    valid[0, 4] = False
    assert float(gradient_loss(pred, gt, valid, eps=0, strides=(1,))) == pytest.approx(a / 4)
    # the same map standing up (5x1): the pairs are vertical now
    assert float(gradient_loss(pred.T, gt.T, valid.T, eps=0, strides=(1,))) == pytest.approx(a / 4)
    ramp = torch.arange(1, 37, dtype=torch.float32).reshape(6, 6)
    assert float(gradient_loss(3 * ramp, ramp, ramp > 0, eps=0)) == pytest.approx(0, abs=1e-5)


def test_warmup_cosine_schedule():
    """Probe3D's factor: 0.01 at step 0, 1 at the end of warm-up (10 steps), 0.01 + 0.99 cos(pi/4) half-way
    through the decay, 0.01 at the last step."""
    assert warmup_cosine_factor(0, 110, 10) == pytest.approx(0.01)
    assert warmup_cosine_factor(5, 110, 10) == pytest.approx(0.505)
    assert warmup_cosine_factor(10, 110, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 110, 10) == pytest.approx(0.01 + 0.99 * math.cos(math.pi / 4))
    assert warmup_cosine_factor(110, 110, 10) == pytest.approx(0.01)
    assert warmup_cosine_factor(0, 10, 0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- layouts


def test_read_depth_png_millimetres_and_npy_metres(tmp_path):
    mm = np.array([[0, 1000], [2500, 65535]], np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    assert read_depth(tmp_path / "d.png").ravel().tolist() == pytest.approx([0, 1.0, 2.5, 65.535])
    assert read_depth(tmp_path / "d.png", png_units_per_metre=256).ravel().tolist() == pytest.approx(
        [0, 1000 / 256, 2500 / 256, 65535 / 256]
    )
    np.save(tmp_path / "d.npy", np.array([[1.5, np.nan], [-2.0, np.inf]], np.float64))
    assert read_depth(tmp_path / "d.npy").tolist() == [[1.5, 0.0], [0.0, 0.0]]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(FeatliftError, match="16-bit greyscale"):
        read_depth(tmp_path / "eight.png")
    np.save(tmp_path / "rgb.npy", np.zeros((4, 4, 3)))
    with pytest.raises(FeatliftError, match=r"\[H, W\]"):
        read_depth(tmp_path / "rgb.npy")


def test_nyu_layout_pairs_png_and_npy_and_names_what_is_missing(tmp_path):
    root = write_nyu(tmp_path / "nyu", train=3, test=1)
    pairs = LAYOUTS["nyu"].pairs(root, "train")
    assert [(i.name, d.name) for i, d in pairs] == [("0000.png", "0000.png"), ("0001.png", "0001.npy"),
                                                    ("0002.png", "0002.png")]  # fmt: skip
    split = DepthSplit(pairs, "center", 1000.0)
    assert split.depths[0].shape == (48, 48)  # central square of 48x64
    (root / "depth" / "test" / "0003.npy").unlink()
    with pytest.raises(FeatliftError, match=r"0003\.png: no such file.*depth/\{train,test\}"):
        LAYOUTS["nyu"].pairs(root, "test")


def test_official_splits_layout(tmp_path):
    scene = tmp_path / "official_splits" / "test" / "kitchen_0010"
    scene.mkdir(parents=True)
    for n in ("00045", "00046"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(scene / f"rgb_{n}.jpg")
        Image.fromarray(np.full((6, 8), 1234, np.uint16)).save(scene / f"sync_depth_{n}.png")
    pairs = LAYOUTS["nyu-official-splits"].pairs(tmp_path, "test")
    assert [(i.name, d.name) for i, d in pairs] == [
        ("rgb_00045.jpg", "sync_depth_00045.png"),
        ("rgb_00046.jpg", "sync_depth_00046.png"),
    ]
    assert DepthSplit(pairs, "none", 1000.0).depths[0][0, 0] == pytest.approx(1.234)
    with pytest.raises(FeatliftError, match="official_splits/train: no such folder"):
        LAYOUTS["nyu-official-splits"].pairs(tmp_path, "train")


def test_size_mismatch_and_config_errors(tmp_path):
    root = write_nyu(tmp_path / "nyu", train=1, test=1, npy_every=0)
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(root / "depth" / "train" / "0000.png")
    with pytest.raises(FeatliftError, match=r"depth map is 10x10 but its image .*0000\.png is 48x64"):
        DepthSplit(LAYOUTS["nyu"].pairs(root, "train"), "center", 1000.0)
    with pytest.raises(FeatliftError, match=r"DepthConfig\.crop = 'middle': expected one of center, none"):
        DepthConfig(data=root, crop="middle")
    with pytest.raises(FeatliftError, match=r"DepthConfig\.warmup_epochs = 3: expected .*< 2"):
        DepthConfig(data=root, epochs=2, warmup_epochs=3)


# ---------------------------------------------------------------------------------------- the probe learns


class BrightnessFeatures:
    """A stand-in variant whose 8x8-cell features are the cell's mean brightness (and 1 - it) and its row
    position: the fixture's depth (1 + 4 brightness + 2 row) is nearly linear in them."""

    label = "brightness-features"

    def __init__(self):
        from types import SimpleNamespace

        self.pipeline = SimpleNamespace(backbone=SimpleNamespace(grid_size=lambda h, w: (h // 8, w // 8)))

    def input_size(self, base):
        return tuple(base)

    def output_grid(self, base):
        return base[0] // 8, base[1] // 8

    def __call__(self, images):
        grey = F.avg_pool2d(images.mean(1, keepdim=True), 8)
        rows = torch.linspace(0, 1, grey.shape[2])[None, None, :, None].expand_as(grey)
        return torch.cat([grey, 1 - grey, rows], dim=1)


def test_probe_learns_a_content_depth_and_holding_features_changes_nothing(tmp_path):
    """On features that carry the depth's ingredients the probe gets far below the constant predictor; the
    same run with the train features recomputed each epoch (cache_mib 0) gives the same numbers."""
    root = write_nyu(tmp_path / "nyu", train=8, test=3, size=(64, 64))
    train = DepthSplit(LAYOUTS["nyu"].pairs(root, "train"), "center", 1000.0)
    test = DepthSplit(LAYOUTS["nyu"].pairs(root, "test"), "center", 1000.0)
    recipe = DepthRecipe(epochs=25, lr=0.05, warmup_epochs=1, batch_size=4, train_label_side=32)
    held = evaluate_variant(BrightnessFeatures(), train, test, (64, 64), recipe)
    from featlift.evaluate.depth import constant_baseline

    baseline = constant_baseline(train, test, 10.0)
    assert held.metrics["RMSE"] < 0.5 * baseline["RMSE"], (held.metrics, baseline)
    assert held.metrics["delta1"] > 0.9 > baseline["delta1"]
    assert held.details["feature_cache"].startswith("held in memory")
    recomputed = evaluate_variant(BrightnessFeatures(), train, test, (64, 64), recipe, cache_mib=0)
    assert recomputed.details["feature_cache"].startswith("recomputed each epoch")
    assert recomputed.metrics == pytest.approx(held.metrics, rel=1e-5)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_writes_results_for_each_variant(tmp_path, tiny_timm_weights, capsys):
    data = write_nyu(tmp_path / "nyu", train=3, test=2)
    code = depth_cli(
        data, tiny_timm_weights, tmp_path / "out", "--variant", "none,bilinear:iters=2", "--cache-mib", "0"
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["task"] == "depth (nyu)"
    rows = {r["variant"]: r for r in result["results"]}
    assert list(rows) == ["none", "bilinear:iters=2"]
    for row in rows.values():
        metrics = row["metrics"]
        assert set(metrics) == {
            "RMSE",
            "delta1",
            "abs rel",
            "delta2",
            "delta3",
            "SI RMSE",
            "SI delta1",
            "SI abs rel",
        }
        assert metrics["RMSE"] > 0 and 0 <= metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 1
        assert row["ms_per_image"] > 0 and row["details"]["test_images_scored"] == 2
        assert row["details"]["probe_seconds_per_epoch"] > 0
        assert row["details"]["feature_cache"].startswith("recomputed each epoch")
    assert rows["none"]["details"]["feature_grid"] == [2, 2]
    assert rows["bilinear:iters=2"]["details"]["feature_grid"] == [8, 8]
    settings = result["settings"]
    assert (
        settings["train_images"] == 3 and settings["test_images"] == 2 and settings["recipe"]["epochs"] == 2
    )
    assert settings["constant_baseline"]["depth_m"] > 1 and "Probe3D" in settings["protocol"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| variant | RMSE | delta1 | abs rel |" in markdown and "Constant predictor" in markdown


def test_cli_errors_name_the_file_or_value(tmp_path, tiny_timm_weights, capsys):
    data = write_nyu(tmp_path / "nyu", train=2, test=1)
    (data / "depth" / "train" / "0000.png").unlink()
    assert depth_cli(data, tiny_timm_weights, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "0000.png: no such file" in err and "images/{train,test}" in err
    assert depth_cli(data, tiny_timm_weights, tmp_path / "out", "--format", "nyu-official-splits") == 2
    assert "official_splits/train: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        depth_cli(data, tiny_timm_weights, tmp_path / "out", "--max-depth", "-1")


# ---------------------------------------------------------------------------------------- real weights


@pytest.mark.shared
@pytest.mark.skipif(
    not (IMAGENET_SAMPLE.is_dir() and DINOV2_WEIGHTS.is_file()),
    reason=f"{IMAGENET_SAMPLE} or the real weights are absent",
)
def test_real_dinov2_probe_beats_the_constant_predictor(tmp_path, capsys):
    """Real ImageNet photos with the content-derived depth: the probe on real DINOv2 features must clearly beat
    predicting the mean train depth everywhere."""
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:16]
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB").resize((112, 112), Image.BICUBIC)))
    data = write_nyu(tmp_path / "nyu", train=12, test=4, images=images)
    code = main(
        ["-q", "eval", "depth", "--data", str(data), "--backbone", DINOV2_NAME, "--weights", str(DINOV2_WEIGHTS),
         "--size", "112", "--device", "cpu", "--variant", "bilinear", "--epochs", "30", "--lr", "0.01",
         "--warmup-epochs", "1", "--batch-size", "4", "--train-label-side", "56", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    (row,) = result["results"]
    baseline = result["settings"]["constant_baseline"]
    assert row["metrics"]["RMSE"] < 0.7 * baseline["RMSE"], (row["metrics"], baseline)
    assert row["metrics"]["abs rel"] < 0.7 * baseline["abs rel"]
