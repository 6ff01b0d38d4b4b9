"""`featlift extract` driven through `main(argv)` on tiny images with a tiny random timm ViT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_TIMM_NAME, write_images
from PIL import Image
from toy_upsamplers import GuideRecorder, checkerboard

import featlift.extract
from featlift import create_backbone, load_checkpoint
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.extract import load_features
from featlift.images import image_to_tensor, load_image
from featlift.pipeline import FeaturePipeline
from featlift.upsamplers import LiFT


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "my images"
    write_images(root, count=3)
    write_images(root / "nested dir", count=2, size=(30, 20), seed=1)
    return root


def extract(tmp_path, weights, *args):
    return main(
        [
            "-q",
            "extract",
            *args,
            "--backbone",
            TINY_TIMM_NAME,
            "--weights",
            str(weights),
            "--size",
            "32x48",
            "--workers",
            "0",
        ]
    )


def outputs(folder: Path) -> list[str]:
    """The feature files in `folder` (not the settings file)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.is_file())


def test_folder_with_odd_names_bilinear(tmp_path, tiny_timm_weights, image_tree, capsys):
    out = tmp_path / "out"
    code = extract(
        tmp_path,
        tiny_timm_weights,
        str(image_tree),
        "--upsampler",
        "bilinear",
        "--iters",
        "2",
        "--out",
        str(out),
    )
    assert code == 0
    assert outputs(out) == [
        "img 0.jpg.safetensors",
        "img 2.jpg.safetensors",
        "img'1.png.safetensors",
        "nested dir/img 0.jpg.safetensors",
        "nested dir/img'1.png.safetensors",
    ]
    features, meta = load_features(out / "nested dir" / "img'1.png.safetensors")
    assert features.shape == (192, 8, 12) and features.dtype == torch.float32
    assert (
        meta["upsampler"] == "bilinear"
        and meta["upsampler_options"] == '{"iters": 2}'
        and meta["input_size"] == "32x48"
    )
    assert (
        meta["backbone"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
        and meta["layer"] == "11"
        and meta["facet"] == "token"
    )
    assert meta["source"].endswith("img'1.png")
    assert "5 written" in capsys.readouterr().out


def test_features_equal_the_python_api(tmp_path, tiny_timm_weights, image_tree):
    out = tmp_path / "out"
    assert (
        extract(
            tmp_path,
            tiny_timm_weights,
            str(image_tree / "img 0.jpg"),
            "--upsampler",
            "none",
            "--layer",
            "3",
            "--facet",
            "value",
            "--out",
            str(out),
        )
        == 0
    )
    features, meta = load_features(out / "img 0.jpg.safetensors")
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=3, facet="value")
    image = image_to_tensor(load_image(image_tree / "img 0.jpg"), (32, 48))[None]
    torch.testing.assert_close(features, FeaturePipeline(backbone)(image)[0])
    assert meta["upsampler"] == "none" and meta["upsampler_options"] == "{}"


def test_lift_checkpoint_float16_and_glob(tmp_path, tiny_timm_weights, image_tree, capsys):
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size), backbone)
    out = tmp_path / "out"
    pattern = str(image_tree / "**" / "*.png")
    code = extract(
        tmp_path,
        tiny_timm_weights,
        pattern,
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--dtype",
        "float16",
        "--out",
        str(out),
        "--batch-size",
        "1",
    )
    assert code == 0
    assert outputs(out) == ["img'1.png.safetensors", "nested dir/img'1.png.safetensors"]
    features, meta = load_features(out / "img'1.png.safetensors")
    assert features.shape == (192, 4, 6) and features.dtype == torch.float16
    assert meta["upsampler"] == "lift" and meta["checkpoint"] == str(tmp_path / "ckpt")
    assert len(meta["upsampler_fingerprint"]) == 16
    # the same weights under another path count as the same settings: nothing is redone
    (tmp_path / "ckpt").rename(tmp_path / "moved")
    assert (
        extract(
            tmp_path,
            tiny_timm_weights,
            pattern,
            "--checkpoint",
            str(tmp_path / "moved"),
            "--dtype",
            "float16",
            "--out",
            str(out),
        )
        == 0
    )
    assert load_features(out / "img'1.png.safetensors")[1]["checkpoint"] == str(tmp_path / "ckpt")
    # the same weights with another output_scale give other features: not the same settings
    module = load_checkpoint(tmp_path / "moved", backbone=backbone)[0]
    module.output_scale = 0.5
    save_checkpoint(tmp_path / "rescaled", module, backbone)
    argv = [pattern, "--checkpoint", str(tmp_path / "rescaled"), "--dtype", "float16", "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *argv) == 2
    assert "exists with other settings (upsampler_fingerprint:" in capsys.readouterr().err


def test_checkpoint_for_another_layer_is_refused(tmp_path, tiny_timm_weights, image_tree, capsys):
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights, layer=5)
    save_checkpoint(tmp_path / "ckpt", LiFT(backbone.channels, backbone.patch_size), backbone)
    code = extract(
        tmp_path,
        tiny_timm_weights,
        str(image_tree),
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "trained for backbone=vit_tiny_patch16_224.augreg_in21k_ft_in1k layer=5" in err
        and "you are using" in err
        and "layer=11" in err
    )
    assert not (tmp_path / "out").exists()


def test_lift_without_checkpoint_needs_one_unless_shipped(tmp_path, tiny_timm_weights, image_tree, capsys):
    assert extract(tmp_path, tiny_timm_weights, str(image_tree), "--out", str(tmp_path / "out")) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_corrupt_image_is_reported_and_the_rest_extracted(tmp_path, tiny_timm_weights, image_tree, capsys):
    (image_tree / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    out = tmp_path / "out"
    code = extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "bilinear", "--out", str(out))
    assert code == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.out and "cannot decode image" in captured.out
    assert "5 written" in captured.out and "1 failed" in captured.out
    assert len(outputs(out)) == 5 and not (out / "broken.jpg.safetensors").exists()


def test_rerun_skips_finished_and_refuses_other_settings(tmp_path, tiny_timm_weights, image_tree, capsys):
    out = tmp_path / "out"
    assert (
        extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "bilinear", "--out", str(out))
        == 0
    )
    first = out / "img 0.jpg.safetensors"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert (
        extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "bilinear", "--out", str(out))
        == 0
    )
    assert "0 written, 5 already done" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp
    assert (
        extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "none", "--out", str(out)) == 2
    )
    assert "exists with other settings (upsampler: 'bilinear' there, 'none' now" in capsys.readouterr().err
    assert (
        extract(
            tmp_path,
            tiny_timm_weights,
            str(image_tree),
            "--upsampler",
            "none",
            "--out",
            str(out),
            "--overwrite",
        )
        == 0
    )
    assert load_features(first)[1]["upsampler"] == "none"


def test_interrupted_run_leaves_no_partial_file_and_resumes(
    tmp_path, tiny_timm_weights, image_tree, monkeypatch
):
    out = tmp_path / "out"
    real_save = featlift.extract.save_safetensors_atomic
    calls = []

    def crash_on_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            from safetensors.torch import save_file

            save_file(
                tensors, str(path) + ".partial-write-simulated"
            )  # would be a half file without atomic writes
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    monkeypatch.setattr(featlift.extract, "save_safetensors_atomic", crash_on_third)
    assert (
        extract(
            tmp_path,
            tiny_timm_weights,
            str(image_tree),
            "--upsampler",
            "bilinear",
            "--out",
            str(out),
            "--batch-size",
            "2",
        )
        == 130
    )
    for leftover in out.rglob("*.partial-write-simulated"):
        leftover.unlink()
    done = outputs(out)
    assert len(done) == 2 and all(name.endswith(".safetensors") for name in done)
    monkeypatch.setattr(featlift.extract, "save_safetensors_atomic", real_save)
    assert (
        extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "bilinear", "--out", str(out))
        == 0
    )
    assert len(outputs(out)) == 5


def test_atomic_write_removes_its_temp_file_on_failure(tmp_path):
    from featlift.fileio import save_safetensors_atomic

    with pytest.raises(AttributeError):
        save_safetensors_atomic({"x": "not a tensor"}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["does/not/exist.jpg"], "does/not/exist.jpg: no such file, folder or glob pattern"),
        (["{tree}/*.gif"], "pattern matches no image files"),
        (["{tree}", "--size", "30"], "input size 30x30 is not a multiple"),
        (["{tree}", "--size", "abc"], None),
        (["{empty}"], "folder contains no image files"),
    ],
)
def test_bad_inputs_give_clear_errors(tmp_path, tiny_timm_weights, image_tree, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(tree=image_tree, empty=tmp_path / "empty") for a in args]
    argv = [
        "extract",
        *args,
        "--backbone",
        TINY_TIMM_NAME,
        "--weights",
        str(tiny_timm_weights),
        "--upsampler",
        "bilinear",
        "--workers",
        "0",
    ]
    argv += ["--out", str(tmp_path / "out")]
    if message is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "expected S or HxW" in capsys.readouterr().err
        return
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder_fails_before_work(tmp_path, tiny_timm_weights, image_tree, capsys):
    if os.geteuid() == 0:
        blocker = tmp_path / "file-not-folder"
        blocker.write_text("x")
        out = blocker / "out"
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o500)
    assert (
        extract(tmp_path, tiny_timm_weights, str(image_tree), "--upsampler", "bilinear", "--out", str(out))
        == 2
    )
    assert "not writable" in capsys.readouterr().err


def test_colliding_relative_paths_are_refused(tmp_path, tiny_timm_weights):
    write_images(tmp_path / "a", count=1)
    write_images(tmp_path / "b", count=1)
    argv = [str(tmp_path / "a" / "img 0.jpg"), str(tmp_path / "b" / "img 0.jpg"), "--upsampler", "bilinear"]
    assert extract(tmp_path, tiny_timm_weights, *argv, "--out", str(tmp_path / "out")) == 2


def test_workers_decode_in_parallel(tmp_path, tiny_timm_weights, image_tree):
    argv = [
        "-q",
        "extract",
        str(image_tree),
        "--backbone",
        TINY_TIMM_NAME,
        "--weights",
        str(tiny_timm_weights),
    ]
    assert (
        main(
            [
                *argv,
                "--size",
                "32",
                "--upsampler",
                "bilinear",
                "--workers",
                "2",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert len(outputs(tmp_path / "out")) == 5


KILL_MID_WRITE = """
import os, signal, sys
import featlift.fileio
from featlift.cli import main
original, calls = featlift.fileio._write_bytes, [0]
def write_bytes(path, data):
    if path.name.startswith(".featlift-extract.json"):
        return original(path, data)
    calls[0] += 1
    if calls[0] == {kill_at}:  # half a file in the temp path, then the process dies
        original(path, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, data)
featlift.fileio._write_bytes = write_bytes
sys.exit(main({argv!r}))
"""


def test_kill_9_mid_write_then_rerun_completes(tmp_path, tiny_timm_weights):
    """A real `kill -9` while the 6th output is half written: every output on disk is complete, the
    dead process's temp file is removed by the re-run, and the re-run extracts exactly the rest."""
    import signal
    import subprocess
    import sys

    folder = tmp_path / "many"
    write_images(folder, count=12, size=(32, 32))
    out = tmp_path / "out"
    argv = ["-q", "extract", str(folder), "--backbone", TINY_TIMM_NAME, "--weights", str(tiny_timm_weights)]
    argv += ["--size", "64", "--upsampler", "bilinear", "--batch-size", "2", "--workers", "0"]
    argv += ["--out", str(out)]
    code = KILL_MID_WRITE.format(kill_at=6, argv=argv)
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    done = sorted(out.glob("*.safetensors"))
    temps = [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(done) == 5 and len(temps) == 1, (done, temps)
    for path in done:
        assert load_features(path)[0].shape == (192, 8, 8)
    assert main(argv) == 0
    assert len(list(out.glob("*.safetensors"))) == 12
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_atomic_writes_get_normal_permissions(tmp_path):
    from featlift.fileio import save_json_atomic

    save_json_atomic({"a": 1}, tmp_path / "x.json")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_quiet_hides_the_progress_bar(tmp_path, tiny_timm_weights, image_tree, capsys):
    argv = [str(image_tree), "--upsampler", "bilinear", "--out"]
    assert extract(tmp_path, tiny_timm_weights, *argv, str(tmp_path / "quiet")) == 0  # extract() passes -q
    assert "img/s" not in capsys.readouterr().err
    loud = ["extract", *argv, str(tmp_path / "loud"), "--backbone", TINY_TIMM_NAME, "--size", "32x48"]
    assert main([*loud, "--weights", str(tiny_timm_weights), "--workers", "0"]) == 0
    assert "img/s" in capsys.readouterr().err


def test_a_method_registered_outside_featlift_with_its_own_option(tmp_path, tiny_timm_weights, image_tree):
    out = tmp_path / "out"
    args = [str(image_tree), "--upsampler", "toy-stretch", "--option", "factor=4", "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *args) == 0
    features, meta = load_features(out / "img 0.jpg.safetensors")
    assert features.shape == (192, 8, 12)  # the 2x3 grid of a 32x48 input, stretched 4 times
    assert meta["upsampler"] == "toy-stretch" and meta["upsampler_options"] == '{"factor": 4}'


def test_folder_extraction_guides_at_the_output_size_with_the_decoded_image(tmp_path, tiny_timm_weights):
    """The guide comes from the file's pixels, not from the 32x48 input: a 1-pixel checkerboard survives."""
    board = checkerboard(64, 96)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((board * 255).byte().permute(1, 2, 0).numpy()).save(folder / "board.png")
    out = tmp_path / "out"
    GuideRecorder.seen.clear()
    args = [str(folder), "--upsampler", "toy-guide-recorder", "--output-size", "64x96", "--out", str(out)]
    assert extract(tmp_path, tiny_timm_weights, *args) == 0
    assert load_features(out / "board.png.safetensors")[0].shape == (192, 64, 96)
    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    [guide] = GuideRecorder.seen
    torch.testing.assert_close(guide, backbone.normalize(board[None]))
