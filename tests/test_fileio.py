"""Atomic writes and the clean-up of temp files left by killed writers."""

import os
import subprocess
import sys
import time

from featlift.fileio import TEMP_SUFFIX, atomic_path, is_stale_temp_file, remove_stale_temp_files


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temp_file_of_a_dead_process_is_stale_and_removed(tmp_path):
    stale = tmp_path / f".a.safetensors.{_dead_pid()}.abcd{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    assert is_stale_temp_file(stale)
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists()


def test_temp_file_of_a_live_writer_is_kept(tmp_path):
    mine = tmp_path / f".a.safetensors.{os.getpid()}.abcd{TEMP_SUFFIX}"
    parent = tmp_path / f".b.safetensors.{os.getppid()}.abcd{TEMP_SUFFIX}"
    for path in (mine, parent):
        path.write_bytes(b"being written")
    assert remove_stale_temp_files(tmp_path) == []
    assert mine.exists() and parent.exists()


def test_untouched_temp_file_is_stale_even_if_its_pid_lives(tmp_path):
    """A writer on another host of a shared file system: its pid means nothing here, its age does."""
    old = tmp_path / f".a.safetensors.{os.getppid()}.abcd{TEMP_SUFFIX}"
    old.write_bytes(b"abandoned")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert remove_stale_temp_files(tmp_path) == [old]


def test_files_that_are_not_featlift_temps_are_left_alone(tmp_path):
    others = [tmp_path / ".hidden", tmp_path / f"visible.1.x{TEMP_SUFFIX}", tmp_path / "a.safetensors"]
    for path in others:
        path.write_bytes(b"user data")
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".c.json.{_dead_pid()}.abcd{TEMP_SUFFIX}"
    nested.write_bytes(b"half")
    assert remove_stale_temp_files(tmp_path) == []
    assert remove_stale_temp_files(tmp_path, recursive=True) == [nested]
    assert all(path.exists() for path in others)


def test_atomic_path_names_its_temp_after_the_writer_and_removes_it_on_error(tmp_path):
    target = tmp_path / "x.json"
    try:
        with atomic_path(target) as tmp:
            assert tmp.name.startswith(f".x.json.{os.getpid()}.") and tmp.name.endswith(TEMP_SUFFIX)
            assert not is_stale_temp_file(tmp)
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


_WRITE_ONE = """
import sys, torch
from featlift.fileio import save_safetensors_atomic
tensors = {f"t{i}": torch.arange(i + 3, dtype=torch.float32) for i in range(5)}
print(save_safetensors_atomic(tensors, sys.argv[1], {f"key{i}": str(i) for i in range(12)}))
"""


def test_equal_tensors_and_metadata_give_equal_bytes_in_every_process(tmp_path):
    # safetensors keeps metadata in a hash map: its order, so the bytes, changed with the process's hash seed
    from safetensors.torch import load_file, safe_open

    digests = set()
    for seed in ("1", "2"):
        path = tmp_path / f"seed{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _WRITE_ONE, str(path)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        digests.add((path.read_bytes(), done.stdout.strip()))
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {f"key{i}": str(i) for i in range(12)}
        assert load_file(str(path))["t4"].tolist() == list(range(7))
    assert len(digests) == 1
