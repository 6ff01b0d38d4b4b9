"""Batch feature extraction from image files to one ``.safetensors`` file per image.

Each output ``OUT/<relative path>.safetensors`` holds ``features`` ``[C, H, W]`` and string metadata
(backbone, fingerprint, layer, facet, upsampler and its weights' fingerprint, checkpoint, iters, input size, source). Files are
written atomically; outputs that already exist with the same settings are skipped, so a re-run
resumes an interrupted one. Unreadable images are reported and skipped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .errors import FeatliftError, ImageReadError
from .fileio import check_writable_dir, remove_stale_temp_files, save_safetensors_atomic
from .fingerprint import state_dict_fingerprint
from .images import ImageItem, image_to_tensor, load_image
from .inference import InferenceOptions, optimize_pipeline
from .pipeline import FeaturePipeline

logger = logging.getLogger(__name__)

# Metadata keys that must match for an existing output to count as already done.
# The checkpoint is identified by its weights, not its path, so moving it does not invalidate outputs.
SETTINGS_KEYS = (
    "backbone",
    "fingerprint",
    "layer",
    "facet",
    "upsampler",
    "upsampler_fingerprint",
    "iters",
    "input_size",
    "dtype",
    "amp",
)


@dataclass
class ExtractionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return f"{len(self.written)} written, {len(self.skipped)} already done, {len(self.failed)} failed"


def output_path(out_dir: Path, item: ImageItem) -> Path:
    return out_dir / f"{item.relative}.safetensors"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read one extracted file: ``features [C, H, W]`` and its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("features"), dict(handle.metadata() or {})


def pipeline_metadata(pipeline: FeaturePipeline, size: tuple[int, int], dtype: torch.dtype) -> dict[str, str]:
    backbone = pipeline.backbone
    upsampler = pipeline.upsampler
    return {
        "backbone": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "layer": str(backbone.layer),
        "facet": backbone.facet,
        "upsampler": upsampler.name if upsampler is not None else "none",
        "upsampler_fingerprint": state_dict_fingerprint(upsampler.state_dict(), upsampler.config())
        if upsampler is not None
        else "",
        "checkpoint": pipeline.checkpoint or "",
        "iters": str(pipeline.iters if upsampler is not None else 0),
        "input_size": f"{size[0]}x{size[1]}",
        "dtype": str(dtype).replace("torch.", ""),
        "featlift_version": __version__,
    }


class ImageFileDataset(Dataset):
    """Decodes and resizes images in worker processes; a failure becomes an error string, not an exception."""

    def __init__(self, items: list[ImageItem], size: tuple[int, int]):
        self.items = items
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            return index, image_to_tensor(load_image(self.items[index].path), self.size), None
        except ImageReadError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a decoder bug must not stop the whole run either
            return index, None, f"{self.items[index].path}: {type(exc).__name__}: {exc}"


def _collate(batch):
    ok = [(i, img) for i, img, err in batch if err is None]
    failed = [(i, err) for i, _, err in batch if err is not None]
    indices = [i for i, _ in ok]
    images = torch.stack([img for _, img in ok]) if ok else None
    return indices, images, failed


def _is_done(path: Path, settings: dict[str, str], overwrite: bool) -> bool:
    if not path.exists() or overwrite:
        return False
    try:
        existing = read_metadata(path)
    except (SafetensorError, OSError):
        return False  # unreadable leftover: extract again
    different = {k: (existing.get(k), settings[k]) for k in SETTINGS_KEYS if existing.get(k) != settings[k]}
    if different:
        details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in different.items())
        raise FeatliftError(
            f"{path} exists with other settings ({details}); use another --out folder or --overwrite"
        )
    return True


def extract_to_folder(
    pipeline: FeaturePipeline,
    items: list[ImageItem],
    out_dir: str | os.PathLike,
    *,
    size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    options: InferenceOptions | None = None,
    writer_threads: int = 1,
) -> ExtractionReport:
    """Extract features for `items` into `out_dir`; see the module docstring for the file format.

    `options` are the inference speed transforms (default: BatchNorm folded into the convolutions, which
    keeps outputs equal to float rounding; ``amp`` is recorded in the metadata since it changes them).
    With ``writer_threads >= 1`` files are written by background threads while the next batch is
    computed (and `workers` processes decode the next images), so decoding, compute and writing overlap.
    """
    pipeline.backbone.grid_size(*size)  # fail before any work if the size does not fit the patch
    out_dir = check_writable_dir(out_dir)
    options = options or InferenceOptions()
    settings = {**pipeline_metadata(pipeline, size, dtype), "amp": options.amp or "none"}
    report = ExtractionReport()
    outputs = [output_path(out_dir, item) for item in items]
    for folder in {path.parent for path in outputs}:
        remove_stale_temp_files(folder)
    todo = []
    for item, path in zip(items, outputs, strict=True):
        if _is_done(path, settings, overwrite):
            report.skipped.append(path)
        else:
            todo.append(item)
    if report.skipped:
        logger.info(
            "%d of %d outputs already exist with the same settings; skipping them",
            len(report.skipped),
            len(items),
        )
    if not todo:
        return report
    pipeline = optimize_pipeline(pipeline.to(device).eval(), options).to(device).eval()
    loader = DataLoader(
        ImageFileDataset(todo, size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=str(device).startswith("cuda"),
    )
    bar = tqdm(total=len(todo), unit="img", desc="extract", disable=not progress)

    write_failed = threading.Event()

    def write(indices: list[int], features: torch.Tensor) -> list[Path]:
        paths = []
        for index, feature in zip(indices, features, strict=True):
            if write_failed.is_set():  # an earlier write failed: write nothing more, as a serial run would
                return paths
            item = todo[index]
            path = output_path(out_dir, item)
            try:
                save_safetensors_atomic(
                    {"features": feature}, path, metadata={**settings, "source": str(item.path)}
                )
            except BaseException:
                write_failed.set()
                raise
            paths.append(path)
        return paths

    writer = (
        ThreadPoolExecutor(max_workers=writer_threads, thread_name_prefix="featlift-writer")
        if writer_threads > 0
        else None
    )
    pending: deque[tuple[Future, int]] = deque()

    def finish_oldest() -> None:
        future, count = pending.popleft()
        report.written.extend(future.result())
        bar.update(count)

    try:
        for indices, images, failed in loader:
            for index, message in failed:
                logger.warning("skipping unreadable image: %s", message)
                report.failed.append((todo[index].path, message))
            bar.update(len(failed))
            if images is None:
                continue
            features = pipeline(images.to(device, non_blocking=True)).to("cpu", dtype)
            if writer is None:
                report.written.extend(write(indices, features))
                bar.update(len(indices))
                continue
            pending.append((writer.submit(write, indices, features), len(indices)))
            while len(pending) > 2 * writer_threads:  # bound the features held in memory
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
        bar.close()
    return report
