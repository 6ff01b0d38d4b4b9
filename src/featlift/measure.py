"""Wall time and peak memory of a block of code, on CPU (process RSS) or CUDA (max allocated)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

_PAGE_BYTES = 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0  # peak above the level at entry (CPU: RSS; CUDA: allocated)
    device: str = "cpu"

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class measure:
    """``with measure(device) as m: ...`` -> ``m.seconds``, ``m.peak_bytes``.

    On CPU a background thread samples RSS every `interval` seconds, so peaks shorter than that can be
    missed; on CUDA it uses ``torch.cuda.max_memory_allocated`` after a reset and synchronises.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.result = Measurement(device=str(self.device))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.result.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, current_rss_bytes())
            self.result.peak_bytes = max(0, self._peak - self._base)
