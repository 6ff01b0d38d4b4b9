"""`featlift extract` under torchrun (2 CPU processes, gloo) writes what one process writes, byte for byte.

This file is also the torchrun worker (``python -m torch.distributed.run ... THIS_FILE extract ...``): run as a
script, it is the `featlift` CLI with test-only instrumentation set by environment:

- ``FEATLIFT_TEST_RECORD=PATH``: each rank appends to ``PATH.<rank>`` the output of every file it writes, and
  writes its exit code to ``PATH.<rank>.exit``;
- ``FEATLIFT_TEST_FAIL_WRITE=TEXT``: writing an output whose path contains TEXT fails as an I/O error does;
- ``FEATLIFT_TEST_KILL_WRITE=TEXT``: writing such an output kills the rank outright (``os._exit``, as ``kill -9``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrun_helpers import run_torchrun

import featlift.extract
from featlift.cli import main
from featlift.errors import FeatliftError, OutputWriteError
from featlift.extract_distributed import (
    MANIFEST_FILE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_UNREADABLE,
    merge_records,
    rank_place,
    read_manifest,
    shard_indices,
    timeout_s,
)
from featlift.folder_settings import SETTINGS_FILE

TINY_NAME = "vit_tiny_patch16_224"
IMAGES = 7  # readable images, plus one corrupt file


def _instrument(record: str | None, fail: str | None, kill: str | None) -> None:
    original = featlift.extract.save_safetensors_atomic
    rank = os.environ.get("RANK", "0")

    def save(tensors, path, metadata=None):
        if kill and kill in str(path):
            os._exit(9)
        if fail and fail in str(path):
            raise OutputWriteError(f"cannot write {path}: Input/output error (made to fail by the test)")
        digest = original(tensors, path, metadata)
        if record:
            with open(f"{record}.{rank}", "a") as log:
                log.write(f"{path}\n")
        return digest

    featlift.extract.save_safetensors_atomic = save


if __name__ == "__main__":
    record = os.environ.get("FEATLIFT_TEST_RECORD")
    _instrument(
        record, os.environ.get("FEATLIFT_TEST_FAIL_WRITE"), os.environ.get("FEATLIFT_TEST_KILL_WRITE")
    )
    torch.set_num_threads(1)
    code = main(sys.argv[1:])
    if record:
        Path(f"{record}.{os.environ.get('RANK', '0')}.exit").write_text(str(code))
    sys.exit(code)


def torchrun(argv: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """This file as the worker of ``torchrun --standalone --nproc-per-node 2``; a hang fails after `timeout`."""
    return run_torchrun(__file__, argv, timeout, **env)


def extract_argv(images: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "extract",
        str(images),
        "--backbone",
        TINY_NAME,
        "--weights",
        str(weights),
        "--upsampler",
        "bilinear",
        "--size",
        "32x48",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def write_image_tree(root: Path) -> Path:
    """`IMAGES` small images in nested folders with odd names, and one corrupt .jpg (sorted among them)."""
    from train_helpers import write_image_tree as write_tree

    return write_tree(root, count=IMAGES, corrupt=True)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` but the manifest, by relative path: its bytes (featlift writes safetensors headers
    with sorted keys, so equal outputs are equal bytes whichever process wrote them)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def recorded(record: Path, what: str = "") -> list[str]:
    """The outputs written (what="") or the exit codes (what=".exit") of both ranks."""
    found = []
    for rank in (0, 1):
        path = Path(f"{record}.{rank}{what}")
        found += path.read_text().splitlines() if path.exists() else []
    return found


def run_in_process(argv: list[str], monkeypatch, world_size: str | None = None) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with monkeypatch.context() as env:
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.delenv(name, raising=False)
        if world_size is not None:
            env.setenv("WORLD_SIZE", world_size)
        try:
            return main(argv)
        finally:
            torch.set_num_threads(before)


def without_rank(manifest: dict) -> dict:
    images = [{k: v for k, v in record.items() if k != "rank"} for record in manifest["images"]]
    return {**{k: v for k, v in manifest.items() if k != "world_size"}, "images": images}


@pytest.fixture
def weights(tmp_path):
    from train_helpers import save_tiny_weights

    return save_tiny_weights(tmp_path / "tiny.safetensors")


def test_two_ranks_write_the_bytes_one_process_writes(tmp_path, weights, monkeypatch):
    images = write_image_tree(tmp_path / "imgs")
    single, ranked, record = tmp_path / "single", tmp_path / "ranked", tmp_path / "record"
    # --batch-size 1 in the reference: the features of an image are then computed alone in both runs, so
    # bit-identity cannot come from the two runs happening to batch the same images together
    assert run_in_process(extract_argv(images, single, weights, "--batch-size", "1"), monkeypatch) == 1
    assert not (single / MANIFEST_FILE).exists()  # without torchrun: the folder is as it always was

    proc = torchrun(extract_argv(images, ranked, weights), FEATLIFT_TEST_RECORD=str(record))
    assert proc.returncode != 0, proc.stderr[-3000:]  # the corrupt image: exit code 1 on every rank
    assert recorded(record, ".exit") == ["1", "1"], proc.stderr[-3000:]

    expected, got = folder_bytes(single), folder_bytes(ranked)
    assert len(expected) == IMAGES + 1  # the features and the folder's settings file
    assert SETTINGS_FILE in got and sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []

    written = recorded(record)
    assert len(written) == len(set(written)) == IMAGES  # every output written once, by one rank
    per_rank = [len(Path(f"{record}.{rank}").read_text().splitlines()) for rank in (0, 1)]
    assert sorted(per_rank) == [3, 4]  # 8 inputs, strided: 4 each, the corrupt one on one of them

    manifest = read_manifest(ranked)
    assert manifest["world_size"] == 2
    statuses = [record["status"] for record in manifest["images"]]
    assert statuses.count(STATUS_OK) == IMAGES and statuses.count(STATUS_UNREADABLE) == 1
    assert [record["rank"] for record in manifest["images"]] == [i % 2 for i in range(IMAGES + 1)]
    assert all(record["computed"] for record in manifest["images"] if record["status"] == STATUS_OK)
    broken = next(record for record in manifest["images"] if record["status"] == STATUS_UNREADABLE)
    assert broken["image"].endswith("broken image.jpg") and "broken image.jpg" in broken["error"]
    assert manifest["settings"] == json.loads((ranked / SETTINGS_FILE).read_text())["settings"]
    assert manifest["counts"] == {"ok": IMAGES, "skipped-unreadable": 1, "failed": 0, "computed": IMAGES}
    # one process launched as torchrun's only rank (WORLD_SIZE=1) writes the same manifest but for the ranks
    alone = tmp_path / "alone"
    assert run_in_process(extract_argv(images, alone, weights), monkeypatch, world_size="1") == 1
    assert without_rank(read_manifest(alone)) == without_rank(manifest)


def clear(record: Path) -> None:
    for rank in (0, 1):
        for what in ("", ".exit"):
            Path(f"{record}.{rank}{what}").unlink(missing_ok=True)


def test_failed_then_killed_rank_and_a_rerun_writes_only_the_missing(tmp_path, weights, monkeypatch):
    """Sorted inputs and their ranks: img 0's (0), img 3's (1), img 6's (0), sub dir/broken image (1),
    sub dir/img 1's (0), sub dir/img 4's (1), it's deeper/img 2's (0), it's deeper/img 5's (1)."""
    images = write_image_tree(tmp_path / "imgs")
    out, record = tmp_path / "out", tmp_path / "record"
    argv = extract_argv(images, out, weights)
    # 1. writing img 1's fails on rank 0: it stops, img 2's (its last image) is never reached; rank 1 finishes
    proc = torchrun(argv, FEATLIFT_TEST_RECORD=str(record), FEATLIFT_TEST_FAIL_WRITE="img 1's")
    assert proc.returncode != 0
    manifest = read_manifest(out)
    names = [record["image"] for record in manifest["images"]]
    assert len(names) == len(set(names)) == IMAGES + 1  # every image exactly once
    failed = {Path(r["output"]).name: r for r in manifest["images"] if r["status"] == STATUS_FAILED}
    assert sorted(failed) == ["img 1's.png.safetensors", "img 2's.webp.safetensors"]
    assert all(r["rank"] == 0 and "rank 0 stopped (OutputWriteError" in r["error"] for r in failed.values())
    assert "made to fail by the test" in failed["img 1's.png.safetensors"]["error"]
    assert [Path(f"{record}.{rank}.exit").read_text() for rank in (0, 1)] == ["2", "1"]  # write error; inputs
    assert len(recorded(record)) == IMAGES - 2 and not any((out / name).exists() for name in failed)
    assert manifest["counts"] == {"ok": 5, "skipped-unreadable": 1, "failed": 2, "computed": 5}

    # 2. the re-run is killed (as by kill -9) while rank 0 writes img 2's: no manifest, the old one removed
    clear(record)
    proc = torchrun(argv, FEATLIFT_TEST_RECORD=str(record), FEATLIFT_TEST_KILL_WRITE="img 2's")
    assert proc.returncode != 0 and not Path(f"{record}.0.exit").exists()
    assert not (out / MANIFEST_FILE).exists()
    assert [Path(p).name for p in recorded(record)] == ["img 1's.png.safetensors"]

    # 3. the same command completes only what is missing
    clear(record)
    proc = torchrun(argv, FEATLIFT_TEST_RECORD=str(record))
    assert recorded(record, ".exit") == ["1", "1"], proc.stderr[-3000:]  # only the corrupt image fails now
    assert [Path(p).name for p in recorded(record)] == ["img 2's.webp.safetensors"]
    manifest = read_manifest(out)
    assert manifest["counts"] == {"ok": IMAGES, "skipped-unreadable": 1, "failed": 0, "computed": 1}
    assert [Path(r["output"]).name for r in manifest["images"] if r.get("computed")] == [
        "img 2's.webp.safetensors"
    ]

    reference = tmp_path / "reference"
    assert run_in_process(extract_argv(images, reference, weights, "--batch-size", "1"), monkeypatch) == 1
    assert folder_bytes(out) == folder_bytes(reference)


def test_one_rank_in_process_failure_manifest_and_rerun(tmp_path, weights, monkeypatch, capsys):
    """torchrun's only rank (WORLD_SIZE=1, no process group), in this process: the same manifest logic, fast.
    Sorted inputs: img 0's, img 3's, img 6's, broken, img 1's, img 4's, img 2's, img 5's; batches of 2."""
    images = write_image_tree(tmp_path / "imgs")
    out = tmp_path / "out"
    real_save, saved = featlift.extract.save_safetensors_atomic, []

    def save(tensors, path, metadata=None):
        if fail_on and fail_on in str(path):
            raise OutputWriteError(f"cannot write {path}: Input/output error (made to fail by the test)")
        saved.append(Path(path).name)
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(featlift.extract, "save_safetensors_atomic", save)
    fail_on = "img 1's"
    assert run_in_process(extract_argv(images, out, weights), monkeypatch, world_size="1") == 2
    assert "made to fail by the test" in capsys.readouterr().err
    manifest = read_manifest(out)
    status = {Path(r["output"]).name.split(".")[0]: r["status"] for r in manifest["images"]}
    assert status == {
        "img 0's": STATUS_OK,
        "img 3's": STATUS_OK,
        "img 6's": STATUS_OK,
        "broken image": STATUS_UNREADABLE,
        "img 1's": STATUS_FAILED,
        "img 4's": STATUS_FAILED,
        "img 2's": STATUS_FAILED,
        "img 5's": STATUS_FAILED,
    }
    assert manifest["counts"] == {"ok": 3, "skipped-unreadable": 1, "failed": 4, "computed": 3}
    assert sorted(saved) == ["img 0's.jpg.safetensors", "img 3's.jpg.safetensors", "img 6's.jpg.safetensors"]

    fail_on, saved[:] = None, []
    assert run_in_process(extract_argv(images, out, weights), monkeypatch, world_size="1") == 1
    printed = capsys.readouterr().out
    assert (
        "featlift extract: 4 written, 3 already done, 1 failed" in printed and "broken image.jpg" in printed
    )
    assert sorted(saved) == sorted(
        f"img {i}'s.{ext}.safetensors" for i, ext in ((1, "png"), (4, "png"), (2, "webp"), (5, "webp"))
    )
    manifest = read_manifest(out)
    assert manifest["counts"] == {"ok": IMAGES, "skipped-unreadable": 1, "failed": 0, "computed": 4}
    assert [r["computed"] for r in manifest["images"] if r["status"] == STATUS_OK] == [False] * 3 + [True] * 4


def test_without_torchrun_extract_is_called_as_before(tmp_path, monkeypatch):
    from featlift.extract_distributed import extract_on_every_rank

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    result = extract_on_every_rank(
        lambda *args, **kwargs: calls.append((args, kwargs)) or "report",
        "pipe",
        ["a"],
        tmp_path,
        device="cpu",
        size=(1, 1),
    )
    assert result == "report" and calls == [
        (("pipe", ["a"], tmp_path), {"device": "cpu", "progress": True, "size": (1, 1)})
    ]
    assert list(tmp_path.iterdir()) == []


def test_a_shard_overwriting_checks_the_outputs_of_every_rank(tmp_path, weights):
    """--overwrite with new settings must rewrite every output of the folder; a rank's shard is only part of
    the run's, so the check takes `folder_outputs`, the outputs of all ranks."""
    import featlift.extract_distributed as distributed
    from featlift import create_backbone
    from featlift.extract import extract_to_folder, output_path
    from featlift.images import collect_images
    from featlift.pipeline import FeaturePipeline, resolve_upsampler

    images = write_image_tree(tmp_path / "imgs")
    items, out = collect_images([images]), tmp_path / "out"
    backbone = create_backbone(TINY_NAME, weights=weights)
    upsampler, _ = resolve_upsampler(backbone, "bilinear", None, {})
    pipeline = FeaturePipeline(backbone, upsampler)
    kwargs = {"size": (32, 48), "progress": False, "writer_threads": 0}
    extract_to_folder(pipeline, items, out, **kwargs)
    shard, every = items[0::2], [output_path(out, item) for item in items]
    with pytest.raises(FeatliftError, match="are not inputs of this run"):
        extract_to_folder(pipeline, shard, out, dtype=torch.float16, overwrite=True, **kwargs)
    report = extract_to_folder(
        pipeline, shard, out, dtype=torch.float16, overwrite=True, folder_outputs=every, **kwargs
    )
    assert (
        len(report.written) == 4
        and json.loads((out / SETTINGS_FILE).read_text())["settings"]["dtype"] == "float16"
    )
    # a killed writer's temp file (its process is gone): a rank leaves it (it may be another host's writer,
    # alive), rank 0 removes it before any rank writes
    stale = out / ".img 0's.jpg.safetensors.999999999.abc.featlift-tmp"
    stale.write_bytes(b"half a file")
    extract_to_folder(pipeline, shard, out, dtype=torch.float16, remove_stale_temps=False, **kwargs)
    assert stale.exists()
    (out / MANIFEST_FILE).write_text("{}")
    distributed._prepare_folder(out, every)
    assert not stale.exists() and not (out / MANIFEST_FILE).exists()


@pytest.mark.parametrize(("count", "world"), [(8, 2), (7, 3), (2, 4), (0, 2), (10, 1)])
def test_shards_are_strided_disjoint_and_balanced(count, world):
    shards = [list(shard_indices(count, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(count))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(i % world == rank for rank, shard in enumerate(shards) for i in shard)


def test_bad_rank_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(FeatliftError, match=r"RANK=2, WORLD_SIZE=2.*0 <= RANK < WORLD_SIZE"):
        rank_place()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(FeatliftError, match="RANK='one': expected an integer"):
        rank_place()
    monkeypatch.setenv("FEATLIFT_EXTRACT_TIMEOUT_S", "-5")
    with pytest.raises(FeatliftError, match="FEATLIFT_EXTRACT_TIMEOUT_S='-5': expected a positive"):
        timeout_s()
    with pytest.raises(FeatliftError, match="rank 3 of world size 2"):
        shard_indices(4, 3, 2)


def test_merge_refuses_an_image_reported_twice_or_never():
    record = {"image": "a.jpg", "output": "a.jpg.safetensors", "status": STATUS_OK, "computed": True}
    assert merge_records([[(1, {**record, "image": "b"})], [(0, record)]], 2)[0] is record
    with pytest.raises(RuntimeError, match="reported by two ranks"):
        merge_records([[(0, record)], [(0, record)]], 1)
    with pytest.raises(RuntimeError, match="1 images were reported by no rank"):
        merge_records([[(0, record)], []], 2)


def test_ranks_that_found_other_images_are_refused(tmp_path, monkeypatch):
    import featlift.extract_distributed as distributed
    from featlift.extract_distributed import RankPlace, inputs_fingerprint
    from featlift.images import ImageItem

    items = [
        ImageItem(path=tmp_path / "a.jpg", relative=Path("a.jpg")),
        ImageItem(tmp_path / "b.jpg", Path("b.jpg")),
    ]
    place = RankPlace(rank=1, world_size=2, local_rank=1)
    assert inputs_fingerprint(items) != inputs_fingerprint(items[:1])
    assert inputs_fingerprint(items) != inputs_fingerprint(
        [items[0], ImageItem(tmp_path / "c.jpg", Path("b.jpg"))]
    )
    same = [(2, inputs_fingerprint(items))] * 2
    monkeypatch.setattr(distributed, "_from_every_rank", lambda value, place: same)
    distributed._check_same_inputs(items, place)
    other = [(2, inputs_fingerprint(items)), (1, inputs_fingerprint(items[:1]))]
    monkeypatch.setattr(distributed, "_from_every_rank", lambda value, place: other)
    with pytest.raises(FeatliftError, match="rank 0: 2 images, rank 1: 1, or other paths"):
        distributed._check_same_inputs(items, place)
