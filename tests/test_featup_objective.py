"""FeatUp's training objective (`featlift.train.objectives.featup`): its jitters on pixels and on feature maps,
the attention downsampler, the objective's own trainable modules, CLI training and an exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

from featlift.checkpoint import load_checkpoint
from featlift.cli import main
from featlift.train.augment import jitter_features
from featlift.train.data import scan_images
from featlift.train.objectives import get_objective
from featlift.train.objectives.featup import JITTERS, FeatUpObjective
from featlift.train.objectives.featup_downsampler import AttentionDownsampler, gaussian_blur
from featlift.train.state import load_state
from featlift.train.views import View, check_view_sizes, load_views, views_signature
from featlift.upsamplers.featup_jbu import FeatUpJBU


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def featup_apply_jitter(features: torch.Tensor, pad: int, zoom: float, top: int, left: int, flip: bool):
    """FeatUp's ``apply_jitter`` as its code states it: reflect pad, bilinear zoom, crop at (top, left), flip."""
    height, width = features.shape[-2:]
    padded = F.pad(features, [pad] * 4, mode="reflect")
    zoomed = F.interpolate(padded, scale_factor=zoom, mode="bilinear") if zoom > 1 else padded
    cropped = zoomed[:, :, top : top + height, left : left + width]
    return cropped.flip(-1) if flip else cropped


def test_old_views_keep_their_names_and_cache_keys():
    views = (View("s1", 1.0), View("half", 0.5, crop=(0, 0, 0.5, 0.5), draw=2))
    assert [v.describe() for v in views] == ["s1@1", "half@0.5[0,0,0.5,0.5]#2"]
    assert views_signature(views, 3) == "s1@1;half@0.5[0,0,0.5,0.5]#2;seed3"
    assert (
        View("p", 1.5, pad=0.0625, crop=(-0.0625, 0, 2 / 3, 2 / 3), flip=True)
        .describe()
        .endswith("+pad0.0625~flip")
    )
    with pytest.raises(ValueError, match=r"crop .* box in \[0, 1\]"):
        View("x", crop=(-0.1, 0, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"box in \[-0.05, 1.05\] \(pad 0.05\)"):
        View("x", pad=0.05, crop=(-0.1, 0, 0.5, 0.5))


def test_padded_flipped_view_pixels_are_the_reflect_padded_crop(tmp_path):
    image = scan_images(write_image_tree(tmp_path / "imgs", count=1, corrupt=False)).images[0]
    plain = load_views(image, (View("s", 2.0),), 64, 0)["s"]  # 128 px
    view = View("j", 2.0, pad=1 / 16, crop=(-1 / 16, 0.5, 0.5, 0.5), flip=True)
    pixels = load_views(image, (view,), 64, 0)["j"]
    padded = F.pad(plain[None].float(), [8] * 4, mode="reflect")[0].to(torch.uint8)
    assert torch.equal(pixels, padded[:, 0:64, 72:136].flip(-1))
    check_view_sizes(FeatUpObjective.views, 64, 16, "featup")
    check_view_sizes(FeatUpObjective.views, 224, 14, "featup")


def test_feature_jitter_is_featups_apply_jitter():
    torch.manual_seed(0)
    features = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # pad 2 px (1/16), zoom 2, crop at (6, 38) of the zoomed padded map: top (6 - 4) / 64, left (38 - 4) / 64
    # (not at its outer edge, where FeatUp's zoom clamps half a pixel that the sampling here reads reflected)
    view = View("j", 2.0, pad=1 / 16, crop=(2 / 64, 34 / 64, 0.5, 0.5), flip=True)
    expected = featup_apply_jitter(features, 2, 2.0, 6, 38, True)
    assert torch.allclose(jitter_features(features, view), expected, atol=1e-12)
    view = View("k", 1.0, pad=1 / 16, crop=(-1 / 16, 1 / 16, 1.0, 1.0))  # a shift into the padding
    assert torch.allclose(jitter_features(features, view), featup_apply_jitter(features, 2, 1.0, 0, 4, False))


def test_feature_jitter_maps_a_map_as_the_view_maps_its_pixels(tmp_path):
    image = scan_images(write_image_tree(tmp_path / "imgs", count=1, corrupt=False)).images[0]
    whole = load_views(image, (View("s", 1.0),), 64, 0)["s"].double()[None]
    for view in (JITTERS[0], JITTERS[1], JITTERS[6], JITTERS[7]):  # zoom 1: whole-pixel shifts, pad, flip
        pixels = load_views(image, (view,), 64, 0)[view.name].double()[None]
        assert torch.allclose(jitter_features(whole, view), pixels, atol=1e-9), view


def test_attention_downsampler_with_flat_logits_is_the_blurred_patch_mean():
    torch.manual_seed(0)
    down = AttentionDownsampler(channels=4, kernel=4).eval()
    with torch.no_grad():
        down.logit_weight.zero_()
        down.logit_bias.zero_()
    features = torch.randn(2, 4, 12, 8)
    expected = F.avg_pool2d(gaussian_blur(features), 4)
    assert torch.allclose(down(features, (3, 2)), expected, atol=1e-6)
    # the blur is kornia's: a normalised 5x5 Gaussian of sigma 1, reflect border
    offsets = torch.arange(5.0) - 2
    kernel = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / 2)
    kernel = (kernel / kernel.sum()).expand(4, 1, 5, 5)
    direct = F.conv2d(F.pad(features, [2] * 4, mode="reflect"), kernel, groups=4)
    assert torch.allclose(gaussian_blur(features), direct, atol=1e-6)


def test_attention_downsampler_attends_to_the_highest_logits():
    down = AttentionDownsampler(channels=2, kernel=4).eval()
    with torch.no_grad():
        down.logits.weight.copy_(torch.tensor([[1000.0, 0.0]]))
        down.logits.bias.zero_()
        down.logit_weight.fill_(1.0)
        down.logit_bias.zero_()
    features = torch.zeros(1, 2, 4, 4)
    features[0, 0, 2, 1] = 1.0  # one bright pixel: after the blur the patch's largest logit is there
    features[0, 1] = torch.arange(16.0).reshape(4, 4)
    blurred = gaussian_blur(features)
    out = down(features, (1, 1))
    peak = int(blurred[0, 0].argmax())
    assert torch.allclose(out[0, :, 0, 0], blurred[0, :, peak // 4, peak % 4], atol=1e-3)


def test_objective_owns_its_modules_and_its_loss_trains_them():
    objective = get_objective("featup")()
    assert objective.stochastic and objective.modules() == {}
    upsampler = FeatUpJBU(channels=8)
    objective.prepare(upsampler, 8)
    assert set(objective.modules()) == {"downsampler", "uncertainty"}
    assert objective.downsampler.kernel == 16


@pytest.mark.parametrize("resume_at", [1])
def test_cli_trains_featup_jbu_and_resume_restores_the_downsampler(tmp_path, weights, resume_at):
    images = write_image_tree(tmp_path / "imgs", count=4, corrupt=False)
    common = ("--upsampler", "featup-jbu", "--val-fraction", "0.25")
    whole, part = tmp_path / "whole", tmp_path / "part"
    with one_thread():
        assert main(train_args(images, whole, weights, *common, "--epochs", "2")) == 0
        assert main(train_args(images, part, weights, *common, "--epochs", str(resume_at))) == 0
        first = load_state(part)["objective_modules"]["downsampler"]
        assert main(train_args(images, part, weights, *common, "--epochs", "2", "--resume")) == 0
    log = [json.loads(line) for line in (whole / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["settings"]["objective"] == "featup" and log[0]["settings"]["upsampler"] == "featup-jbu"
    epochs = [r for r in log if r["type"] == "epoch"]
    assert len(epochs) == 2 and all(r["val_jitter_mse"] > 0 for r in epochs)
    config = json.loads((whole / "config.json").read_text())
    assert config["training"]["objective_name"] == "featup"
    # the checkpoint is the upsampler alone; the downsampler and the scale are in the training state
    model = load_file(str(whole / "model.safetensors"))
    assert not any("downsampler" in k or "logit" in k for k in model)
    loaded, _ = load_checkpoint(whole, options={"chunk_size": 64})
    assert isinstance(loaded, FeatUpJBU) and loaded.chunk_size == 64 and loaded.config()["channels"] == 192
    state, resumed = load_state(whole), load_state(part)
    assert set(state["objective_modules"]) == {"downsampler", "uncertainty"}
    for name, module in state["objective_modules"].items():
        for key, value in module.items():
            assert torch.equal(resumed["objective_modules"][name][key], value), (name, key)
    assert not all(torch.equal(first[k], v) for k, v in state["objective_modules"]["downsampler"].items())
    for key, value in model.items():
        assert torch.equal(load_file(str(part / "model.safetensors"))[key], value), key
    steps = [(r["epoch"], r["step"], r["loss"]) for r in log if r["type"] == "step"]
    resumed_log = [json.loads(line) for line in (part / "train_log.jsonl").read_text().splitlines()]
    assert steps == [(r["epoch"], r["step"], r["loss"]) for r in resumed_log if r["type"] == "step"]


def test_resume_refuses_a_state_without_the_objectives_modules(tmp_path, weights, capsys):
    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    run = tmp_path / "run"
    common = ("--upsampler", "featup-jbu", "--val-fraction", "0")
    with one_thread():
        assert main(train_args(images, run, weights, *common, "--epochs", "1")) == 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run / "train_state.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("objective/")}
    record = json.loads(metadata["featlift_train_state"])
    record.pop("objective_modules")
    save_file(tensors, str(path), metadata={"featlift_train_state": json.dumps(record)})
    with one_thread():
        assert main(train_args(images, run, weights, *common, "--epochs", "2", "--resume")) == 2
    assert (
        "objective modules none saved, ['downsampler', 'uncertainty'] in this run" in capsys.readouterr().err
    )


def test_featup_views_cover_every_jitter_with_a_full_size_crop():
    names = [v.name for v in FeatUpObjective.views]
    assert names[0] == "image" and len(names) == 1 + len(JITTERS) == 9
    for view in JITTERS:
        side, _, _, height, width = view.pixel_box(64)
        assert round(height) == round(width) == 64, view
    assert sum(v.flip for v in JITTERS) == 4 and {v.scale for v in JITTERS} == {1.0, 1.5, 2.0}


def test_loss_is_finite_and_reaches_every_trainable_part():
    torch.manual_seed(0)
    objective = FeatUpObjective()
    upsampler = FeatUpJBU(channels=8).train()
    objective.prepare(upsampler, 8)
    from featlift.train.batches import Batch

    pixels = {v.name: torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8) for v in objective.views}
    features = {v.name: torch.randn(2, 8, 4, 4) for v in objective.views}
    batch = Batch(pixels, features, [0, 1], lambda x: x, torch.device("cpu"))
    loss = objective.loss(upsampler, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for module in (upsampler, *objective.modules().values()):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), type(module)


def test_lift_training_state_has_no_objective_entries(tmp_path, weights):
    """LiFT's objective owns no modules: its training state is written as before (no objective tensors or record)."""
    from safetensors import safe_open

    images = write_image_tree(tmp_path / "imgs", count=2, corrupt=False)
    run = tmp_path / "run"
    assert main(train_args(images, run, weights, "--epochs", "1", "--val-fraction", "0")) == 0
    with safe_open(str(run / "train_state.safetensors"), "pt") as handle:
        record = json.loads(handle.metadata()["featlift_train_state"])
        assert not any(k.startswith("objective/") for k in handle.keys())
    assert "objective_modules" not in record
    assert load_state(run)["objective_modules"] == {}


def test_the_featup_objective_refuses_another_loss_naming_it():
    from featlift.errors import FeatliftError
    from featlift.train.objectives import get_objective

    with pytest.raises(FeatliftError, match="--loss l1: objective featup"):
        get_objective("featup")(loss="l1")


def loss_and_gradients(checkpointed: bool):
    """The featup loss of one seeded batch, its gradients, and the tracked peak MiB of loss + backward."""
    from featlift.meters import TensorMemoryTracker
    from featlift.train.batches import Batch

    torch.manual_seed(0)
    upsampler = FeatUpJBU(channels=16).train()
    objective = FeatUpObjective()
    objective.checkpoint_jitters = checkpointed
    objective.prepare(upsampler, 16)
    pixels = {v.name: torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8) for v in objective.views}
    features = {v.name: torch.randn(2, 16, 4, 4) for v in objective.views}
    batch = Batch(pixels, features, [0, 1], lambda x: x, torch.device("cpu"))
    torch.manual_seed(1)
    with TensorMemoryTracker() as tracker:
        loss = objective.loss(upsampler, batch)
        loss.backward()
    modules = (upsampler, *objective.modules().values())
    grads = [p.grad.clone() for module in modules for p in module.parameters()]
    return loss.detach(), grads, tracker.peak / 2**20


def test_checkpointed_jitters_give_the_same_loss_and_gradients_in_less_memory(monkeypatch):
    """Each jitter's graph is recomputed in backward: the dropout draws replay, so nothing changes but the memory,
    which no longer grows with the number of jitters per step (the plain graph holds every jitter's copies)."""
    import featlift.train.objectives.featup as featup_objective

    loss, grads, peak = loss_and_gradients(checkpointed=True)
    plain_loss, plain_grads, plain_peak = loss_and_gradients(checkpointed=False)
    assert torch.equal(loss, plain_loss)
    assert len(grads) == len(plain_grads)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-6, atol=1e-9)
    monkeypatch.setattr(featup_objective, "JITTERS_PER_STEP", 1)
    one_jitter_peak = loss_and_gradients(checkpointed=True)[2]
    assert peak - one_jitter_peak < 0.1 * (plain_peak - one_jitter_peak), (one_jitter_peak, peak, plain_peak)


def test_attention_downsampler_tiled_path_equals_the_unfolded_one():
    """Patches that tile the map (every FeatUp jitter of a 16x map) skip the unfold: same output and gradients."""
    torch.manual_seed(0)
    down = AttentionDownsampler(6, 4).eval()
    blurred = torch.randn(2, 6, 12, 8, dtype=torch.float64, requires_grad=True)
    down = down.double()
    tiled = down.tiled(blurred, (3, 2))
    unfolded = down.unfolded(blurred, (3, 2), (4, 4))
    torch.testing.assert_close(tiled, unfolded, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(tiled)
    grads = torch.autograd.grad((tiled * weights).sum(), (blurred, *down.parameters()))
    reference = torch.autograd.grad((unfolded * weights).sum(), (blurred, *down.parameters()))
    for got, expected in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # forward() takes the tiled path exactly when the patches tile the map
    features = torch.randn(1, 6, 12, 8, dtype=torch.float64)
    torch.testing.assert_close(down(features, (3, 2)), down.unfolded(gaussian_blur(features), (3, 2), (4, 4)))


def test_attention_downsampler_drops_out_only_what_enters_the_logits():
    """In training the feature dropout feeds the logits only: the averaged values are the undropped features."""
    torch.manual_seed(0)
    down = AttentionDownsampler(4, 2).train()
    features = torch.ones(64, 4, 4, 4)
    out = down(features, (2, 2))
    assert out.shape == (64, 4, 2, 2)
    # the values are blurred features averaged by a softmax: constant features give the constant back
    torch.testing.assert_close(out, torch.ones_like(out))
