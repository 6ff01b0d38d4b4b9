"""`--device` is checked when the command line is parsed: a device this machine lacks is refused, naming those it has."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TIMM_NAME

from featlift.cli import main
from featlift.devices import resolve_device


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def no_accelerators(monkeypatch):
    for kind in ("cuda", "mps", "xpu"):
        monkeypatch.setattr(getattr(torch, kind), "is_available", lambda: False)


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "in", "--out", "out"],
        ["train", "in", "--out", "out"],
        ["bench"],
        ["eval", "davis", "--data", "d"],
        ["viz", "similarity", "x.jpg", "--point", "1,1", "--out", "x.png"],
    ],
)
@pytest.mark.parametrize(
    "device, message",
    [
        (
            "meta",
            "argument --device: meta: featlift cannot compute on 'meta' devices; expected cpu, cuda, cuda:N",
        ),
        ("mps", "argument --device: mps: mps is not available on this machine (this machine has cpu)"),
        ("cuda:1", "argument --device: cuda:1: cuda is not available on this machine (this machine has cpu)"),
        ("gpu", "argument --device: gpu: not a device name; expected cpu, cuda, cuda:N, mps or xpu"),
    ],
)
def test_every_command_refuses_an_unavailable_device_before_any_work(
    command, device, message, capsys, monkeypatch
):
    no_accelerators(monkeypatch)
    err = parse_error(["-q", *command, "--backbone", TINY_TIMM_NAME, "--device", device], capsys)
    assert message in err


def test_a_cuda_index_beyond_the_device_count_is_refused(capsys, monkeypatch):
    no_accelerators(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = parse_error(["extract", "in", "--out", "out", "--device", "cuda:2"], capsys)
    assert "argument --device: cuda:2: no such cuda device (this machine has cpu, cuda:0, cuda:1)" in err
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_the_python_api_gets_the_same_check(monkeypatch):
    no_accelerators(monkeypatch)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(Exception, match="--device meta: featlift cannot compute on 'meta' devices"):
        resolve_device("meta")
