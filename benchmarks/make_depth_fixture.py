"""Write a NYUv2-layout (``nyu``) depth fixture from real photos, with a depth that is a known function of them.

No NYUv2 copy is reachable here, so ``featlift eval depth`` is measured on real images paired with a depth a
probe can learn from their content: ``1 + 4 x`` the brightness averaged over a window of 1/8 of the image height
``+ 2 x`` the row's height fraction (a ground plane), in metres ([1, 7] m); the 2 leftmost columns have no depth
(0) and the top-right 4x4 block is at 15 m (beyond the 10 m range: invalid). Even-numbered images get a 16-bit
PNG in millimetres, odd-numbered ones a float ``.npy`` in metres.

    PYTHONPATH=src python benchmarks/make_depth_fixture.py ../shared/data/imagenet-sample /tmp/depth-fixture \
        --train 24 --test 8 --side 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def content_depth(photo: np.ndarray) -> np.ndarray:
    grey = torch.from_numpy(photo.mean(2) / 255.0).float()[None, None]
    k = max(3, photo.shape[0] // 8) | 1
    smooth = F.avg_pool2d(grey, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].numpy()
    rows = np.linspace(0, 1, photo.shape[0], dtype=np.float32)[:, None]
    depth = (1 + 4 * smooth + 2 * rows).astype(np.float32)
    depth[:, :2] = 0
    depth[:4, -4:] = 15.0
    return depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--side", type=int, default=224, help="photos resized to side x side")
    args = parser.parse_args()
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: args.train + args.test]
    for i, path in enumerate(files):
        split = "train" if i < args.train else "test"
        for kind in ("images", "depth"):
            (args.out / kind / split).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            photo = np.asarray(image.convert("RGB").resize((args.side, args.side), Image.BICUBIC))
        depth = content_depth(photo)
        Image.fromarray(photo).save(args.out / "images" / split / f"{i:04d}.png")
        if i % 2:
            np.save(args.out / "depth" / split / f"{i:04d}.npy", depth)
        else:
            millimetres = np.round(depth * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(args.out / "depth" / split / f"{i:04d}.png")
    print(f"{len(files)} images -> {args.out}")


if __name__ == "__main__":
    main()
