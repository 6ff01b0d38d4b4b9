"""One set of extraction settings per output folder, so that a folder never holds a mix of two.

The first ``extract`` run into a folder records its settings in ``OUT/featlift-extract.json``. The file
is created exclusively: of two runs that start at once, exactly one records its settings and the other
compares with them. A run with the same settings shares the folder (also while another one is
running); a run with other settings is refused before any work, naming each difference. With
``overwrite`` the new settings replace the old ones, but only if that run rewrites every output in the
folder; otherwise the outputs it does not rewrite would keep the old settings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FeatliftError
from .fileio import save_json_atomic

SETTINGS_FILE = "featlift-extract.json"
OUTPUT_SUFFIX = ".safetensors"


def _differences(recorded: dict[str, str], settings: dict[str, str]) -> str:
    keys = [*settings, *(key for key in recorded if key not in settings)]
    return ", ".join(
        f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now"
        for key in keys
        if recorded.get(key) != settings.get(key)
    )


def read_folder_settings(folder: str | os.PathLike) -> dict[str, str] | None:
    """The settings recorded in `folder`, or None if none are."""
    path = Path(folder) / SETTINGS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatliftError(f"{path}: cannot read the folder's extraction settings ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise FeatliftError(
            f"{path}: not a featlift extraction settings file (expected {{'settings': {{...}}}})"
        )
    return {str(k): str(v) for k, v in data["settings"].items()}


def _outputs_left_over(folder: Path, outputs: list[Path]) -> list[Path]:
    rewritten = set(outputs)
    return sorted(p for p in folder.rglob(f"*{OUTPUT_SUFFIX}") if p not in rewritten)


def claim_folder(folder: Path, settings: dict[str, str], outputs: list[Path], overwrite: bool) -> None:
    """Record `settings` as `folder`'s, or check them against the recorded ones (see the module docstring).

    `outputs` are the files this run will write; `overwrite` is whether it rewrites existing ones.
    """
    record = {"settings": settings}
    if save_json_atomic(record, folder / SETTINGS_FILE, exclusive=True):
        return
    recorded = read_folder_settings(folder)
    if recorded is None:  # removed since: try once more
        if save_json_atomic(record, folder / SETTINGS_FILE, exclusive=True):
            return
        recorded = read_folder_settings(folder) or {}
    if recorded == settings:
        return
    details = _differences(recorded, settings)
    if not overwrite:
        raise FeatliftError(
            f"{folder} holds features extracted with other settings ({details}); use another --out "
            f"folder, or --overwrite to re-extract all of them with the new settings"
        )
    left = _outputs_left_over(folder, outputs)
    if left:
        shown = ", ".join(str(p.relative_to(folder)) for p in left[:3])
        raise FeatliftError(
            f"{folder} holds features extracted with other settings ({details}), and {len(left)} of them "
            f"({shown}{', ...' if len(left) > 3 else ''}) are not inputs of this run, so --overwrite would "
            f"leave a mix of old and new settings; use another --out folder, or delete those files"
        )
    save_json_atomic(record, folder / SETTINGS_FILE)
