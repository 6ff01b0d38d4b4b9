"""`featlift eval`, `bench` and `viz` check their numeric options when parsing and their --out before any work."""

from __future__ import annotations

import pytest

from featlift.cli import main

TASK_ARGS = {
    "davis": ["eval", "davis", "--data", "D"],
    "probe": ["eval", "probe", "--data", "D", "--format", "camvid"],
    "warp": ["eval", "warp", "--data", "D"],
    "spair": ["eval", "spair", "--data", "D"],
    "discovery": ["eval", "discovery", "--data", "D", "--format", "voc07"],
    "depth": ["eval", "depth", "--data", "D"],
    "bench": ["bench"],
    "viz": ["viz", "pca", "image.jpg"],
}

BAD_VALUES = [
    # (command, option, value): what used to give nan / 0.0 / a crash / a silently ignored value
    ("davis", "--max-frames", "1"),  # no frame left to score: J&F was nan
    ("davis", "--max-frames", "0"),
    ("davis", "--topk", "0"),
    ("davis", "--temperature", "0"),
    ("davis", "--temperature", "nan"),
    ("davis", "--temperature", "-0.1"),
    ("davis", "--n-last", "-1"),
    ("davis", "--radius", "-1"),
    ("davis", "--batch-size", "0"),
    ("probe", "--limit-train", "0"),
    ("probe", "--limit-val", "0"),
    ("probe", "--epochs", "0"),
    ("probe", "--lr", "0"),
    ("probe", "--lr", "inf"),
    ("probe", "--weight-decay", "-1e-4"),
    ("probe", "--batch-size", "0"),
    ("probe", "--train-label-side", "0"),
    ("warp", "--limit", "0"),
    ("warp", "--strength", "-0.1"),
    ("warp", "--strength", "0.5"),
    ("warp", "--keypoints", "0"),
    ("spair", "--pairs-per-category", "0"),
    ("discovery", "--tau", "1"),
    ("discovery", "--tau", "nan"),
    ("discovery", "--eps", "0"),
    ("discovery", "--max-nodes", "0"),
    ("bench", "--warmup", "-1"),
    ("bench", "--repeats", "0"),
    ("viz", "--panel", "0"),
]


@pytest.mark.parametrize(("command", "option", "value"), BAD_VALUES)
def test_out_of_range_numbers_stop_at_parse_time(command, option, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*TASK_ARGS[command], f"{option}={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and value in err and "must be" in err


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [("davis", "--max-frames", "2"), ("davis", "--n-last", "0"), ("davis", "--radius", "0"),
     ("warp", "--strength", "0"), ("probe", "--weight-decay", "0"), ("bench", "--warmup", "0")],
)  # fmt: skip
def test_edge_values_that_mean_something_are_accepted(command, option, value, tmp_path, capsys):
    """Past parsing, these runs stop at the missing data (a FeatliftError, exit 2), not at the option."""
    argv = [*TASK_ARGS[command], f"{option}={value}"]
    argv = [str(tmp_path / "missing") if a == "D" else a for a in argv]
    if command == "bench":
        argv += [
            "--sizes",
            "30",
            "--backbone",
            "test_vit",
            "--weights",
            str(tmp_path / "missing.safetensors"),
        ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "argument" not in err


OUTPUT_ARGS = {
    "davis": ["eval", "davis", "--data", "D", "--out", "O"],
    "probe": ["eval", "probe", "--data", "D", "--format", "camvid", "--out", "O"],
    "warp": ["eval", "warp", "--data", "D", "--out", "O"],
    "spair": ["eval", "spair", "--data", "D", "--out", "O"],
    "discovery": ["eval", "discovery", "--data", "D", "--format", "voc07", "--out", "O"],
    "depth": ["eval", "depth", "--data", "D", "--out", "O"],
    "bench": ["bench", "--out", "O"],
    "viz similarity": ["viz", "similarity", "D", "--point", "1,1", "--out", "O/figure.png"],
    "viz pca": ["viz", "pca", "D", "--out", "O/figure.png"],
}


@pytest.mark.parametrize("command", OUTPUT_ARGS)
def test_an_unwritable_out_stops_the_command_before_any_work(command, tmp_path, capsys):
    """--out under a regular file cannot be created: the command says so first, before it reads any input
    (here the input does not even exist) or builds a backbone."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "results"
    argv = [a.replace("O", str(out)) if a.startswith("O") else a for a in OUTPUT_ARGS[command]]
    argv = [str(tmp_path / "missing-input") if a == "D" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker) in err and "not writable" in err
    assert "missing-input" not in err


def test_viz_refuses_a_folder_as_its_png(tmp_path, capsys):
    (tmp_path / "figure.png").mkdir()
    assert main(["viz", "pca", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "figure.png")]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["davis", "probe", "warp", "spair", "discovery", "depth"])
def test_missing_data_is_refused_before_any_backbone_is_built(task, tmp_path, capsys):
    """A mistyped --data fails at once: the backbone (here a name timm does not know) is never built."""
    extra = {"probe": ["--format", "camvid"], "discovery": ["--format", "voc07"]}.get(task, [])
    argv = ["eval", task, "--data", str(tmp_path / "missing"), "--backbone", "no_such_vit", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "no_such_vit" not in err
