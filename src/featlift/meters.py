"""Wall time and peak memory of one call, measured apart: timing runs the call as it is, memory in its own call.

- `timed_call`: seconds of one call, with the device synchronised before and after;
- `peak_memory_mib`: the peak memory one call adds: ``torch.cuda.max_memory_allocated`` above the level
  before the call on CUDA; on CPU the peak of the tensor storages the call creates and holds at the same
  time (`TensorMemoryTracker`). Process RSS is no measure of one call: once warm-up has run, the allocator
  serves later calls from memory it already holds (see `featlift.process_memory` for a fresh process).

The tracker adds Python work to every op, so time calls without it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    """``(result, seconds)`` of one call of `fn`, with the device synchronised before and after."""
    device = torch.device(device)
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and alive at the same time.

    The CPU analogue of ``torch.cuda.max_memory_allocated``: it sees every op's outputs (views and
    in-place results share a storage and are counted once) and frees a storage's bytes when it dies.
    Scratch memory inside a kernel (e.g. attention workspaces) is not seen. Adds Python overhead per op,
    so time calls without it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()  # meta tensors count too: they have sizes but no data
            key, nbytes = id(storage), storage.nbytes()
            if nbytes == 0 or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_memory_mib(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak memory of one call of `fn`, in MiB: on CUDA max allocated above the level before the call;
    on CPU the peak of live tensors it creates (`TensorMemoryTracker`). The result of `fn` is dropped."""
    device = torch.device(device)
    with torch.inference_mode():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2**20
        with TensorMemoryTracker() as tracker:
            fn()
    return tracker.peak / 2**20
