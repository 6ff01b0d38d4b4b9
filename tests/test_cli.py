"""The exit codes of ``featlift``: each means one thing, so a script can tell a crash from a partial success."""

from __future__ import annotations

import pytest

from featlift import cli
from featlift.commands import extract as extract_command
from featlift.errors import FeatliftError


def _fail_with(monkeypatch, exc: BaseException) -> None:
    def run(args):
        raise exc

    monkeypatch.setattr(extract_command, "run", run)


def test_internal_error_has_its_own_exit_code_and_says_so(monkeypatch, capsys):
    _fail_with(monkeypatch, RuntimeError("boom"))
    assert cli.main(["extract", "x.jpg"]) == cli.EXIT_INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert "featlift extract: internal error (RuntimeError: boom)" in err and "bug" in err


def test_bad_input_exits_2_without_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, FeatliftError("x.jpg: no such file"))
    assert cli.main(["extract", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "featlift extract: error: x.jpg: no such file"


def test_interrupt_exits_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(["extract", "x.jpg"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_bad_usage_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["extract"])
    assert exit_info.value.code == 2


def test_missing_input_is_bad_input(tmp_path, capsys):
    assert cli.main(["extract", str(tmp_path / "absent.jpg"), "--upsampler", "none"]) == 2
    assert "absent.jpg" in capsys.readouterr().err
