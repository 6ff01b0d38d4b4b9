"""featlift checkpoints on the Hugging Face Hub: ``hf-hub:ORG/NAME[@REVISION]``.

`download_checkpoint` fetches a checkpoint's two files (``config.json`` and ``model.safetensors``, nothing
else, so nothing is ever unpickled) with ``huggingface_hub.hf_hub_download`` into the hub's own cache and
checks that the weights are the ones ``config.json`` vouches for (its ``weights_sha256``). Both files come
from one commit: the second is fetched at the commit the first resolved to, so a push between the two
downloads cannot pair files of two commits. With ``HF_HUB_OFFLINE=1`` (read on every call, not only when
``huggingface_hub`` is imported) the files come from the cache alone.

`push_checkpoint` uploads a checkpoint folder and its model card in one commit through ``huggingface_hub.HfApi``.

``HF_ENDPOINT`` and ``HF_HUB_CACHE`` / ``HF_HOME`` are also read on every call, so a process can point featlift
at a mirror or another cache after ``huggingface_hub`` was imported.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint_config
from .errors import CheckpointError, FeatliftError

HUB_PREFIX = "hf-hub:"
CARD_FILE = "README.md"
# the hub's rule for a repo name: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubReference:
    """A checkpoint on the hub: ``repo_id`` (``ORG/NAME``) at ``revision`` (a branch, tag or commit; None: main)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def check_repo_id(repo_id: str, what: str = "repository") -> str:
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise FeatliftError(
            f"{what} {repo_id!r} is not a hub repository id: expected ORG/NAME (letters, digits, '-', '_', '.')"
        )
    return repo_id


def parse_hub_reference(text: str) -> HubReference:
    """``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` -> `HubReference` (`CheckpointError` if malformed)."""
    if not is_hub_reference(text):
        raise CheckpointError(
            f"checkpoint {text!r} is not a hub reference: expected {HUB_PREFIX}ORG/NAME[@REVISION]"
        )
    body = text[len(HUB_PREFIX) :]
    repo_id, at, revision = body.partition("@")
    if at and not revision:
        raise CheckpointError(
            f"checkpoint {text!r}: empty revision after '@': expected {HUB_PREFIX}ORG/NAME@REVISION "
            "(a branch, tag or commit hash)"
        )
    try:
        check_repo_id(repo_id)
    except FeatliftError as exc:
        raise CheckpointError(f"checkpoint {text!r}: {exc}") from exc
    return HubReference(repo_id, revision or None)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def hub_cache_dir() -> str | None:
    """The hub cache ``HF_HUB_CACHE`` / ``HF_HOME`` name now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def hub_endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def download_checkpoint(
    reference: str | HubReference,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
) -> Path:
    """Download (or find in the cache) the checkpoint at `reference`; return its local folder.

    The folder is the hub cache's snapshot of the commit (``.../snapshots/<commit>``) and holds
    ``config.json`` and ``model.safetensors``, verified: a config that does not parse or fit the schema, one
    that records no ``weights_sha256``, and weights whose SHA-256 differs from it raise `CheckpointError`
    naming the repository and the file (a corrupt weights file is removed from the cache, so the next try
    downloads it again). `offline` None follows ``HF_HUB_OFFLINE``.
    """
    ref = parse_hub_reference(reference) if isinstance(reference, str) else reference
    kwargs = {
        "cache_dir": str(cache_dir) if cache_dir is not None else hub_cache_dir(),
        "endpoint": endpoint or hub_endpoint(),
        "token": token,
        "local_files_only": hub_offline() if offline is None else offline,
    }
    config_path = _download_file(ref, CONFIG_FILE, ref.revision, **kwargs)
    snapshot = config_path.parent
    # the snapshot folder is named by the commit the revision resolved to: fetch the weights at that commit
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else ref.revision
    weights_path = _download_file(ref, WEIGHTS_FILE, commit, **kwargs)
    if weights_path.parent != snapshot:
        raise CheckpointError(
            f"{ref}: {CONFIG_FILE} and {WEIGHTS_FILE} were cached in two snapshots ({snapshot} and "
            f"{weights_path.parent}); clear this repository from the hub cache and try again"
        )
    verify_downloaded_checkpoint(ref, snapshot)
    return snapshot


def verify_downloaded_checkpoint(ref: HubReference, snapshot: Path) -> None:
    """Refuse a downloaded config that does not parse, records no weights hash, or does not vouch for the weights."""
    try:
        config = read_checkpoint_config(snapshot)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{ref}: {CONFIG_FILE} is not a valid featlift checkpoint config: {exc}"
        ) from exc
    if config.weights_sha256 is None:
        raise CheckpointError(
            f"{ref}: {CONFIG_FILE} records no weights_sha256, so the downloaded {WEIGHTS_FILE} cannot be "
            "verified; push the checkpoint again with a current featlift (`featlift push-to-hub`)"
        )
    weights_path = snapshot / WEIGHTS_FILE
    actual = file_sha256(weights_path)
    if actual != config.weights_sha256:
        _remove_cached_file(weights_path)
        raise CheckpointError(
            f"{ref}: the downloaded {WEIGHTS_FILE} has sha256 {actual}, but its {CONFIG_FILE} records "
            f"weights_sha256 {config.weights_sha256}: a corrupt download, or a repository whose two files come "
            "from different saves. The file was removed from the cache; try again, and if it persists, push the "
            "checkpoint again"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_cached_file(path: Path) -> None:
    """Remove a snapshot entry and the blob it links to (the hub cache stores files as blobs + symlinks)."""
    try:
        blob = path.resolve()
        path.unlink()
        if blob != path and blob.is_file():
            blob.unlink()
    except OSError:
        pass


def _download_file(ref: HubReference, filename: str, revision: str | None, **kwargs: Any) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (  # where every huggingface_hub version since 0.2x exports them
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = kwargs.get("endpoint") or "https://huggingface.co"
    try:
        return Path(hf_hub_download(ref.repo_id, filename, repo_type="model", revision=revision, **kwargs))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"{ref}: {ref.repo_id} on {endpoint} is gated: accept its conditions on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"{ref}: no repository {ref.repo_id} on {endpoint} (or it is private: log in with `hf auth login` "
            "or set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(
            f"{ref}: repository {ref.repo_id} has no revision {revision!r} (expected a branch, tag or commit)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        why = (
            "offline mode is on (HF_HUB_OFFLINE=1)"
            if kwargs.get("local_files_only")
            else f"{endpoint} cannot be reached"
        )
        raise CheckpointError(
            f"{ref}: {filename} is not in the hub cache ({kwargs.get('cache_dir') or 'the default cache'}) and "
            f"{why}: download it once while online"
        ) from exc
    except EntryNotFoundError as exc:
        raise CheckpointError(
            f"{ref}: repository {ref.repo_id} has no file {filename} at revision {revision or 'main'}: a featlift "
            f"checkpoint on the hub holds {CONFIG_FILE} and {WEIGHTS_FILE} (upload one with `featlift push-to-hub`)"
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{ref}: downloading {filename} from {endpoint} failed: {exc}") from exc
    except (OSError, ValueError) as exc:  # connection errors, bad cache folder, invalid revision strings
        raise CheckpointError(f"{ref}: downloading {filename} failed: {exc}") from exc


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: tuple[str, ...]


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    card: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> PushResult:
    """Upload ``config.json``, ``model.safetensors`` and `card` as ``README.md`` to `repo_id` in one commit.

    Creates the repository if it does not exist (`private` then makes it private; an existing one keeps its
    visibility) and the branch `revision` if it does not exist. `api` is a ``huggingface_hub.HfApi``
    (built from `endpoint` and `token` when None). Failures of the hub raise `FeatliftError` naming the repo.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HfHubHTTPError

    check_repo_id(repo_id)
    directory = Path(checkpoint_dir)
    api = api if api is not None else HfApi(endpoint=endpoint or hub_endpoint(), token=token)
    operations = [
        CommitOperationAdd(path_in_repo=CONFIG_FILE, path_or_fileobj=str(directory / CONFIG_FILE)),
        CommitOperationAdd(path_in_repo=WEIGHTS_FILE, path_or_fileobj=str(directory / WEIGHTS_FILE)),
        CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")),
    ]
    step = "creating the repository"
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision:
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = "uploading"
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"featlift push-to-hub: {directory.name}",
            repo_type="model",
            revision=revision,
        )
    except HfHubHTTPError as exc:
        raise FeatliftError(f"push to {repo_id}: {step} failed: {exc}") from exc
    except OSError as exc:  # connection errors
        raise FeatliftError(f"push to {repo_id}: {step} failed (cannot reach the hub: {exc})") from exc
    return PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        commit_url=str(getattr(info, "commit_url", info)),
        files=tuple(op.path_in_repo for op in operations),
    )
