"""`featlift extract` on bad input and faults: where outputs go, when an output counts as done, what a
folder may hold, and how unreadable names, non-finite features, a full disk and too little memory end."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    DINOV2_NAME,
    DINOV2_WEIGHTS,
    IMAGENET_SAMPLE,
    TINY_TIMM_NAME,
    requires_shared,
    write_images,
)
from PIL import Image
from test_extract_cli import extract, outputs

import featlift.fileio
from featlift import create_backbone, extract_to_folder
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.errors import FeatliftError
from featlift.extract import load_features
from featlift.images import ImageItem
from featlift.pipeline import FeaturePipeline
from featlift.upsamplers import Bilinear, LiFT

BILINEAR = ["--upsampler", "bilinear"]
SETTINGS_FILE = "featlift-extract.json"  # the folder's settings (featlift.folder_settings)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of three small images: ``img 0.jpg``, ``img'1.png``, ``img 2.jpg``."""
    write_images(tmp_path / "photos", count=3)
    return tmp_path / "photos"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- item 4: every output inside --out -------------------------------------------------------------


def test_glob_with_dotdot_after_a_wildcard_cannot_write_outside_out(tmp_path, tiny_timm_weights, capsys):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    write_images(tmp_path / "victim", count=1)
    pattern = str(tmp_path / "photos" / "*" / ".." / ".." / "victim" / "*.jpg")
    code = extract(tmp_path, tiny_timm_weights, pattern, *BILINEAR, "--out", str(tmp_path / "out"))
    assert code == 2
    assert "outside the pattern's fixed folder" in capsys.readouterr().err
    assert files_under(tmp_path / "victim") == ["img 0.jpg"]
    assert not (tmp_path / "out").exists()


def test_glob_with_dotdot_that_stays_inside_its_folder_is_named_by_the_normalised_path(
    tmp_path, tiny_timm_weights
):
    write_images(tmp_path / "photos", count=1)
    (tmp_path / "photos" / "sub").mkdir()
    pattern = str(tmp_path / "photos" / "*" / ".." / "*.jpg")
    assert extract(tmp_path, tiny_timm_weights, pattern, *BILINEAR, "--out", str(tmp_path / "out")) == 0
    assert outputs(tmp_path / "out") == ["img 0.jpg.safetensors"]


@pytest.mark.parametrize(
    "relative", ["../escaped.jpg", "{tmp}/elsewhere/absolute.jpg", "a/../../escaped.jpg", "link/x.jpg"]
)
def test_api_refuses_output_paths_that_leave_the_folder(tmp_path, tiny_backbone, relative):
    image = write_images(tmp_path / "in", count=1)[0]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    pipeline = FeaturePipeline(tiny_backbone(), Bilinear())
    item = ImageItem(image, Path(relative.format(tmp=tmp_path)))
    with pytest.raises(FeatliftError, match="outside the output folder"):
        extract_to_folder(pipeline, [item], out, size=(32, 32), progress=False)
    assert files_under(tmp_path / "elsewhere") == [] and not (tmp_path / "escaped.jpg.safetensors").exists()


# --- item 7: the resume key ------------------------------------------------------------------------


def test_other_output_size_is_not_already_done(tmp_path, tiny_timm_weights, photos, capsys):
    out = tmp_path / "out"
    argv = [str(photos), *BILINEAR, "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *argv, "--output-size", "8") == 0
    capsys.readouterr()
    assert extract(tmp_path, tiny_timm_weights, *argv, "--output-size", "16") == 2
    assert "output_size: '8x8' there, '16x16' now" in capsys.readouterr().err
    assert load_features(out / "img 0.jpg.safetensors")[0].shape[-2:] == (8, 8)


def test_an_image_changed_in_place_is_extracted_again(tmp_path, tiny_timm_weights, photos, capsys):
    out = tmp_path / "out"
    argv = [str(photos), *BILINEAR, "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *argv) == 0
    before = load_features(out / "img 0.jpg.safetensors")[0]
    Image.fromarray(np.full((40, 56, 3), 200, np.uint8)).save(photos / "img 0.jpg")
    capsys.readouterr()
    assert extract(tmp_path, tiny_timm_weights, *argv) == 0
    assert "1 written, 2 already done" in capsys.readouterr().out
    features, meta = load_features(out / "img 0.jpg.safetensors")
    assert not torch.allclose(features, before)
    assert meta["source_size"] == str((photos / "img 0.jpg").stat().st_size)


def test_another_folder_with_the_same_names_is_not_already_done(tmp_path, tiny_timm_weights, capsys):
    first, second = (
        write_images(tmp_path / "a", count=3, seed=1),
        write_images(tmp_path / "b", count=3, seed=2),
    )
    out = tmp_path / "out"
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "a"), *BILINEAR, "--out", str(out)) == 0
    capsys.readouterr()
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "b"), *BILINEAR, "--out", str(out)) == 0
    assert "3 written, 0 already done" in capsys.readouterr().out
    assert [load_features(out / f"{p.name}.safetensors")[1]["source"] for p in first] == [
        str(p) for p in second
    ]
    # a moved folder (same files: same size and modification time) is still done
    shutil.move(tmp_path / "b", tmp_path / "moved")
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "moved"), *BILINEAR, "--out", str(out)) == 0
    assert "0 written, 3 already done" in capsys.readouterr().out


# --- item 8: one set of settings per folder ----------------------------------------------------------


def test_second_run_with_other_settings_into_one_folder_is_refused(tmp_path, tiny_timm_weights, capsys):
    write_images(tmp_path / "first", count=2)
    (tmp_path / "second").mkdir()
    for path in write_images(tmp_path / "tmp", count=2, seed=3):  # other names than the first run's
        path.rename(tmp_path / "second" / f"other {path.name}")
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size), backbone)
    out = tmp_path / "out"
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "first"), *BILINEAR, "--out", str(out)) == 0
    capsys.readouterr()
    lift = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "second"), *lift) == 2
    assert "holds features extracted with other settings (upsampler: 'bilinear' there, 'lift' now" in (
        capsys.readouterr().err
    )
    assert {load_features(out / name)[1]["upsampler"] for name in outputs(out)} == {"bilinear"}
    assert len(outputs(out)) == 2
    # --overwrite would leave the first run's files with the old settings: refused too, naming them
    assert extract(tmp_path, tiny_timm_weights, str(tmp_path / "second"), *lift, "--overwrite") == 2
    assert "2 of them (img 0.jpg.safetensors, img'1.png.safetensors) are not inputs of this run" in (
        capsys.readouterr().err
    )
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["upsampler"] == "bilinear"


def test_concurrent_claims_of_a_folder(tmp_path):
    """Of runs starting at once with different settings exactly one gets the folder; same settings share it."""
    from featlift.folder_settings import claim_folder

    settings = [{"upsampler": "lift" if i % 2 else "bilinear"} for i in range(8)]
    results: list[str] = [""] * len(settings)
    start = threading.Barrier(len(settings))

    def claim(i: int) -> None:
        start.wait()
        try:
            claim_folder(tmp_path, settings[i], [], overwrite=False)
            results[i] = "ok"
        except FeatliftError:
            results[i] = "refused"

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = json.loads((tmp_path / SETTINGS_FILE).read_text())["settings"]
    assert [r == "ok" for r in results] == [s == winner for s in settings]
    assert [p.name for p in tmp_path.iterdir()] == [SETTINGS_FILE]


def test_unreadable_settings_file_is_reported(tmp_path, tiny_timm_weights, photos, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / SETTINGS_FILE).write_text("[1, 2]")
    assert extract(tmp_path, tiny_timm_weights, str(photos), *BILINEAR, "--out", str(tmp_path / "out")) == 2
    assert f"{SETTINGS_FILE}: not a featlift extraction settings file" in capsys.readouterr().err


# --- item 10: non-finite features are reported, never written ----------------------------------------


class DarkImagesGiveNaN(FeaturePipeline):
    """A pipeline that breaks on one input: NaN features for an all-black image."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = super().forward(images)
        dark = (images.flatten(1).amax(1) == 0)[:, None, None, None]
        return torch.where(dark, torch.full_like(features, float("nan")), features)


def test_nan_features_of_one_image_are_reported_and_not_written(tmp_path, tiny_backbone):
    folder = tmp_path / "in"
    write_images(folder, count=2)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "black.png")
    from featlift.images import collect_images

    pipeline = DarkImagesGiveNaN(tiny_backbone(), Bilinear())
    out = tmp_path / "out"
    report = extract_to_folder(pipeline, collect_images([folder]), out, size=(32, 32), progress=False)
    assert [path.name for path, _ in report.failed] == ["black.png"]
    assert (
        "black.png: features have 512 NaN and 0 infinite values (of 512), not written" in report.failed[0][1]
    )
    assert outputs(out) == ["img 0.jpg.safetensors", "img'1.png.safetensors"]


def test_features_beyond_float16_are_reported_not_written_as_inf(tmp_path, tiny_timm_weights, photos, capsys):
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(
        tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size, output_scale=1e9), backbone
    )
    out = tmp_path / "out"
    argv = [str(photos), "--checkpoint", str(tmp_path / "ckpt"), "--dtype", "float16", "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *argv) == 1
    captured = capsys.readouterr().out
    assert "0 written, 0 already done, 3 failed" in captured
    assert "exceed the range of float16; use --dtype float32" in captured
    assert outputs(out) == []


# --- items 13 and 22: broken symlinks and names that are not UTF-8 ------------------------------------


def test_broken_and_looping_symlinks_are_reported(tmp_path, tiny_timm_weights, photos, capsys):
    (photos / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    out = tmp_path / "out"
    assert extract(tmp_path, tiny_timm_weights, str(photos), *BILINEAR, "--out", str(out)) == 1
    captured = capsys.readouterr().out
    assert "3 written, 0 already done, 2 failed" in captured
    assert "failed: " + str(photos / "broken.jpg") in captured
    assert "failed: " + str(photos / "loop.jpg") in captured
    assert len(outputs(out)) == 3


def test_name_that_is_not_utf8_is_reported_and_the_rest_extracted(tmp_path, tiny_timm_weights, capsys):
    folder = tmp_path / "in"
    write_images(folder, count=3)
    os.rename(folder / "img'1.png", os.fsdecode(os.fsencode(folder) + b"/img\xff1.png"))
    out = tmp_path / "out"
    assert extract(tmp_path, tiny_timm_weights, str(folder), *BILINEAR, "--out", str(out)) == 1
    captured = capsys.readouterr().out
    assert "2 written, 0 already done, 1 failed" in captured
    assert f"failed: {folder}/img\\xff1.png: file name is not valid UTF-8" in captured
    assert outputs(out) == ["img 0.jpg.safetensors", "img 2.jpg.safetensors"]


# --- item 21: a full disk ------------------------------------------------------------------------------


def test_full_disk_on_a_write_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from featlift.errors import OutputWriteError

    def disk_full(path, data):
        path.write_bytes(data[:10])  # what a write that runs out of space leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(featlift.fileio, "_write_bytes", disk_full)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OutputWriteError, match=f"no space left on /.* while writing {target}$"):
        featlift.fileio.save_safetensors_atomic({"x": torch.zeros(3)}, target)
    assert list(tmp_path.iterdir()) == []


FULL_DISK = """
import json, os, sys
from featlift.cli import main
from featlift.extract import load_features
code = main({argv!r})
out = {out!r}
names = sorted(os.listdir(out))
print(json.dumps({{"code": code, "names": names,
    "loadable": [n for n in names if n.endswith(".safetensors") and load_features(os.path.join(out, n))]}}))
"""


def test_full_disk_stops_with_a_clear_error_and_keeps_what_is_done(tmp_path, tiny_timm_weights):
    """A real full file system: a 40 KiB tmpfs in a user and mount namespace of its own."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a tmpfs of its own")
    write_images(tmp_path / "many", count=12, size=(32, 32))
    out = tmp_path / "small disk"
    out.mkdir()
    argv = ["-q", "extract", str(tmp_path / "many"), "--backbone", TINY_TIMM_NAME, "--weights"]
    argv += [str(tiny_timm_weights), "--size", "32", *BILINEAR, "--workers", "0", "--out", str(out)]
    script = FULL_DISK.format(argv=argv, out=str(out))
    mount = f"mount -t tmpfs -o size=40k tmpfs '{out}' && exec {sys.executable} -c \"$0\""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs '{out}'"])
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    process = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["code"] == 2, process.stderr[-2000:]
    assert f"featlift extract: error: no space left on {out} while writing {out}/" in process.stderr
    written = int(process.stderr.split("stopped after ")[1].split(" written")[0])
    assert 0 < written < 12
    assert len(result["loadable"]) == written
    assert result["names"] == sorted([SETTINGS_FILE, *result["loadable"]])  # no temp file left


# --- item 25: a run that cannot fit in memory is refused before it starts ----------------------------


def test_too_many_iters_are_refused_with_the_memory_needed(tmp_path, tiny_timm_weights, photos, capsys):
    out = tmp_path / "out"
    argv = [str(photos), *BILINEAR, "--iters", "14", "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *argv) == 2
    err = capsys.readouterr().err
    # 3 images x 192 channels x (2 * 2**14) x (3 * 2**14) float32: the bilinear output alone is 3456 GiB
    assert "needs about 3456.0 GiB on cpu (one batch, 3 x 192 x 32768 x 49152 features at the output" in err
    assert "lower --iters, --batch-size or --output-size" in err
    assert outputs(out) == []


def test_memory_estimate_equals_the_memory_a_real_call_allocates(tiny_backbone):
    from featlift.memory_estimate import batch_peak_bytes
    from featlift.meters import TensorMemoryTracker

    backbone = tiny_backbone()
    pipeline = FeaturePipeline(backbone, LiFT(backbone.channels, backbone.patch_size, iters=2).eval())
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        pipeline(torch.rand(3, 3, 64, 96))
    assert batch_peak_bytes(pipeline, 3, (64, 96)) == tracker.peak > 3 * 32 * 16 * 24 * 4


@requires_shared
def test_real_dinov2_with_ten_lift_passes_is_refused_before_running(tmp_path, capsys):
    image = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[0]
    argv = [
        "extract",
        str(image),
        "--backbone",
        DINOV2_NAME,
        "--weights",
        str(DINOV2_WEIGHTS),
        "--iters",
        "10",
    ]
    assert main([*argv, "--workers", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "(one batch, 1 x 384 x 16384 x 16384 features at the output grid" in err
    assert outputs(tmp_path / "out") == []


@pytest.mark.parametrize("link_errno", [errno.EPERM, errno.ENOTSUP])
def test_folder_claims_work_on_file_systems_without_hard_links(tmp_path, monkeypatch, link_errno):
    """FAT, exFAT and some network mounts refuse os.link: the claim is still made, and still exclusive."""
    from featlift.folder_settings import claim_folder

    def no_links(source, target):
        raise OSError(link_errno, os.strerror(link_errno))

    monkeypatch.setattr(featlift.fileio.os, "link", no_links)
    claim_folder(tmp_path, {"upsampler": "lift"}, [], overwrite=False)
    claim_folder(tmp_path, {"upsampler": "lift"}, [], overwrite=False)  # same settings share the folder
    with pytest.raises(FeatliftError, match="bilinear"):
        claim_folder(tmp_path, {"upsampler": "bilinear"}, [], overwrite=False)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["settings"] == {"upsampler": "lift"}
    assert [p.name for p in tmp_path.iterdir()] == [SETTINGS_FILE]


def test_memory_check_counts_the_weights_a_gpu_still_has_to_receive(tiny_backbone, monkeypatch):
    """Before the pipeline moves to the GPU its weights are on the host: the GPU must hold them too."""
    from featlift import memory_estimate

    backbone = tiny_backbone()
    pipeline = FeaturePipeline(backbone, LiFT(backbone.channels, backbone.patch_size).eval())
    weights = sum(t.nbytes for t in [*pipeline.parameters(), *pipeline.buffers()])
    compute = memory_estimate.batch_peak_bytes(pipeline, 1, (64, 64))
    monkeypatch.setattr(memory_estimate, "host_free_bytes", lambda: 2**40)
    kwargs = dict(batch=1, size=(64, 64), device="cuda", stored_dtype=torch.float32, held_batches=2)
    monkeypatch.setattr(memory_estimate, "device_free_bytes", lambda device: compute + weights)
    memory_estimate.check_extraction_fits(pipeline, **kwargs)  # exactly enough
    monkeypatch.setattr(memory_estimate, "device_free_bytes", lambda device: compute + weights - 1)
    with pytest.raises(FeatliftError, match=r"on cuda .*GiB of weights"):
        memory_estimate.check_extraction_fits(pipeline, **kwargs)
