"""DDP setup from torchrun's environment: gloo on CPU, nccl on CUDA; a no-op for one process.

Every collective of the training loop goes through the helpers here, which hand `torch.distributed`
tensors on the process group's device (``DistInfo.device``: the rank's GPU under nccl, which accepts
CUDA tensors only; the CPU under gloo) whatever device the caller's tensor is on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        initialized_here = True
        logger.info("DDP: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        initialized_here=initialized_here,
        device=collective_device(local_rank),
    )


def collective_device(local_rank: int) -> torch.device:
    """The device the initialized default process group takes tensors on: nccl the GPU of the local
    rank, any other backend (gloo) the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under DDP on CUDA each process uses the GPU of its local rank."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `tensor` over all ranks (`tensor` itself for one process), on the process group's device
    (a copy when `tensor` is elsewhere; read it with ``.tolist()`` or ``float``)."""
    if info.enabled:
        tensor = tensor.to(info.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_agree(ok: bool, info: DistInfo) -> bool:
    """True on every rank when `ok` is true on every rank, else False on every rank: a collective, so
    every rank must call it at the same point (e.g. before a step that only some ranks could take)."""
    if not info.enabled:
        return ok
    failing = all_reduce_sum(torch.tensor([0.0 if ok else 1.0]), info)
    return float(failing) == 0.0


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all DDP ranks, on any device.

    `nn.SyncBatchNorm` only runs on accelerators; this one all-reduces per-channel sums and sums of
    squares with the autograd-aware ``torch.distributed.nn.functional.all_reduce`` (gloo works), so
    DDP over N CPU processes trains like one process with the same global batch. Same parameters and
    buffers as BatchNorm2d, so state dicts are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        dims = (0, 2, 3)
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        packed = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = packed[-1]
        mean = packed[:channels] / total
        var = (packed[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp_min(1), momentum)
        out = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


def use_global_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm2d in `module` a `GlobalBatchNorm2d`, in place (parameters and buffers kept)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = GlobalBatchNorm2d
    return module
