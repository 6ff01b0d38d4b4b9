"""`featlift compare`: a toy leaderboard through the CLI, the cell cache (kill and resume, a changed setting),
a missing dataset, --train-missing, the Pareto front and the task table."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import TINY_TIMM_NAME, write_images
from test_eval_davis import write_davis
from test_eval_probe import write_camvid

import featlift.compare.run as compare_run
from featlift.cli import main
from featlift.compare.pareto import pareto_front, plot_labels
from featlift.compare.tasks import TASKS, parse_task_settings


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data root laid out as ../shared/data: tiny DAVIS, CamVid and an image folder for warp and training."""
    root = tmp_path_factory.mktemp("data")
    write_davis(root / "davis2016", frames=3, sequences=("coffee",))
    write_camvid(root / "camvid", train=3, val=2)
    write_images(root / "imagenet-sample", count=3, size=(64, 64))
    return root


@pytest.fixture(scope="module")
def lift_checkpoint(tmp_path_factory, tiny_timm_weights):
    from featlift import create_backbone
    from featlift.checkpoint import save_checkpoint
    from featlift.upsamplers import LiFT

    backbone = create_backbone(TINY_TIMM_NAME, weights=tiny_timm_weights)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "lift"
    save_checkpoint(folder, LiFT(backbone.channels, backbone.patch_size, residual=True), backbone)
    return folder


SMALL = {"davis": "davis.batch_size=2", "warp": "warp.keypoints=4", "probe-camvid": "probe-camvid.epochs=2"}


def compare(data_root, weights, out, methods, tasks, *extra):
    small = [arg for task in tasks.split(",") if task in SMALL for arg in ("--set", SMALL[task])]
    return main(
        ["-q", "compare", "--backbone", TINY_TIMM_NAME, "--weights", str(weights), "--methods", methods,
         "--tasks", tasks, "--data-root", str(data_root), "--out", str(out), "--size", "32x32",
         "--device", "cpu", *small, *extra]
    )  # fmt: skip


@pytest.fixture
def counted(monkeypatch):
    """Count the cells that are computed (not read from the cache), per (method, task)."""
    calls = []
    original = compare_run.evaluate_cell

    def counting(task, config, variant, device, weights):
        calls.append((variant.label, task.name))
        return original(task, config, variant, device, weights)

    monkeypatch.setattr(compare_run, "evaluate_cell", counting)
    return calls


def test_toy_leaderboard_three_methods_two_tasks(
    tmp_path, data_root, tiny_timm_weights, lift_checkpoint, counted, capsys
):
    methods = f"none,bilinear,lift:{lift_checkpoint}:iters=2"
    code = compare(data_root, tiny_timm_weights, tmp_path / "out", methods, "davis,warp")
    assert code == 0, capsys.readouterr().err
    assert len(counted) == 6
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {(c["method"], c["task"]): c for c in results["cells"]}
    assert len(cells) == 6 and not results["failed_cells"] and not results["skipped_tasks"]
    lift = f"lift:{lift_checkpoint}:iters=2"
    for (_, task), cell in cells.items():
        assert cell["ms_per_image"] > 0 and cell["peak_memory_mib"] > 0 and not cell["from_cache"]
        assert cell["quality"] == cell["metrics"]["J&F" if task == "davis" else "PCK@0.1"]
        assert cell["environment"]["threads"] >= 1 and cell["environment"]["device"] == "cpu"
    # the cost is measured at each method's output size: LiFT x2 twice makes 8x8 -> 32x32 maps of 2x2 tokens
    assert cells[(lift, "warp")]["details"]["feature_grid"] == [8, 8]
    assert cells[("none", "warp")]["details"]["feature_grid"] == [2, 2]
    params = {m["method"]: m["parameters"] for m in results["methods"]}
    assert params["none"] == 0 and params["bilinear"] == 0 and params[lift] > 100_000
    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "davis J&F" in board and "warp PCK@0.1" in board and "warp peak MiB" in board
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for task in results["tasks"]:
        assert task["pareto_front"]  # at least one method is not dominated


def test_killed_run_resumes_with_only_the_missing_cells(
    tmp_path, data_root, tiny_timm_weights, monkeypatch, capsys
):
    calls = []
    original = compare_run.evaluate_cell

    def dies_in_the_second_cell(task, config, variant, device, weights):
        calls.append((variant.label, task.name))
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        return original(task, config, variant, device, weights)

    monkeypatch.setattr(compare_run, "evaluate_cell", dies_in_the_second_cell)
    out = tmp_path / "out"
    assert compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp") == 3
    assert "simulated kill" in capsys.readouterr().err
    assert len(list((out / "cells").rglob("*.json"))) == 1  # only the finished cell; nothing half-written
    assert not list(out.rglob("*.featlift-tmp"))

    calls.clear()
    monkeypatch.setattr(
        compare_run, "evaluate_cell", lambda *a: (calls.append((a[2].label, a[0].name)), original(*a))[1]
    )
    assert compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp") == 0
    assert calls == [("none", "warp"), ("bilinear", "davis"), ("bilinear", "warp")]
    results = json.loads((out / "results.json").read_text())
    assert [c["from_cache"] for c in results["cells"]] == [True, False, False, False]

    calls.clear()
    assert compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp") == 0
    assert calls == []


def test_a_changed_setting_reruns_only_its_cells(tmp_path, data_root, tiny_timm_weights, counted):
    out = tmp_path / "out"
    assert compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp") == 0
    counted.clear()
    assert (
        compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp", "--set", "warp.seed=1") == 0
    )
    assert sorted(counted) == [("bilinear", "warp"), ("none", "warp")]
    counted.clear()  # a new method: only its own cells
    assert (
        compare(
            data_root,
            tiny_timm_weights,
            out,
            "none,bilinear,bilinear:size=4x4",
            "davis,warp",
            "--set",
            "warp.seed=1",
        )
        == 0
    )
    assert sorted(counted) == [("bilinear:size=4x4", "davis"), ("bilinear:size=4x4", "warp")]
    counted.clear()  # a task setting changes only that task's cells
    assert compare(data_root, tiny_timm_weights, out, "none,bilinear", "davis,warp", "--set", "warp.seed=1",
                   "--set", "davis.topk=3") == 0  # fmt: skip
    assert sorted(counted) == [("bilinear", "davis"), ("none", "davis")]


def test_missing_dataset_is_reported_and_the_other_tasks_run(
    tmp_path, data_root, tiny_timm_weights, counted, capsys
):
    out = tmp_path / "out"
    code = compare(data_root, tiny_timm_weights, out, "none,bilinear", "probe-voc,warp")
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert (
        list(results["skipped_tasks"]) == ["probe-voc"] and "voc2012" in results["skipped_tasks"]["probe-voc"]
    )
    assert sorted(counted) == [("bilinear", "warp"), ("none", "warp")]
    assert "Skipped tasks" in (out / "leaderboard.md").read_text()


def test_probe_task_and_a_method_without_checkpoint(tmp_path, data_root, tiny_timm_weights, counted, capsys):
    out = tmp_path / "out"
    code = compare(data_root, tiny_timm_weights, out, "bilinear,lift", "probe-camvid")
    assert code == 1  # lift has no checkpoint for the tiny ViT and --train-missing is not given
    results = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in results["cells"]] == ["bilinear"]
    assert 0 <= results["cells"][0]["quality"] <= 100
    assert (
        results["failed_cells"][0]["method"] == "lift"
        and "--train-missing" in results["failed_cells"][0]["error"]
    )


def test_train_missing_trains_once_per_method_and_reuses_it(
    tmp_path, data_root, tiny_timm_weights, counted, monkeypatch, capsys
):
    trainings = []
    original = compare_run.train_method
    monkeypatch.setattr(
        compare_run, "train_method", lambda *a, **k: (trainings.append(a[0]), original(*a, **k))[1]
    )
    out = tmp_path / "out"
    budget = "epochs=1,image_size=64,batch_size=2,val_fraction=0"
    args = ("--train-missing", "--budget", budget)
    code = compare(data_root, tiny_timm_weights, out, "bilinear,lift,lift:iters=2", "warp", *args)
    assert code == 0, capsys.readouterr().err
    assert trainings == ["lift"]  # lift and lift:iters=2 share one checkpoint
    trained = list((out / "trained").iterdir())
    assert len(trained) == 1 and trained[0].name.startswith("lift-")
    assert (trained[0] / "model.safetensors").is_file() and (trained[0] / "train_state.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    training = {m["method"]: m["training"] for m in results["methods"]}
    assert (
        training["lift"]["epochs"] == 1
        and training["lift"]["trained_here"]
        and training["lift"]["image_size"] == 64
    )
    assert (
        training["lift:iters=2"]["wall_time_s"] == training["lift"]["wall_time_s"]
        and training["bilinear"] == {}
    )
    assert "1 ep x 3 img @64 px" in (out / "leaderboard.md").read_text()
    mtime = (trained[0] / "model.safetensors").stat().st_mtime_ns

    counted.clear()  # the rerun reuses the trained checkpoint and every cell
    assert compare(data_root, tiny_timm_weights, out, "bilinear,lift,lift:iters=2", "warp", *args) == 0
    assert counted == [] and (trained[0] / "model.safetensors").stat().st_mtime_ns == mtime

    counted.clear()  # another budget: another checkpoint, so lift's cells run again, bilinear's do not
    assert compare(data_root, tiny_timm_weights, out, "bilinear,lift", "warp", "--train-missing", "--budget",
                   budget.replace("epochs=1", "epochs=2")) == 0  # fmt: skip
    assert counted == [("lift", "warp")] and len(list((out / "trained").iterdir())) == 2


def test_pareto_front():
    points = [("a", 1.0, 50.0), ("b", 2.0, 60.0), ("c", 3.0, 55.0), ("d", 0.5, 40.0), ("e", 2.0, math.nan)]
    assert pareto_front(points) == ["d", "a", "b"]
    assert pareto_front([("x", 1.0, 5.0), ("y", 1.0, 5.0)]) == ["x", "y"]  # equal points dominate neither
    assert pareto_front([("x", 1.0, 5.0), ("y", 1.0, 4.0)]) == ["x"]


def test_plot_labels_drop_checkpoint_paths_unless_two_specs_would_collide():
    specs = [
        "jafar:ckpts/jafar:size=64x64",
        "lift:iters=2",
        "none",
        "carafe:/runs/a:iters=2",
        "carafe:/runs/b:iters=2",
    ]
    assert plot_labels(specs) == {
        "jafar:ckpts/jafar:size=64x64": "jafar:size=64x64",
        "lift:iters=2": "lift:iters=2",
        "none": "none",
        "carafe:/runs/a:iters=2": "carafe:/runs/a:iters=2",  # both would read carafe:iters=2
        "carafe:/runs/b:iters=2": "carafe:/runs/b:iters=2",
    }


def test_task_table_and_settings():
    assert {"davis", "probe-voc", "probe-camvid", "warp"} <= set(TASKS)
    settings = parse_task_settings(["davis.max_frames=4", "davis.sequences=a,b", "size=28x42", "warp.stereo=yes"],
                                   ["davis", "warp"])  # fmt: skip
    assert settings == {
        "davis": {"max_frames": 4, "sequences": ["a", "b"], "size": (28, 42)},
        "warp": {"size": (28, 42), "stereo": True},
    }
    with pytest.raises(Exception, match="no setting 'frames'.*max_frames"):
        parse_task_settings(["davis.frames=4"], ["davis"])
    with pytest.raises(Exception, match="'x' is not a valid int"):
        parse_task_settings(["davis.topk=x"], ["davis"])
    with pytest.raises(Exception, match="unknown; the tasks are"):
        parse_task_settings([], ["devis"])
    with pytest.raises(Exception, match="not among --tasks"):
        parse_task_settings(["warp.limit=2"], ["davis"])


def _cell(method, task, quality, ms):
    from featlift.compare.leaderboard import Cell

    metric = {"davis": "J&F", "warp": "PCK@0.1"}[task]
    result = {"metrics": {metric: quality}, "ms_per_image": ms, "peak_memory_mib": 10.0, "details": {}}
    return Cell(method, task, metric, result, "h", False, 1.0)


def test_leaderboard_ranks_marks_the_front_and_formats_costs():
    from featlift.compare.leaderboard import Leaderboard, format_parameters

    cells = [_cell("a", "davis", 60, 10), _cell("b", "davis", 70, 20), _cell("c", "davis", 50, 30)]
    cells += [_cell("a", "warp", 40, 10), _cell("b", "warp", 45, 20)]  # c has no warp result
    training = {
        "b": {"epochs": 2, "train_images": 9, "image_size": 448, "wall_time_s": 12.5, "trained_here": True}
    }
    board = Leaderboard(
        ["a", "b", "c"], [("davis", "J&F"), ("warp", "PCK@0.1")], cells, {"b": 1_234_567}, training
    )
    assert board.mean_ranks() == {"a": 2.0, "b": 1.0, "c": 3.0}
    assert board.ordered_methods() == ["b", "a", "c"]
    assert board.fronts() == {"davis": ["a", "b"], "warp": ["a", "b"]}
    lines = board.markdown().splitlines()
    assert lines[2].startswith("| 1.00 | `b` | 70.0* | 20.0 | 10 | 45.0* |")
    assert "| 3.00 | `c` | 50.0 | 30.0 | 10 | - | - | - |" in lines[4]
    assert "1.23 M" in lines[2] and "2 ep x 9 img @448 px, 12.5 s (here)" in lines[2]
    assert format_parameters(0) == "0" and format_parameters(1500) == "1.5 k"


def test_counting_pipeline_moves_the_bar_by_the_images():
    from featlift.compare.run import _CountingPipeline

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    class Pipeline:
        wants_sources = True

        def __call__(self, images, sources=None):
            return images * 2

    bar = Bar()
    counting = _CountingPipeline(Pipeline(), bar)
    assert (
        torch.equal(counting(torch.ones(3, 1)), torch.full((3, 1), 2.0))
        and counting(torch.ones(2, 1)) is not None
    )
    assert bar.n == 5 and counting.wants_sources is True


def test_task_layouts_are_found_under_the_data_root(tmp_path):
    (tmp_path / "voc2012" / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    (tmp_path / "camvid").mkdir()
    assert TASKS["probe-voc"].locate(tmp_path) == (tmp_path / "voc2012" / "VOCdevkit" / "VOC2012").resolve()
    assert TASKS["probe-camvid"].locate(tmp_path) == (tmp_path / "camvid").resolve()
    assert TASKS["davis"].locate(tmp_path) is None
    assert "davis2016: no such folder" in TASKS["davis"].missing_reason(tmp_path)


def test_budget_and_bad_settings_are_refused_naming_the_value(tmp_path, data_root, tiny_timm_weights, capsys):
    from featlift.compare.methods import parse_budget
    from featlift.errors import FeatliftError

    assert parse_budget("epochs=2, image_size=224")["epochs"] == 2 and parse_budget(None)["image_size"] == 448
    for text, message in (("epoch=2", "'epoch=2' is not KEY=VALUE"), ("epochs=x", "epochs='x' is not a valid int"),
                          ("epochs=0", "must be positive"), ("val_fraction=1", r"must be in \[0, 1\)")):  # fmt: skip
        with pytest.raises(FeatliftError, match=message):
            parse_budget(text)
    out = tmp_path / "out"
    assert compare(data_root, tiny_timm_weights, out, "bilinear", "davis", "--set", "davis.topk=0") == 2
    assert "DavisConfig.topk = 0: expected an integer >= 1" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    assert compare(data_root, tiny_timm_weights, out, "bilinear,nosuch", "davis") == 2
    assert "nosuch" in capsys.readouterr().err
    assert compare(tmp_path / "nodata", tiny_timm_weights, out, "bilinear", "davis") == 2
    assert "--data-root" in capsys.readouterr().err and not out.exists()


def test_depth_task_ranks_by_delta1(tmp_path, data_root, tiny_timm_weights, counted):
    from test_depth_probe import write_nyu

    root = tmp_path / "data"
    shutil.copytree(data_root / "imagenet-sample", root / "imagenet-sample")
    write_nyu(root / "nyuv2", train=3, test=2)
    out = tmp_path / "out"
    assert (
        compare(
            root,
            tiny_timm_weights,
            out,
            "none,bilinear",
            "depth",
            "--set",
            "depth.epochs=1",
            "--set",
            "depth.warmup_epochs=0.5",
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert sorted(counted) == [("bilinear", "depth"), ("none", "depth")]
    for cell in results["cells"]:
        assert cell["task"] == "depth" and cell["quality"] == cell["metrics"]["delta1"]


def test_probe_under_a_named_protocol(tmp_path, data_root, tiny_timm_weights, counted):
    out = tmp_path / "out"
    argv_extra = ["--set", "probe-camvid@cpu.epochs=1"]
    assert compare(data_root, tiny_timm_weights, out, "bilinear", "probe-camvid@cpu", *argv_extra) == 0
    results = json.loads((out / "results.json").read_text())
    assert counted == [("bilinear", "probe-camvid@cpu")]
    settings = json.dumps(results["settings"])
    assert '"protocol": "cpu' in settings and '"protocol": "featlift' not in settings


def test_include_joins_another_runs_cells_without_recomputing_them(
    tmp_path, data_root, tiny_timm_weights, counted, capsys
):
    elsewhere = tmp_path / "elsewhere"  # the other run's data lies at another path, as on another machine
    shutil.copytree(data_root, elsewhere)
    other = tmp_path / "other"
    assert compare(elsewhere, tiny_timm_weights, other, "none,bilinear", "davis,warp") == 0
    theirs = {
        (c["method"], c["task"]): c["quality"]
        for c in json.loads((other / "results.json").read_text())["cells"]
    }
    counted.clear()
    out = tmp_path / "out"
    assert (
        compare(data_root, tiny_timm_weights, out, "bilinear:size=4x4", "warp", "--include", str(other)) == 0
    )
    assert counted == [("bilinear:size=4x4", "warp")]  # the included cells are not recomputed
    assert "1 cells computed, 0 from the cache, 2 included" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    cells = {(c["method"], c["task"]): c for c in results["cells"]}
    assert sorted(cells) == [
        ("bilinear", "warp"),
        ("bilinear:size=4x4", "warp"),
        ("none", "warp"),
    ]  # its warp only
    assert cells[("none", "warp")]["quality"] == theirs[("none", "warp")]
    assert cells[("none", "warp")]["environment"]["date"]  # where and when it was measured travels with it
    assert cells[("bilinear", "warp")]["cell"] in {
        p.stem.rsplit("-", 1)[1] for p in (other / "cells").rglob("*.json")
    }
    included = results["settings"]["included"]
    assert included[0]["methods"] == ["none", "bilinear"] and str(elsewhere) in included[0]["data"]["warp"]
    assert {m["method"] for m in results["methods"]} == {"bilinear:size=4x4", "none", "bilinear"}
    assert "`none`" in (out / "leaderboard.md").read_text()

    counted.clear()  # --include alone: a leaderboard of the other run's cells, nothing computed
    code = main(["-q", "compare", "--backbone", TINY_TIMM_NAME, "--weights", str(tiny_timm_weights),
                 "--tasks", "davis,warp", "--data-root", str(data_root), "--out", str(tmp_path / "joined"),
                 "--size", "32x32", "--device", "cpu", "--set", SMALL["davis"], "--set", SMALL["warp"],
                 "--include", str(other / "results.json")])  # fmt: skip
    assert code == 0 and counted == []
    joined = json.loads((tmp_path / "joined" / "results.json").read_text())
    assert {(c["method"], c["task"]): c["quality"] for c in joined["cells"]} == theirs


def test_include_refuses_cells_that_answer_another_question(tmp_path, data_root, tiny_timm_weights, capsys):
    other = tmp_path / "other"
    assert compare(data_root, tiny_timm_weights, other, "none", "warp") == 0
    out = tmp_path / "out"
    refused = [
        (
            ("bilinear", "warp", "--set", "warp.seed=1"),
            "task warp ran with other settings there (seed: 1 here, 0 there)",
        ),
        (("none", "warp"), "method none is in this run's --methods too"),
        (("bilinear", "warp", "--layer", "0"), "its backbone is"),
    ]
    for args, message in refused:
        assert compare(data_root, tiny_timm_weights, out, *args, "--include", str(other)) == 2
        err = capsys.readouterr().err
        assert message in err and str(other / "results.json") in err, err
    twice = ("--include", str(other), "--include", str(other / "results.json"))
    assert compare(data_root, tiny_timm_weights, out, "bilinear", "warp", *twice) == 2
    assert f"method none is in --include {other / 'results.json'} too" in capsys.readouterr().err
    assert compare(data_root, tiny_timm_weights, out, "bilinear", "warp", "--include", str(tmp_path)) == 2
    assert f"--include {tmp_path}: no results.json there" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"cells": []}')
    assert compare(data_root, tiny_timm_weights, out, "bilinear", "warp", "--include", str(tmp_path)) == 2
    assert "not a featlift compare results.json (missing settings, methods)" in capsys.readouterr().err
    assert not out.exists()  # every refusal comes before any work
