"""Batch feature extraction from image files to one ``.safetensors`` file per image.

Each output ``OUT/<relative path>.safetensors`` holds ``features`` ``[C, H, W]`` and string metadata
(backbone, fingerprint, layer, facet, upsampler and its weights' fingerprint, checkpoint, upsampler options, input and
output size, source and its size and modification time). A backbone tapped at several layers records them
as ``layer`` ``"3,6,9,11"`` and ``layers_as``: with ``concat`` the file holds ``features`` with their
channels concatenated in layer order; with ``separate`` it holds one tensor per layer, ``features_layer3``,
``features_layer6``, ... (`load_layer_features`). Files are written atomically. An output that
exists with the same settings and was made from the image as it is now (same size and modification
time) is skipped, so a re-run resumes an interrupted one; an output of an image changed since is made
again. A folder holds one set of settings (`featlift.folder_settings`). An upsampler guided by the image
at the output size or at its own size (`FeaturePipeline.wants_sources`) gets the decoded image before the resize to
``size``; others get only the resized batch. Unreadable images, names that
are not UTF-8 and images whose features are not finite are reported and skipped; a run that would not
fit in memory is refused before it starts (`featlift.memory_estimate`).
"""

from __future__ import annotations

import json
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
from .errors import FeatliftError, ImageReadError, OutputWriteError
from .fileio import check_writable_dir, remove_stale_temp_files, save_safetensors_atomic
from .fingerprint import state_dict_fingerprint
from .folder_settings import OUTPUT_SUFFIX, claim_folder
from .images import ImageItem, image_to_tensor, load_image
from .memory_estimate import check_extraction_fits
from .pipeline import FeaturePipeline
from .speedups import InferenceOptions, optimize_pipeline

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
    "upsampler_options",
    "input_size",
    "output_size",
    "dtype",
    "amp",
    "layers_as",  # only in the outputs of several layers
)
# Metadata keys that identify the image an output was made from: a changed image is extracted again.
SOURCE_KEYS = ("source_size", "source_mtime_ns")


@dataclass
class ExtractionReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def fail(self, path: Path, message: str) -> None:
        logger.warning("skipping image: %s", message)
        self.failed.append((path, message))

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return f"{len(self.written)} written, {len(self.skipped)} already done, {len(self.failed)} failed"


def output_path(out_dir: Path, item: ImageItem) -> Path:
    """``out_dir/<item.relative>.safetensors``; an error if the relative path leads out of `out_dir`."""
    relative = Path(os.path.normpath(item.relative))
    if relative.is_absolute() or relative.parts[:1] in ((os.pardir,), (os.curdir,)):
        raise FeatliftError(
            f"{display_path(item.path)}: its relative path {display_path(item.relative)} would put its output "
            f"outside the output folder {out_dir}; outputs are only written inside it"
        )
    return out_dir / f"{relative}{OUTPUT_SUFFIX}"


def check_inside(out_dir: Path, outputs: list[Path]) -> None:
    """Refuse outputs whose folder, symlinks resolved, is not inside `out_dir` (a symlink placed in it)."""
    root = Path(os.path.realpath(out_dir))
    for folder in sorted({path.parent for path in outputs}):
        if not Path(os.path.realpath(folder)).is_relative_to(root):
            raise FeatliftError(
                f"{folder} leads through a symlink to {os.path.realpath(folder)}, outside the output folder "
                f"{out_dir}; outputs are only written inside it"
            )


def display_path(path: str | os.PathLike) -> str:
    """`path` as printable text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_name(path: str | os.PathLike) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def source_identity(path: Path) -> dict[str, str] | None:
    """Size and modification time of the image file (its symlink's target), or None if it cannot be read."""
    try:
        stat = path.stat()
    except (OSError, RuntimeError):  # missing, no permission, symlink loop
        return None
    return {"source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


LAYER_TENSOR = "features_layer{}"
"""The name of layer ``l``'s tensor in an output of several layers stored ``separate``."""


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read one extracted file: ``features [C, H, W]`` and its metadata."""
    with safe_open(str(path), framework="pt") as handle:
        if "features" not in handle.keys():
            raise FeatliftError(
                f"{path} holds no `features` tensor but {', '.join(sorted(handle.keys()))}: it was extracted with "
                "--layers-as separate; read it with featlift.extract.load_layer_features"
            )
        return handle.get_tensor("features"), dict(handle.metadata() or {})


def load_layer_features(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict[str, str]]:
    """Read one extracted file as layer -> ``[C_l, H, W]`` and its metadata: the tensors of an output stored
    ``separate``, or the ``features`` of one layer / of several concatenated, split by their channels."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        layers = [int(v) for v in metadata.get("layer", "").split(",") if v.strip().lstrip("-").isdigit()]
        names = set(handle.keys())
        if "features" not in names:
            missing = [layer for layer in layers if LAYER_TENSOR.format(layer) not in names]
            if not layers or missing:
                raise FeatliftError(
                    f"{path}: metadata layer {metadata.get('layer')!r} does not name its tensors "
                    f"{', '.join(sorted(names))}"
                )
            return {layer: handle.get_tensor(LAYER_TENSOR.format(layer)) for layer in layers}, metadata
        features = handle.get_tensor("features")
    if len(layers) <= 1:
        return {layers[0] if layers else 0: features}, metadata
    if features.shape[0] % len(layers):
        raise FeatliftError(
            f"{path}: {features.shape[0]} channels do not split evenly into layers {metadata['layer']}"
        )
    return dict(zip(layers, features.chunk(len(layers)), strict=True)), metadata


def pipeline_metadata(pipeline: FeaturePipeline, size: tuple[int, int], dtype: torch.dtype) -> dict[str, str]:
    backbone = pipeline.backbone
    upsampler = pipeline.upsampler
    return {
        "backbone": backbone.name,
        "fingerprint": backbone.fingerprint(),
        "layer": backbone.layer_label,
        "facet": backbone.facet,
        "upsampler": upsampler.name if upsampler is not None else "none",
        "upsampler_fingerprint": state_dict_fingerprint(upsampler.state_dict(), upsampler.config())
        if upsampler is not None
        else "",
        "checkpoint": pipeline.checkpoint or "",
        "upsampler_options": json.dumps(upsampler_options(upsampler), sort_keys=True),
        "input_size": f"{size[0]}x{size[1]}",
        "output_size": "x".join(map(str, pipeline.output_size)) if pipeline.output_size else "none",
        "dtype": str(dtype).replace("torch.", ""),
        "featlift_version": __version__,
        # several layers only, so outputs of one layer keep the metadata they had before
        **({"layers_as": backbone.layers_as} if len(backbone.layers) > 1 else {}),
    }


def upsampler_options(upsampler) -> dict:
    """The values of the options (``lift:iters=2``) an upsampler was built with; {} for none."""
    if upsampler is None:
        return {}
    return {name: getattr(upsampler, name, None) for name in upsampler.options}


class ImageFileDataset(Dataset):
    """Decodes and resizes images in worker processes; a failure becomes an error string, not an exception.

    With `keep_sources` each item also carries the decoded image at its own size, for a pipeline guided by
    it (`FeaturePipeline.wants_sources`); otherwise that slot is None.
    """

    def __init__(self, items: list[ImageItem], size: tuple[int, int], keep_sources: bool = False):
        self.items = items
        self.size = size
        self.keep_sources = keep_sources

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.items[index].path)
            source = image_to_tensor(image) if self.keep_sources else None
            return index, image_to_tensor(image, self.size), source, None
        except ImageReadError as exc:
            return index, None, None, str(exc)
        except Exception as exc:  # a decoder bug must not stop the whole run either
            return index, None, None, f"{self.items[index].path}: {type(exc).__name__}: {exc}"


def _collate(batch):
    """``(indices, images [B, 3, H, W] or None, sources (a list of [3, Hk, Wk]) or None, failed)``."""
    ok = [(i, img, src) for i, img, src, err in batch if err is None]
    failed = [(i, err) for i, _, _, err in batch if err is not None]
    indices = [i for i, _, _ in ok]
    images = torch.stack([img for _, img, _ in ok]) if ok else None
    sources = [src for _, _, src in ok] if ok and ok[0][2] is not None else None
    return indices, images, sources, failed


def _is_done(path: Path, settings: dict[str, str], source: dict[str, str] | None, overwrite: bool) -> bool:
    """True if `path` exists, made with `settings` from the image as it is now (`source`)."""
    if not path.exists() or overwrite:
        return False
    try:
        existing = read_metadata(path)
    except (SafetensorError, OSError):
        return False  # unreadable leftover: extract again
    different = {
        k: (existing.get(k), settings.get(k)) for k in SETTINGS_KEYS if existing.get(k) != settings.get(k)
    }
    if different:
        details = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in different.items())
        raise FeatliftError(
            f"{path} exists with other settings ({details}); use another --out folder or --overwrite"
        )
    return source is not None and all(existing.get(k) == source[k] for k in SOURCE_KEYS)


def output_tensors(pipeline: FeaturePipeline, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one output file: ``features``, or one tensor per layer when several are stored separate."""
    backbone = pipeline.backbone
    if len(backbone.layers) > 1 and backbone.layers_as == "separate":
        return {
            LAYER_TENSOR.format(layer): part.clone()
            for layer, part in backbone.split_layers(features).items()
        }
    return {"features": features}


def non_finite_message(item: ImageItem, stored: torch.Tensor, computed: torch.Tensor) -> str:
    nan, inf = int(stored.isnan().sum()), int(stored.isinf().sum())
    if computed.isfinite().all():
        cause = (
            f"the features exceed the range of {str(stored.dtype).replace('torch.', '')}; use --dtype float32"
        )
    else:
        cause = "check the image and the backbone and upsampler weights for NaN or infinite values"
    return (
        f"{display_path(item.path)}: features have {nan} NaN and {inf} infinite values "
        f"(of {stored.numel()}), not written; {cause}"
    )


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
    folder_outputs: list[Path] | None = None,
    remove_stale_temps: bool = True,
    report: ExtractionReport | None = None,
) -> ExtractionReport:
    """Extract features for `items` into `out_dir`; see the module docstring for the file format.

    `options` are the inference speed transforms (default: BatchNorm folded into the convolutions, which
    keeps outputs equal to float rounding; ``amp`` is recorded in the metadata since it changes them).
    With ``writer_threads >= 1`` files are written by background threads while the next batch is
    computed (and `workers` processes decode the next images), so decoding, compute and writing overlap.
    A failed write (e.g. a full disk) raises `OutputWriteError`; the files written before it are kept.

    For one rank of a sharded run (`featlift.extract_distributed`): `folder_outputs` are the outputs of
    every rank (checked by ``--overwrite``, default `items`' outputs), ``remove_stale_temps=False`` leaves
    temp files alone (the caller removed them before any rank started writing), and `report`, when
    given, is filled in place, so it holds what was done even when this raises.
    """
    pipeline.backbone.grid_size(*size)  # fail before any work if the size does not fit the patch
    out_dir = check_writable_dir(out_dir)
    options = options or InferenceOptions()
    settings = {**pipeline_metadata(pipeline, size, dtype), "amp": options.amp or "none"}
    report = report if report is not None else ExtractionReport()
    outputs = [output_path(out_dir, item) for item in items]
    check_inside(out_dir, outputs)
    for folder in {path.parent for path in outputs} if remove_stale_temps else ():
        remove_stale_temp_files(folder)
    todo: list[tuple[ImageItem, Path, dict[str, str]]] = []
    outdated = 0
    for item, path in zip(items, outputs, strict=True):
        if not is_utf8_name(item.path):
            report.fail(
                item.path, f"{display_path(item.path)}: file name is not valid UTF-8; rename the file"
            )
            continue
        source = source_identity(item.path)
        if _is_done(path, settings, source, overwrite):
            report.skipped.append(path)
            continue
        outdated += path.exists() and not overwrite
        todo.append((item, path, source or {}))
    if report.skipped:
        logger.info(
            "%d of %d outputs already exist with the same settings; skipping them",
            len(report.skipped),
            len(items),
        )
    if outdated:
        logger.info(
            "%d outputs are out of date (their image changed since, or the file is unreadable); "
            "extracting them again",
            outdated,
        )
    if todo:
        batches = -(-len(todo) // batch_size)
        converted = torch.device(device).type != "cpu" or dtype != torch.float32  # a copy on the host
        check_extraction_fits(
            pipeline,
            batch=min(batch_size, len(todo)),
            size=size,
            device=device,
            stored_dtype=dtype,
            held_batches=min(2 * writer_threads, batches - 1) + converted,
        )
    claim_folder(
        out_dir,
        {k: settings[k] for k in SETTINGS_KEYS if k in settings},
        outputs if folder_outputs is None else folder_outputs,
        overwrite,
    )
    if not todo:
        return report
    pipeline = optimize_pipeline(pipeline.to(device).eval(), options).to(device).eval()
    loader = DataLoader(
        ImageFileDataset([item for item, _, _ in todo], size, keep_sources=pipeline.wants_sources),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=str(device).startswith("cuda"),
    )
    bar = tqdm(total=len(todo), unit="img", desc="extract", disable=not progress)

    write_failed = threading.Event()

    def write(indices: list[int], features: torch.Tensor) -> None:
        for index, feature in zip(indices, features, strict=True):
            if write_failed.is_set():  # an earlier write failed: write nothing more, as a serial run would
                return
            item, path, source = todo[index]
            try:
                save_safetensors_atomic(
                    output_tensors(pipeline, feature),
                    path,
                    metadata={**settings, "source": str(item.path), **source},
                )
            except BaseException:
                write_failed.set()
                raise
            report.written.append(path)

    writer = (
        ThreadPoolExecutor(max_workers=writer_threads, thread_name_prefix="featlift-writer")
        if writer_threads > 0
        else None
    )
    pending: deque[tuple[Future, int]] = deque()

    def finish_oldest() -> None:
        future, count = pending.popleft()
        future.result()
        bar.update(count)

    try:
        for indices, images, sources, failed in loader:
            for index, message in failed:
                report.fail(todo[index][0].path, message)
            bar.update(len(failed))
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if sources is None:
                computed = pipeline(images)
            else:  # guided by the pixels before the resize
                computed = pipeline(images, [source.to(device, non_blocking=True) for source in sources])
            features = computed.to("cpu", dtype)
            low, high = torch.aminmax(features.flatten(1), dim=1)  # NaN propagates; no per-value mask
            finite = (low.isfinite() & high.isfinite()).tolist()
            if not all(finite):
                for position in [p for p, ok in enumerate(finite) if not ok]:
                    item = todo[indices[position]][0]
                    report.fail(item.path, non_finite_message(item, features[position], computed[position]))
                bar.update(finite.count(False))
                keep = [p for p, ok in enumerate(finite) if ok]
                indices, features = [indices[p] for p in keep], features[keep]
                if not keep:
                    continue
            if writer is None:
                write(indices, features)
                bar.update(len(indices))
                continue
            pending.append((writer.submit(write, indices, features), len(indices)))
            while len(pending) > 2 * writer_threads:  # bound the features held in memory
                finish_oldest()
        while pending:
            finish_oldest()
    except OutputWriteError as exc:
        raise OutputWriteError(
            f"{exc}; stopped after {report.summary()} (the files written are complete and kept; "
            "a re-run resumes)"
        ) from exc
    finally:
        if writer is not None:
            writer.shutdown(wait=True)
        bar.close()
    return report
