"""Two DDP processes on CPU (torchrun, gloo) train like one process with the same global batch.

Each rank takes its half of every global batch; BatchNorm statistics are all-reduced over the
global batch (`GlobalBatchNorm2d`), gradients are averaged by DDP and jitter is seeded by the slot
in the global batch, so the two runs differ only by float rounding: the same two runs in float64
agree to 1e-15, so any difference in float32 is rounding noise. Tolerances: 1e-5 on step losses,
1e-4 on the validation cosine, and on the weights see below.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torchrun_helpers import run_torchrun
from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

from featlift.cli import main
from featlift.train import distributed
from featlift.train.distributed import DistInfo, all_reduce_sum, setup_distributed

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`featlift` under ``torchrun --nproc-per-node 2`` (gloo) through `ddp_worker`."""
    return run_torchrun(WORKER, args, timeout, **env)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_single_process(tmp_path):
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "imgs", count=7, corrupt=False)
    options = ("--epochs", "2", "--batch-size", "4", "--val-fraction", "0.3", "--augment")
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"

    proc = torchrun(train_args(images, ddp_run, weights, *options))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with one_thread():
        assert main(train_args(images, single_run, weights, *options)) == 0

    ddp_log, single_log = read_log(ddp_run), read_log(single_run)
    assert ddp_log[0]["world_size"] == 2 and single_log[0]["world_size"] == 1
    ddp_steps = [r["loss"] for r in ddp_log if r["type"] == "step"]
    single_steps = [r["loss"] for r in single_log if r["type"] == "step"]
    assert len(ddp_steps) == len(single_steps) == 4
    assert max(abs(a - b) for a, b in zip(ddp_steps, single_steps, strict=True)) <= 1e-5
    ddp_epochs = [r for r in ddp_log if r["type"] == "epoch"]
    single_epochs = [r for r in single_log if r["type"] == "epoch"]
    for a, b in zip(ddp_epochs, single_epochs, strict=True):
        assert a["val_images"] == b["val_images"] == 2
        assert abs(a["val_cosine_lift"] - b["val_cosine_lift"]) <= 1e-4
        assert a["val_cosine_bilinear"] == b["val_cosine_bilinear"]
    ddp_weights = load_file(str(ddp_run / "model.safetensors"))
    single_weights = load_file(str(single_run / "model.safetensors"))
    diffs = torch.cat(
        [(ddp_weights[k].float() - v.float()).abs().flatten() for k, v in single_weights.items()]
    )
    # float32 rounding noise is amplified by training: BatchNorm's backward cancels nearly equal terms, and
    # Adam divides by sqrt(v), so a weight whose true gradient is 0 (a conv bias before BatchNorm) moves by up
    # to ~lr per step on rounding noise alone. Measured on torch 2.14.1 CPU: mean 4.6e-6, max 9.2e-4 (float64:
    # 5e-16), while a DDP with per-rank BatchNorm statistics or with jitter seeded by the local slot is off by
    # a mean of 1.3e-3 / 1.4e-3. The bounds sit between the two: 10x the noise, 25x below the smallest bug.
    assert diffs.mean() <= 5e-5
    assert diffs.max() <= 4 * 1e-3  # 4 steps of at most ~lr each


def test_rank_that_reads_none_of_its_images_skips_the_step_with_all_ranks(tmp_path):
    """Rank 1's whole first batch is unreadable: both ranks skip that step (it used to skip backward alone
    and leave rank 0 waiting in DDP's gradient all-reduce), then train on; every tensor handed to a
    torch.distributed collective is on the process group's device."""
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "imgs", count=7, corrupt=False)
    run, calls = tmp_path / "run", tmp_path / "collectives"
    options = ("--epochs", "2", "--batch-size", "4", "--val-fraction", "0.3")
    proc = torchrun(
        train_args(images, run, weights, *options),
        timeout=180,
        FEATLIFT_TEST_UNREADABLE="1:2",  # rank 1's share of the first global batch of 4
        FEATLIFT_TEST_COLLECTIVES=str(calls),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1 skipped on all 2 processes: none of this process's images could be read" in proc.stderr
    assert "step 1 skipped on all 2 processes: another process could read none of its images" in proc.stderr
    log = read_log(run)
    steps = [(r["epoch"], r["step"]) for r in log if r["type"] == "step"]
    assert steps == [(0, 1), (1, 0), (1, 1)]
    assert [r["unreadable_images"] for r in log if r["type"] == "epoch"] == [2, 0]
    for rank in (0, 1):
        recorded = json.loads(Path(f"{calls}.{rank}.json").read_text())
        assert len(recorded) > 10  # batch agreement, BatchNorm statistics, losses, validation, counts
        assert all(call["device"] == call["group_device"] == "cpu" for call in recorded), recorded


def test_collectives_run_on_the_process_group_device(monkeypatch):
    """Under nccl the group takes tensors on the rank's GPU only; the helpers move theirs there (simulated on
    CPU: the group's device is the meta device, and the collective records what it gets)."""
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: seen.append(tensor.device))
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("meta"))
    assert all_reduce_sum(torch.ones(3), info).device == torch.device("meta")
    assert seen == [torch.device("meta")]
    # one process: no collective at all, the tensor comes back as it is
    single = torch.ones(3)
    assert all_reduce_sum(single, DistInfo()) is single and len(seen) == 1


@pytest.mark.parametrize(
    ("device", "backend", "expected"), [("cuda", "nccl", "cuda:1"), ("cpu", "gloo", "cpu")]
)
def test_setup_distributed_names_the_collective_device(monkeypatch, device, backend, expected):
    started = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: started.append(backend))
    monkeypatch.setattr(dist, "get_backend", lambda *group: started[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    info = setup_distributed(torch.device(device))
    assert started == [backend] and info.device == torch.device(expected)
    assert distributed.rank_device(torch.device(device), info) == torch.device(expected)
