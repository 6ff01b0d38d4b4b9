"""`featlift extract` across processes and machines launched by torchrun: sharding, agreement, manifest.

Launched by torchrun (``WORLD_SIZE`` in the environment, also ``WORLD_SIZE=1``), the run is one rank of
many:

- **Sharding.** Image ``i`` of the sorted input list (`featlift.images.collect_images`) goes to global
  rank ``i % world_size``. Every rank collects the same sorted list, so the shards are disjoint, cover
  every image and need no communication; strided shards differ by at most one image and mix every
  folder into every shard, so a folder of large or slow images does not land on one rank as a contiguous
  block would. Output names do not depend on the rank: ``OUT/<relative path>.safetensors`` as always.
  Every rank checks that all ranks found the same sorted list (`inputs_fingerprint`) before any work.
- **Writing.** Each rank runs `featlift.extract.extract_to_folder` on its shard, on the GPU of its
  ``LOCAL_RANK`` for a CUDA device: atomic writes, skipping outputs that are done (a re-run, with any
  number of ranks, extracts only what is missing) and the folder's one set of settings, as in one process.
  Rank 0 first removes the temp files that killed writers left (a writer on another host looks dead from
  here, so no rank removes them once any rank may be writing) and the previous run's manifest.
- **Manifest.** When every rank is done, rank 0 writes ``OUT/featlift-extract-manifest.json`` atomically
  (`write_manifest`): the folder's settings and, for every input image exactly once in input order, its
  output file and its status: ``ok`` (``computed`` true if written by this run, false if it was done
  already), ``skipped-unreadable`` (the image cannot be read: corrupt, broken link, name not UTF-8) or
  ``failed`` with the error (features not finite, or the rank stopped: its error names the rank). A rank
  that stops on an error still reports: its images not done are ``failed`` with that error, and after the
  manifest is written it raises the error (exit code 2 or 3); every other rank exits 1. A rank killed
  outright (``kill -9``, out of memory) cannot report: torchrun then stops the others, no manifest is
  written and the previous one is gone, so a manifest in the folder always describes a run that ended.
- **Waiting.** The ranks talk over gloo on the CPU whatever the device (they exchange only small Python
  objects), with a timeout of `DEFAULT_TIMEOUT_S` (``FEATLIFT_EXTRACT_TIMEOUT_S`` sets it): a rank that
  finishes its shard early waits for the slowest one, e.g. on a re-run where its shard was done already.

Without torchrun (no ``WORLD_SIZE``) `extract_on_every_rank` is `extract_to_folder`, and no manifest is
written: the folder is exactly as before.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import __version__
from .errors import FeatliftError, ImageReadError
from .extract import ExtractionReport, display_path, is_utf8_name, output_path
from .fileio import atomic_path, check_writable_dir, remove_stale_temp_files
from .folder_settings import read_folder_settings
from .images import ImageItem, load_image

MANIFEST_FILE = "featlift-extract-manifest.json"
MANIFEST_FORMAT = "featlift-extract-manifest"
MANIFEST_VERSION = 1
SHARDING = "image i of the sorted input list goes to rank i % world_size"
TIMEOUT_ENV = "FEATLIFT_EXTRACT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600.0
STATUS_OK = "ok"
STATUS_UNREADABLE = "skipped-unreadable"
STATUS_FAILED = "failed"


@dataclass(frozen=True)
class RankPlace:
    """Where this process stands in a torchrun launch: global rank, world size and rank on its machine."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise FeatliftError(
            f"environment variable {name}={value!r}: expected an integer (torchrun sets it)"
        ) from None


def rank_place() -> RankPlace:
    """This process's place from torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, checked."""
    world, rank, local = _env_int("WORLD_SIZE", "1"), _env_int("RANK", "0"), _env_int("LOCAL_RANK", "0")
    if world < 1 or not 0 <= rank < world or local < 0:
        raise FeatliftError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected WORLD_SIZE >= 1, "
            f"0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return RankPlace(rank=rank, world_size=world, local_rank=local)


def shard_indices(count: int, rank: int, world_size: int) -> range:
    """The positions in the sorted input list of the images rank `rank` of `world_size` extracts."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise FeatliftError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world size")
    return range(rank, count, world_size)


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise FeatliftError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def join_process_group(place: RankPlace) -> bool:
    """Join torchrun's group over gloo (CPU collectives, any device); True if this call started it."""
    if place.world_size == 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def rank_device(device: str | torch.device, place: RankPlace) -> torch.device:
    """A CUDA device becomes the GPU of this rank's ``LOCAL_RANK``; any other device is kept."""
    device = torch.device(device)
    return torch.device("cuda", place.local_rank) if device.type == "cuda" else device


def _from_main(value, place: RankPlace):
    """Rank 0's `value`, on every rank (a collective: every rank calls it at the same point)."""
    if place.world_size == 1:
        return value
    box = [value if place.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_every_rank(value, place: RankPlace) -> list:
    """Every rank's `value`, in rank order, on every rank (a collective)."""
    if place.world_size == 1:
        return [value]
    gathered = [None] * place.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def inputs_fingerprint(items: list[ImageItem]) -> str:
    """A digest of the sorted input list (each image's path and relative path): equal on ranks that see the
    same images."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(os.fsencode(item.path) + b"\0" + os.fsencode(item.relative) + b"\0")
    return digest.hexdigest()


def _check_same_inputs(items: list[ImageItem], place: RankPlace) -> None:
    """Refuse, on every rank, a run whose ranks found different image lists (the shards would not fit)."""
    seen = _from_every_rank((len(items), inputs_fingerprint(items)), place)
    other = [rank for rank, found in enumerate(seen) if found != seen[0]]
    if other:
        raise FeatliftError(
            f"the ranks found different input images (rank 0: {seen[0][0]} images, rank {other[0]}: "
            f"{seen[other[0]][0]}, or other paths); every machine must see the same INPUT paths with the same "
            "files, e.g. on a shared file system mounted at the same place"
        )


def _prepare_folder(out_dir: Path, outputs: list[Path]) -> None:
    """Rank 0, before any rank writes: the folder exists, killed writers' temp files and the old manifest go."""
    check_writable_dir(out_dir)
    for folder in sorted({path.parent for path in outputs}):
        remove_stale_temp_files(folder)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)


def _is_unreadable(item: ImageItem) -> bool:
    """True when the image cannot be read at all, as opposed to read but not extracted."""
    if not is_utf8_name(item.path):
        return True
    try:
        load_image(item.path)
    except ImageReadError:
        return True
    except Exception:  # a decoder bug: the image is not known to be unreadable
        return False
    return False


def shard_records(
    items: list[ImageItem],
    indices: range,
    outputs: list[Path],
    out_dir: Path,
    report: ExtractionReport,
    place: RankPlace,
    stopped: BaseException | None,
) -> list[tuple[int, dict]]:
    """``(position in the input list, manifest record)`` for each image of this rank's shard."""
    written, skipped = set(report.written), set(report.skipped)
    failed = dict(report.failed)
    records = []
    for index in indices:
        item, path = items[index], outputs[index]
        record = {"image": display_path(item.path), "output": display_path(path.relative_to(out_dir))}
        if path in written or path in skipped:
            record.update(status=STATUS_OK, computed=path in written)
        elif item.path in failed:
            unreadable = _is_unreadable(item)
            record.update(status=STATUS_UNREADABLE if unreadable else STATUS_FAILED, error=failed[item.path])
        else:
            reason = f"{type(stopped).__name__}: {stopped}" if stopped is not None else "no result"
            record.update(status=STATUS_FAILED, error=f"not extracted: rank {place.rank} stopped ({reason})")
        record["rank"] = place.rank
        records.append((index, record))
    return records


def merge_records(shards: list[list[tuple[int, dict]]], count: int) -> list[dict]:
    """The records of all ranks in input order; an error unless every image has exactly one."""
    by_index: dict[int, dict] = {}
    for shard in shards:
        for index, record in shard:
            if index in by_index:
                raise RuntimeError(f"image {index} ({record['image']}) was reported by two ranks")
            by_index[index] = record
    missing = [index for index in range(count) if index not in by_index]
    if missing or len(by_index) != count:
        raise RuntimeError(f"{len(missing)} images were reported by no rank (first: position {missing[:1]})")
    return [by_index[index] for index in range(count)]


def status_counts(records: list[dict]) -> dict[str, int]:
    counts = {STATUS_OK: 0, STATUS_UNREADABLE: 0, STATUS_FAILED: 0}
    for record in records:
        counts[record["status"]] += 1
    counts["computed"] = sum(bool(record.get("computed")) for record in records)
    return counts


def write_manifest(out_dir: Path, records: list[dict], world_size: int) -> Path:
    """``OUT/featlift-extract-manifest.json``, written atomically: one JSON object, one image per line."""
    header = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "featlift_version": __version__,
        "world_size": world_size,
        "sharding": SHARDING,
        "settings": read_folder_settings(out_dir) or {},
        "counts": status_counts(records),
    }
    lines = [f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}," for key, value in header.items()]
    images = ",\n".join(f"    {json.dumps(record, ensure_ascii=False)}" for record in records)
    text = "{\n" + "\n".join(lines) + '\n  "images": [\n' + images + ("\n" if records else "") + "  ]\n}\n"
    path = out_dir / MANIFEST_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest in `out_dir`, checked to be one."""
    path = Path(out_dir) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatliftError(f"{path}: no manifest (it is written when a torchrun extraction ends)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatliftError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise FeatliftError(
            f"{path}: not a featlift extraction manifest (expected format {MANIFEST_FORMAT!r})"
        )
    return data


def report_from_records(records: list[dict], out_dir: Path) -> ExtractionReport:
    """The whole run's report (every rank's images), as the command prints it and takes its exit code from."""
    report = ExtractionReport()
    for record in records:
        if record["status"] == STATUS_OK:
            (report.written if record["computed"] else report.skipped).append(out_dir / record["output"])
        else:
            report.failed.append((Path(record["image"]), record["error"]))
    return report


def extract_on_every_rank(
    extract: Callable[..., ExtractionReport],
    pipeline,
    items: list[ImageItem],
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **options,
) -> ExtractionReport:
    """`extract` (`featlift.extract.extract_to_folder`) for `items`; under torchrun, for this rank's shard.

    Under torchrun every rank returns the report of the whole run (so all exit with the same code), after
    rank 0 wrote the manifest; a rank whose extraction raised raises that error then. See the module
    docstring.
    """
    if not launched_by_torchrun():
        return extract(pipeline, items, out_dir, device=device, progress=progress, **options)
    place = rank_place()
    started = join_process_group(place)
    try:
        out_dir = Path(out_dir)
        outputs = [output_path(out_dir, item) for item in items]
        _check_same_inputs(items, place)
        problem = None
        if place.is_main:
            try:
                _prepare_folder(out_dir, outputs)
            except (FeatliftError, OSError) as exc:
                problem = str(exc)
        problem = _from_main(problem, place)  # also the barrier: no rank writes before the folder is ready
        if problem is not None:
            raise FeatliftError(
                problem if place.is_main else f"rank 0 could not prepare {out_dir}: {problem}"
            )
        indices = shard_indices(len(items), place.rank, place.world_size)
        report, stopped = ExtractionReport(), None
        try:
            extract(
                pipeline,
                [items[index] for index in indices],
                out_dir,
                device=rank_device(device, place),
                progress=progress and place.is_main,
                folder_outputs=outputs,
                remove_stale_temps=False,
                report=report,
                **options,
            )
        except Exception as exc:  # reported in the manifest and raised below, once every rank is done
            stopped = exc
        shards = _from_every_rank(
            shard_records(items, indices, outputs, out_dir, report, place, stopped), place
        )
        records = merge_records(shards, len(items))
        problem = None
        if place.is_main:
            try:
                write_manifest(out_dir, records, place.world_size)
            except FeatliftError as exc:
                problem = str(exc)
        problem = _from_main(problem, place)  # no rank exits (which makes torchrun stop the rest) before this
        if stopped is not None:
            raise stopped
        if problem is not None:
            raise FeatliftError(f"the manifest could not be written: {problem}")
        return report_from_records(records, out_dir)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def is_main_rank() -> bool:
    """False on every rank but 0 of a torchrun launch (they leave printing the whole run's summary to it)."""
    return not launched_by_torchrun() or rank_place().is_main
