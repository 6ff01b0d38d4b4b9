"""Launching a test worker script under ``torchrun --standalone`` (gloo on CPU), failing cleanly on a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def run_torchrun(
    worker: str | Path, argv: list[str], timeout: float, processes: int = 2, **env: str
) -> subprocess.CompletedProcess:
    """`worker` with `argv` under ``torchrun --standalone --nproc-per-node PROCESSES``, one thread per rank.

    A run that hangs (e.g. ranks waiting on each other) fails the test after `timeout` seconds: torchrun is
    sent SIGTERM, on which it stops its workers (they run in sessions of their own, so killing torchrun's
    process group would not), and killed if it does not stop."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [*command, str(worker), *argv], env=env, text=True, stdout=stdout, stderr=stderr
        )
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            hung = True
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if hung:
        pytest.fail(f"torchrun did not finish in {timeout} s (ranks waiting on each other?): {err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
