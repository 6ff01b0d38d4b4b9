"""LoftUp's stage-2 objective (`featlift.train.objectives.loftup`): the EMA teacher against a hand computation,
the affinity and TV terms, the crop geometry, and `featlift train --upsampler loftup` from the CLI with a
``--resume`` that restores the teacher, then `featlift extract` with the trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import TINY_NAME, one_thread, save_tiny_weights, train_args, write_image_tree

from featlift import load_checkpoint
from featlift.cli import main
from featlift.train.batches import Batch
from featlift.train.objectives.featup import JITTERS
from featlift.train.objectives.loftup import (
    CROPS,
    EMATeacher,
    LoftUpObjective,
    affinity_matrix,
    crop_box,
    total_variation,
)
from featlift.train.state import load_state
from featlift.upsamplers.loftup import LoftUp


def filled(module: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(value)
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.fill_(value)


def test_the_ema_teacher_follows_the_official_schedule_by_hand():
    student = LoftUp(4, patch_size=4, heads=2)
    teacher = EMATeacher(student, beta=0.5, every=2, after=2)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    expected, decays = None, []
    for update in range(8):
        value = float(update + 1)  # the student after optimiser step `update`
        filled(student, value)
        teacher.update(student)
        if update % 2:
            continue  # every 2nd update only
        if update <= 2:
            expected = value  # warm-up: a copy
        else:
            # ema-pytorch: d = min(beta, 1 - (1 + e)^(-2/3)), e = update - after - 1
            decay = min(0.5, 1 - (1 + (update - 2 - 1)) ** (-2 / 3))
            decays.append(decay)
            expected = expected - (1 - decay) * (expected - value)
        for parameter in teacher.model.parameters():
            assert torch.allclose(parameter, torch.full_like(parameter, expected)), (update, expected)
        assert torch.allclose(teacher.model.query_bn1.running_mean, torch.full((24,), value))  # copied
    assert decays == [pytest.approx(1 - 2 ** (-2 / 3)), 0.5]  # the schedule, then its cap at beta
    assert int(teacher.updates) == 8
    first = 3.0 - (1 - decays[0]) * (3.0 - 5.0)  # copy of step 3, then towards step 5's value
    assert expected == pytest.approx(first - 0.5 * (first - 7.0))


def test_the_affinity_matrix_is_the_cosine_similarity_of_the_inner_region():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 10, 20)
    inner = features[:, :, 1:9, 2:18].flatten(
        2
    )  # int(0.1 * 10) : int(0.9 * 10), int(0.1 * 20) : int(0.9 * 20)
    expected = F.cosine_similarity(inner[:, :, :, None], inner[:, :, None, :], dim=1)
    assert torch.allclose(affinity_matrix(features), expected, atol=1e-5)
    features[:, :, 0] = 100.0  # the dropped border does not count
    assert torch.allclose(affinity_matrix(features), expected, atol=1e-5)


def test_total_variation_by_hand():
    features = torch.tensor([[[[0.0, 1.0], [3.0, 7.0]]]])
    assert total_variation(features).item() == pytest.approx((9 + 36 + 1 + 16) / 4)


def test_crop_boxes_are_the_regions_of_the_view_in_the_student_map():
    assert crop_box(CROPS[2], (64, 64)) == (slice(8, 24), slice(16, 32))
    assert crop_box(CROPS[0], (224, 224)) == (slice(0, 112), slice(112, 224))
    assert all(view.scale * view.crop[2] == 1.0 for view in CROPS)  # every crop is seen at S x S
    assert sorted({view.scale for view in CROPS}) == [2.0, 4.0]


def hand_batch(channels: int = 8) -> Batch:
    """Two images: every view 32 px (8x8 tokens of patch 4) with random pixels and features."""
    torch.manual_seed(3)
    names = ["image", *(v.name for v in JITTERS), *(v.name for v in CROPS)]
    pixels = {n: torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8) for n in names}
    features = {n: torch.randn(2, channels, 8, 8) for n in names}
    return Batch(pixels, features, [0, 1], lambda x: (x - 0.5) / 0.25, torch.device("cpu"))


@pytest.mark.parametrize("distilling", [True, False])
def test_the_loss_is_the_weighted_sum_of_its_terms(distilling):
    batch = hand_batch()
    torch.manual_seed(0)
    upsampler = LoftUp(8, patch_size=4).train()
    objective = LoftUpObjective()
    objective.prepare(upsampler, 8)
    objective.teacher.after = 0 if distilling else 5
    objective.ema_after = 0 if distilling else 5
    filled(objective.teacher.model, 0.0)  # a teacher unlike the student
    with torch.no_grad():
        objective.teacher.model.output_norm.bias.normal_()
        objective.teacher.model.output_norm.weight.normal_()
    torch.manual_seed(7)
    loss = objective.loss(upsampler, batch)
    torch.manual_seed(7)  # the same draws, in the loss's order
    student = objective.upsampled(upsampler, batch)
    crops, jitters = torch.randperm(4)[:2].tolist(), torch.randperm(8)[:2].tolist()
    expected = 0.05 * total_variation(student)
    for crop, jitter in zip(crops, jitters, strict=True):
        expected = expected + (
            objective.reconstruction(upsampler, student, batch, JITTERS[jitter]) / 2
        ).clamp_min(0)
        if distilling:
            expected = expected + 20 * objective.affinity_loss(student, batch, CROPS[crop], False) / 2
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
    if distilling:
        assert objective.affinity_loss(student, batch, CROPS[crops[0]], False) > 1e-4  # the term counts
    loss.backward()
    assert all(p.grad is not None for p in objective.downsampler.parameters())
    assert all(p.grad is None for p in objective.teacher.parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run and the same run stopped after 1 epoch and resumed, with the teacher term on from the
    first step and an EMA update after every step (the defaults wait 1000 steps)."""
    tmp = tmp_path_factory.mktemp("loftup")
    weights = save_tiny_weights(tmp / "tiny.safetensors")
    images = write_image_tree(tmp / "imgs", count=3, corrupt=False)
    patch = pytest.MonkeyPatch()
    patch.setattr(LoftUpObjective, "ema_after", 0)
    patch.setattr(LoftUpObjective, "ema_every", 1)

    def train(run: str, *extra: str) -> int:
        args = train_args(images, tmp / run, weights, "--upsampler", "loftup")
        return main([*args, "--val-fraction", "0.34", "--cache", str(tmp / "cache"), "--seed", "1", *extra])

    try:
        with one_thread():
            assert train("straight", "--epochs", "2") == 0
            assert train("resumed", "--epochs", "1") == 0
            assert train("resumed", "--epochs", "2", "--resume") == 0
    finally:
        patch.undo()
    return tmp, weights, images


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_training_resumes_as_an_uninterrupted_run_with_the_teacher_restored(runs):
    tmp, _, _ = runs
    config = json.loads((tmp / "straight" / "config.json").read_text())
    assert config["upsampler"]["name"] == "loftup" and config["training"]["objective_name"] == "loftup"
    straight, resumed = records(tmp / "straight", "step"), records(tmp / "resumed", "step")
    assert (
        [(s["epoch"], s["step"]) for s in straight]
        == [(s["epoch"], s["step"]) for s in resumed]
        == [
            (0, 0),
            (1, 0),
        ]
    )
    for a, b in zip(straight, resumed, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    epochs = records(tmp / "straight", "epoch")
    assert all(e["val_affinity_mse"] > 0 and e["val_jitter_mse"] > 0 for e in epochs)
    states = [load_state(tmp / run) for run in ("straight", "resumed")]
    teachers = [state["objective_modules"]["teacher"] for state in states]
    assert set(states[0]["objective_modules"]) == {"teacher", "downsampler", "uncertainty"}
    assert int(teachers[0]["updates"]) == int(teachers[1]["updates"]) == 2
    for name, value in teachers[0].items():
        assert torch.allclose(value, teachers[1][name], atol=1e-6, rtol=0), name
    a, b = (load_file(str(tmp / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_the_teacher_is_not_part_of_the_saved_upsampler(runs):
    tmp, _, _ = runs
    module, _ = load_checkpoint(tmp / "straight")
    assert isinstance(module, LoftUp)
    saved = load_file(str(tmp / "straight" / "model.safetensors"))
    assert set(saved) == set(LoftUp(192, patch_size=16).state_dict())


def test_extract_with_the_trained_checkpoint(runs):
    tmp, weights, images = runs
    out = tmp / "features"
    code = main(
        [
            "extract",
            str(images),
            "--backbone",
            TINY_NAME,
            "--weights",
            str(weights),
            "--upsampler",
            "loftup",
            "--checkpoint",
            str(tmp / "straight"),
            "--size",
            "64",
            "--option",
            "chunk_size=1000",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    files = sorted(out.rglob("*.safetensors"))
    assert len(files) == 3
    features = load_file(str(files[0]))["features"]
    assert features.shape == (192, 64, 64) and torch.isfinite(features).all()
