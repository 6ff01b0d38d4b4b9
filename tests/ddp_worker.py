"""torchrun entry point of the DDP tests: the `featlift` CLI with test-only instrumentation, set by environment.

- ``FEATLIFT_TEST_COLLECTIVES=PATH``: wraps torch.distributed's collectives; each rank writes to
  ``PATH.<rank>.json`` the name and device of every tensor it hands them, and the device its process group
  takes (nccl: the GPU of ``LOCAL_RANK``, which accepts CUDA tensors only; gloo: the CPU).
- ``FEATLIFT_TEST_UNREADABLE=RANK:COUNT``: on rank RANK the first COUNT image loads fail as a corrupt file
  does (the file changed after the scan), so that rank's whole first local batch is unreadable.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
import torch.distributed as dist

from featlift.cli import main
from featlift.errors import ImageReadError
from featlift.train import batches

RANK = int(os.environ.get("RANK", "0"))


def _group_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if dist.get_backend() == "nccl" else "cpu"


def record_collectives(path: str) -> None:
    calls: list[dict[str, str]] = []
    for name in (
        "all_reduce",
        "broadcast",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce",
    ):
        original = getattr(dist, name)

        def wrapped(tensor, *args, _original=original, _name=name, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            for t in tensors:
                calls.append({"op": _name, "device": str(t.device), "group_device": _group_device()})
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, wrapped)
    atexit.register(lambda: open(f"{path}.{RANK}.json", "w").write(json.dumps(calls)))


def fail_first_loads(rank: int, count: int) -> None:
    if RANK != rank:
        return
    original, failures = batches.load_views, [count]

    def load_views(image, views, image_size, seed):
        if failures[0] > 0:
            failures[0] -= 1
            raise ImageReadError(f"{image.path}: cannot decode image (made unreadable by the test)")
        return original(image, views, image_size, seed)

    batches.load_views = load_views


if __name__ == "__main__":
    if os.environ.get("FEATLIFT_TEST_COLLECTIVES"):
        record_collectives(os.environ["FEATLIFT_TEST_COLLECTIVES"])
    if os.environ.get("FEATLIFT_TEST_UNREADABLE"):
        rank, count = os.environ["FEATLIFT_TEST_UNREADABLE"].split(":")
        fail_first_loads(int(rank), int(count))
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
