"""`featlift bench` end to end on a tiny random ViT: JSON + markdown with sane values."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from toy_upsamplers import ToyStretch

from featlift import create_backbone
from featlift.bench import count_flops, find_max_size
from featlift.checkpoint import save_checkpoint
from featlift.cli import main
from featlift.meters import TensorMemoryTracker
from featlift.upsamplers import LiFT, register_upsampler
from featlift.variants import parse_variant

NAME = "test_vit"  # timm's 64-dim, 6-block ViT for tests
ONE_QUICK_CALL = ["--batch-sizes", "1", "--repeats", "1", "--warmup", "0"]  # one timed call, no warm-up


@register_upsampler("toy-stretch-in-test-file")
class StretchDefinedHere(ToyStretch):
    """A method registered in this test file: a fresh process knows it only by importing this file."""


def bench(weights, *args: str) -> int:
    """`featlift bench` on the tiny ViT with local `weights`, on the CPU."""
    return main(["bench", "--backbone", NAME, "--weights", str(weights), "--device", "cpu", *args])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random vit_tiny state dict on disk and a residual LiFT checkpoint for it."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=0)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    backbone = create_backbone(NAME, weights=weights)
    lift = LiFT(backbone.channels, backbone.patch_size, residual=True)
    save_checkpoint(root / "lift", lift, backbone)
    return weights, root / "lift", sum(p.numel() for p in lift.parameters()), backbone


def test_bench_cli_writes_json_and_markdown(tiny_setup, tmp_path):
    weights, ckpt, lift_params, backbone = tiny_setup
    out = tmp_path / "out"
    variants = f"none,bilinear,lift:{ckpt},lift:{ckpt}:iters=2,input-2x"
    args = [
        "--sizes",
        "32,64",
        "--variants",
        variants,
        "--batch-sizes",
        "1,2",
        "--repeats",
        "2",
        "--warmup",
        "1",
    ]
    code = bench(weights, *args, "--out", str(out))
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert {"settings", "environment", "results", "comparisons"} <= set(data)
    rows = {(r["variant"], r["size"]): r for r in data["results"]}
    assert len(rows) == 10
    backbone_params = sum(p.numel() for p in backbone.parameters())
    for (variant, size), row in rows.items():
        assert row["latency_ms"] > 0 and row["latency_ms_min"] <= row["latency_ms"] <= row["latency_ms_max"]
        assert set(row["throughput"]) == {"1", "2"} and all(v > 0 for v in row["throughput"].values())
        assert row["flops"] > 0
        assert row["backbone"]["ms"] > 0
        scale = 2 if variant == "input-2x" else 1
        assert row["input_size"] == [size * scale, size * scale]
        if variant.startswith("lift"):
            assert row["upsampler_params"] == lift_params
            assert row["params"] == backbone_params + lift_params
            assert row["upsampler"]["flops"] > 0 and row["upsampler"]["ms"] > 0
            assert row["upsampler"]["peak_memory_mib"] > 0
        if variant in ("none", "input-2x"):
            assert row["upsampler"] is None and row["params"] == backbone_params
    # the same output grid: one LiFT pass on S, the backbone on 2S
    assert rows[(f"lift:{ckpt}", 32)]["output_grid"] == rows[("input-2x", 32)]["output_grid"] == [4, 4]
    assert rows[(f"lift:{ckpt}:iters=2", 64)]["output_grid"] == [16, 16]
    # a second pass costs more FLOPs and memory than the first
    one, two = rows[(f"lift:{ckpt}", 64)]["upsampler"], rows[(f"lift:{ckpt}:iters=2", 64)]["upsampler"]
    assert two["flops"] > 4 * one["flops"] and two["peak_memory_mib"] > one["peak_memory_mib"]
    comp = data["comparisons"]
    assert {c["variant"] for c in comp["lift_vs_input_2x"]} == {"bilinear", f"lift:{ckpt}"}
    # one group (lift with this checkpoint), against its smallest output grid; bilinear is alone in its group
    grids = [
        (c["variant"], c["output_grid"], c["smallest"]) for c in comp["by_output_grid"] if c["size"] == 32
    ]
    assert grids == [
        (f"lift:{ckpt}", [4, 4], f"lift:{ckpt}"),
        (f"lift:{ckpt}:iters=2", [8, 8], f"lift:{ckpt}"),
    ]
    first = next(c for c in comp["by_output_grid"] if c["size"] == 32)
    assert first["time_vs_smallest"] == first["flops_vs_smallest"] == first["memory_vs_smallest"] == 1
    text = (out / "bench.md").read_text()
    assert "| 32 | `none` |" in text and "backbone@S + upsampler against backbone@2S" in text
    assert "| size | variant | output grid | upsampler ms | time vs smallest |" in text
    assert data["settings"]["options"]["fold_bn"] is True


def test_bench_cli_find_max_size_is_bounded_on_cpu(tiny_setup, tmp_path):
    weights, _, _, _ = tiny_setup
    out = tmp_path / "out"
    args = ["--sizes", "32", "--variants", "none,bilinear", *ONE_QUICK_CALL]
    code = bench(weights, *args, "--out", str(out), "--find-max-size", "--max-size-cap", "128")
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert [(m["variant"], m["largest"], m["failed"]) for m in data["max_size"]] == [
        ("none", 128, None),
        ("bilinear", 128, None),
    ]
    assert "max-size-cap" in data["max_size_note"]


def test_find_max_size_stops_at_out_of_memory(tiny_setup):
    _, _, _, backbone = tiny_setup
    variant = parse_variant("none", backbone)
    real_call = variant.pipeline.forward

    def limited(images, sources=None):  # pretend that inputs above 64 px do not fit
        if images.shape[-1] > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(images, sources)

    variant.pipeline.forward = limited
    assert find_max_size(variant, 16, "cpu", cap=1024) == (64, 128)


def test_bench_rejects_a_size_that_does_not_fit_the_patch(tiny_setup, tmp_path, capsys):
    weights, _, _, _ = tiny_setup
    code = bench(weights, "--sizes", "30", "--variants", "none", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "30" in capsys.readouterr().err


def test_flops_and_memory_helpers():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        a = torch.empty(1024, 1024)  # 4 MiB
        del a
        b = torch.empty(512, 1024)  # 2 MiB, after the first is freed
    assert tracker.peak == 4 * 2**20 and tracker.live == 2 * 2**20
    del b


def test_peak_rss_reset_and_read_see_what_a_fresh_process_allocates():
    """The child's own numbers, not the parent's: pytest with torch loaded is far bigger than a bare child."""
    import sys

    from featlift.process_memory import run_child

    code = """
import json
from featlift.process_memory import peak_rss_mib, reset_peak_rss, rss_mib
x = bytearray(400 * 2**20); x[::4096] = b"1" * (400 * 256); del x
load_peak, before = peak_rss_mib(), rss_mib()
reset_peak_rss()
y = bytearray(100 * 2**20); y[::4096] = b"1" * (100 * 256)
print(json.dumps([load_peak, before, peak_rss_mib()]))
"""
    load_peak, before, call_peak = run_child([sys.executable, "-c", code])
    assert load_peak - before > 390  # the 400 MiB were freed before the call, but the peak remembers them
    assert 98 < call_peak - before < 110  # after the reset, the peak sees only the call's 100 MiB
    with pytest.raises(Exception, match="exit 3"):
        run_child([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_bench_process_rss_runs_fresh_processes(tiny_setup, tmp_path):
    weights, ckpt, _, _ = tiny_setup
    out = tmp_path / "rss"
    args = [
        "--sizes",
        "64",
        "--batch-sizes",
        "1",
        "--variants",
        f"none,lift:{ckpt}:iters=2",
        "--repeats",
        "1",
    ]
    assert bench(weights, *args, "--warmup", "0", "--threads", "1", "--process-rss", "--out", str(out)) == 0
    rss = json.loads((out / "bench.json").read_text())["process_rss"]
    assert [(r["variant"], r["size"], r["batch"]) for r in rss] == [
        ("none", 64, 1),
        (f"lift:{ckpt}:iters=2", 64, 1),
    ]
    for r in rss:
        assert r["before_call_mib"] > 100  # a fresh process with torch and the model in it
        assert r["load_peak_mib"] >= r["before_call_mib"] and r["call_peak_mib"] >= r["before_call_mib"]
        assert r["process_peak_mib"] == max(r["load_peak_mib"], r["call_peak_mib"])
    assert "Peak RSS of a fresh process (batch 1)" in (out / "bench.md").read_text()


def test_bench_stages_run_under_the_speed_options_of_the_pipeline(tiny_setup, tmp_path, monkeypatch):
    """Under --amp the backbone-alone and upsampler-alone timings see the same autocast dtype as the whole
    pipeline, and the upsampler alone gets channels-last features as inside it."""
    from featlift.backbones import ViTBackbone

    weights, ckpt, _, _ = tiny_setup
    seen = {"backbone": set(), "upsampler": set()}
    backbone_forward, upsampler_forward = ViTBackbone.forward, LiFT.forward

    def recording_backbone(self, images):
        seen["backbone"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return backbone_forward(self, images)

    def recording_upsampler(self, features, image, *args, **kwargs):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen["upsampler"].add((autocast, features.is_contiguous(memory_format=torch.channels_last)))
        return upsampler_forward(self, features, image, *args, **kwargs)

    monkeypatch.setattr(ViTBackbone, "forward", recording_backbone)
    monkeypatch.setattr(LiFT, "forward", recording_upsampler)
    args = ["--sizes", "32", "--variants", f"lift:{ckpt}", *ONE_QUICK_CALL]
    assert bench(weights, *args, "--amp", "bf16", "--out", str(tmp_path / "out")) == 0
    assert seen == {"backbone": {torch.bfloat16}, "upsampler": {(torch.bfloat16, True)}}


def test_bench_compares_any_method_by_output_grid_and_measures_it_in_a_fresh_process(tiny_setup, tmp_path):
    """Methods registered outside featlift, with their own option: grouped by method, compared with the
    smallest grid of their group, and known to the fresh --process-rss child, which imports their modules."""
    weights, _, _, _ = tiny_setup
    out = tmp_path / "toy"
    variants = "toy-stretch:factor=4,toy-stretch,toy-stretch-in-test-file:factor=3,bilinear"
    args = ["--sizes", "32", "--variants", variants, *ONE_QUICK_CALL]
    assert bench(weights, *args, "--threads", "1", "--process-rss", "--out", str(out)) == 0
    data = json.loads((out / "bench.json").read_text())
    rows = [(c["variant"], c["output_grid"], c["smallest"]) for c in data["comparisons"]["by_output_grid"]]
    assert rows == [
        ("toy-stretch", [4, 4], "toy-stretch"),
        ("toy-stretch:factor=4", [8, 8], "toy-stretch"),
    ]
    methods = {r["variant"]: r["method"] for r in data["results"]}
    assert methods["toy-stretch-in-test-file:factor=3"] == "toy-stretch-in-test-file"
    rss = data["process_rss"]
    assert [r["variant"] for r in rss] == variants.split(",")
    assert all(r["call_peak_mib"] >= r["before_call_mib"] > 100 for r in rss)
