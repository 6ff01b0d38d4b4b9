"""How close featlift's JAFAR, AnyUp and FeatUp JBU come to the official code's outputs in ../shared/peers.

For every case of every reference file (made by the official code with the official checkpoints on real
DINOv2 tokens; ../shared/peers/README.md), featlift's implementation runs on the stored inputs with the
official checkpoint imported by `featlift.peer_import.read_official`; the table gives the largest |difference|
at the 256 stored pixels, and of the per-channel mean and standard deviation over the whole map, with the
largest stored |value| for scale. The tests (tests/test_jafar.py, test_anyup.py, test_featup_jbu.py) assert
the same within 1e-5 of that scale.

    python benchmarks/peer_agreement.py [--shared ../shared] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from featlift.peer_import import read_official

IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
REFERENCES = {  # reference file -> (peer method, official checkpoint)
    "jafar": ("jafar", "jafar_vit_small_patch14_dinov2.lvd142m.pth"),
    "anyup_paper": ("anyup", "anyup_paper.pth"),
    "anyup_multi_backbone": ("anyup", "anyup_multi_backbone.pth"),
    "featup_jbu": ("featup", "featup_jbu_dinov2_cocostuff.ckpt"),
}


def cases(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return sorted({key.rsplit(".", 1)[0] for key in handle.keys()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    inputs = load_file(str(shared / "peers" / "reference" / "inputs.safetensors"))
    print(
        "| reference | case | max abs diff, pixels | channel mean | channel std | max abs value | relative |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (method, checkpoint) in REFERENCES.items():
        module = read_official(method, shared / "weights" / "peers" / checkpoint)
        path = shared / "peers" / "reference" / f"{name}.safetensors"
        reference = load_file(str(path))
        for case in cases(path):
            image, size = case.split(".out_")
            height, width = (int(s) for s in size.split("x"))
            side = 448 if height == 448 and f"{image}.features_448" in inputs else 224
            guide = (inputs[f"{image}.image_{side}_uint8"].float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
            with torch.inference_mode():
                out = module(inputs[f"{image}.features_{side}"], guide, (height, width))[0]
            yx = reference[f"{case}.yx"].long()
            official = reference[f"{case}.pixels"]
            pixels = (out[:, yx[:, 0], yx[:, 1]].T - official).abs().max().item()
            mean = (out.mean(dim=(1, 2)) - reference[f"{case}.mean"]).abs().max().item()
            std = (out.std(dim=(1, 2)) - reference[f"{case}.std"]).abs().max().item()
            scale = official.abs().max().item()
            print(
                f"| {name} | {image} {side} -> {height}x{width} | {pixels:.2e} | {mean:.2e} | {std:.2e} | "
                f"{scale:.2f} | {max(pixels, mean, std) / scale:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
