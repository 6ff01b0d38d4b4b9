"""kill -9 in the middle of an epoch, then --resume: the result equals an uninterrupted run.

Data order and jitter depend only on (seed, epoch, step), the optimizer state is in every epoch
checkpoint, and backbone features always pass through the cache dtype, so the resumed run repeats
the lost steps exactly. Tolerance: 1e-6 absolute on every weight and step loss (on CPU it is exact).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from train_helpers import one_thread, save_tiny_weights, train_args, write_image_tree

from featlift.cli import main
from featlift.train.state import load_state

KILL_AT_STEP = 5  # 3 steps per epoch: the 5th optimizer step is the 2nd step of epoch 2

KILLER = """
import os, signal, sys, torch
from featlift.cli import main
original, calls = torch.optim.Adam.step, [0]
def step(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)
torch.optim.Adam.step = step
sys.exit(main({argv!r}))
"""


def steps(run: Path) -> list[tuple[int, int, float]]:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["loss"]) for r in records if r["type"] == "step"]


def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    weights = save_tiny_weights(tmp_path / "tiny.safetensors")
    images = write_image_tree(tmp_path / "imgs", count=6, corrupt=False)
    options = ("--epochs", "3", "--val-fraction", "0.2", "--augment", "--seed", "3")

    with one_thread():
        assert main(train_args(images, tmp_path / "straight", weights, *options)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = KILLER.format(kill_at=KILL_AT_STEP, argv=train_args(images, killed, weights, *options))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_state(killed)["epoch"] == 1  # epoch 1 done, epoch 2 cut after one step
    assert len(steps(killed)) == 4

    with one_thread():
        assert main([*train_args(images, killed, weights, *options), "--resume"]) == 0

    expected, got = steps(tmp_path / "straight"), steps(killed)
    assert [s[:2] for s in got] == [s[:2] for s in expected] == [(e, s) for e in range(3) for s in range(3)]
    for (_, _, a), (_, _, b) in zip(expected, got, strict=True):
        assert abs(a - b) <= 1e-6
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(killed / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.allclose(straight[key].float(), resumed[key].float(), atol=1e-6, rtol=0), key
    # the fitted output scale too: the resumed run refits it from the same weights and held-out images
    scales = [
        json.loads((run / "config.json").read_text())["upsampler"]["args"]["output_scale"]
        for run in (tmp_path / "straight", killed)
    ]
    assert scales[0] != 1.0 and abs(scales[0] - scales[1]) <= 1e-5
