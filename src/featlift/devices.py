"""Which devices featlift can compute on here, and the default one: every command's ``--device`` goes through this."""

from __future__ import annotations

import torch

from .errors import FeatliftError

ACCELERATORS = ("cuda", "mps", "xpu")  # device types whose torch module has is_available() and device_count()
DEVICE_CHOICES = "cpu, cuda, cuda:N, mps or xpu"


def available_devices() -> list[str]:
    """The devices this machine can run featlift on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    for kind in ACCELERATORS:
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [f"{kind}:{index}" for index in range(backend.device_count())]
    return found


def device_problem(name: str) -> str | None:
    """Why this machine cannot run featlift on device `name`, or None when it can."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"not a device name; expected {DEVICE_CHOICES}"
    if device.type == "cpu":
        return None
    have = f"this machine has {', '.join(available_devices())}"
    if device.type not in ACCELERATORS:
        return f"featlift cannot compute on {device.type!r} devices; expected {DEVICE_CHOICES} ({have})"
    backend = getattr(torch, device.type)
    if not backend.is_available():
        return f"{device.type} is not available on this machine ({have})"
    if device.index is not None and device.index >= backend.device_count():
        return f"no such {device.type} device ({have})"
    return None


def check_device(name: str) -> torch.device:
    """The torch device `name`, if this machine has it; `FeatliftError` naming the devices it has otherwise."""
    problem = device_problem(name)
    if problem:
        raise FeatliftError(f"--device {name}: {problem}")
    return torch.device(name)


def resolve_device(name: str | None) -> torch.device:
    """`name` checked by `check_device`, or by default cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)
