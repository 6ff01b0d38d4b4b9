"""The one description of the machine a measurement ran on, recorded in every results and benchmark file."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from . import __version__


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions (featlift, torch, Python), CPU, threads, the device (and its GPU name), UTC date, load average."""
    info: dict[str, Any] = {
        "featlift": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info
