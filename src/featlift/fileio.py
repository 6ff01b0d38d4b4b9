"""Atomic file writes: a reader never sees a half-written file, and an interrupted write leaves none.

A write that the file system refuses (full disk, quota, read-only, I/O error) raises `OutputWriteError`
naming the file and, for a full disk, the file system that is full.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .errors import FeatliftError, OutputWriteError

logger = logging.getLogger(__name__)


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".featlift-tmp"
STALE_TEMP_AGE_S = 3600.0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    With `exclusive`, the temp file is linked to `path` instead, which raises `FileExistsError` when
    `path` exists: of several writers, exactly one creates it, and nobody sees it half written.
    The temp name is ``.<name>.<pid>.<random>.featlift-tmp``: the writer's process id lets
    `remove_stale_temp_files` tell a file left by a killed process from one still being written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        if exclusive:
            _create_exclusively(tmp_path, path)
        else:
            os.replace(tmp_path, path)
    except OSError as exc:
        if exclusive and isinstance(exc, FileExistsError):
            raise
        raise write_error(path, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _create_exclusively(source: Path, path: Path) -> None:
    """Give `path` the content of `source`, raising `FileExistsError` if `path` exists.

    A hard link makes the whole file appear at once. File systems without hard links (FAT, exFAT, some
    network and FUSE mounts) get an ``O_EXCL`` create and a copy instead, still exclusive.
    """
    try:
        os.link(source, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(source.read_bytes())


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system that holds `path` (or would hold it, if it does not exist yet)."""
    path = Path(os.path.realpath(path))
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_error(path: Path, exc: OSError) -> OutputWriteError:
    """`exc`, raised while writing `path`, as an error that names the file and the reason."""
    if exc.errno == errno.ENOSPC:
        return OutputWriteError(f"no space left on {mount_point(path)} while writing {path}")
    if exc.errno == errno.EDQUOT:
        return OutputWriteError(f"disk quota exceeded on {mount_point(path)} while writing {path}")
    return OutputWriteError(f"cannot write {path}: {exc.strerror or exc}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def is_stale_temp_file(path: Path) -> bool:
    """True for an `atomic_path` temp file whose writer is gone.

    The writer is gone when its process no longer exists on this machine, or when the file has not
    been touched for `STALE_TEMP_AGE_S` (covers a writer on another host of a shared file system).
    """
    parts = path.name[: -len(TEMP_SUFFIX)].rsplit(".", 2)
    if not path.name.startswith(".") or not path.name.endswith(TEMP_SUFFIX) or len(parts) != 3:
        return False
    try:
        if time.time() - path.stat().st_mtime > STALE_TEMP_AGE_S:
            return True
    except FileNotFoundError:
        return False  # its writer just renamed or removed it
    return parts[1].isdigit() and int(parts[1]) != os.getpid() and not _process_alive(int(parts[1]))


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temp files that killed writers (e.g. ``kill -9``) left in `folder`; return them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"**/.*{TEMP_SUFFIX}" if recursive else f".*{TEMP_SUFFIX}"
    removed = []
    for candidate in folder.glob(pattern):
        if candidate.is_file() and is_stale_temp_file(candidate):
            logger.info("removing a temp file left by an interrupted run: %s", candidate)
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def canonical_safetensors(data: bytes) -> bytes:
    """The safetensors file `data` with its JSON header's keys sorted and compact, so equal tensors and metadata
    give equal bytes: safetensors keeps the metadata in a hash map, whose order changes from process to process.

    The header is padded with spaces to a multiple of 8 bytes, as safetensors does; the tensor bytes and their
    offsets (relative to the end of the header) are unchanged.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> str:
    """Write `tensors` to `path` atomically; return the SHA-256 (hex) of the bytes written."""
    # Serialised here and written by Python, so that a failed write is an OSError with its errno
    # (safetensors' own file writer reports it as a SafetensorError carrying only a message).
    data = canonical_safetensors(
        save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    )
    with atomic_path(path) as tmp:
        _write_bytes(tmp, data)
    return hashlib.sha256(data).hexdigest()


def save_json_atomic(data: Any, path: str | os.PathLike, exclusive: bool = False) -> bool:
    """Write `data` as JSON to `path`; with `exclusive`, only if no file is there. True if written."""
    try:
        with atomic_path(path, exclusive=exclusive) as tmp:
            _write_bytes(tmp, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
    except FileExistsError:
        if not exclusive:
            raise
        return False
    return True


def check_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and prove a file can be written there; raise a clear error otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".featlift-write-test-"):
            pass
    except OSError as exc:
        raise FeatliftError(f"{what} {path}: not writable ({exc.strerror or exc})") from exc
    return path
