"""Cost of TokenCut's normalised cut as upsampling grows the graph: dense eigh vs Lanczos (eigsh), and agreement.

For real images and a real backbone, builds each variant's feature map, then times
``second_eigenvector`` with the dense generalised solver (TokenCut's ``scipy.linalg.eigh``) and with
Lanczos on the normalised problem (what ``featlift eval discovery`` uses above 512 nodes), and checks that
both give the same box. Prints a markdown table.

    python benchmarks/ncut_solver.py --weights ../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors \
        ../shared/data/imagenet-sample/n04285008_sports_car.JPEG ../shared/data/imagenet-sample/n02088364_beagle.JPEG
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from featlift import create_backbone
from featlift.evaluate.discovery import ncut
from featlift.images import image_to_tensor, load_image
from featlift.variants import parse_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variants", default="none,bilinear,bilinear:iters=2")
    parser.add_argument(
        "--dense-max", type=int, default=4096, help="skip the dense solver above this many nodes"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = create_backbone(args.backbone, weights=args.weights)
    variants = parse_variants([args.variants], backbone)
    rows = []
    for variant in variants:
        dense_s, lanczos_s, same = [], [], 0
        nodes = 0
        for path in args.images:
            image = load_image(path)
            features = variant(image_to_tensor(image, variant.input_size((args.size, args.size)))[None])[0]
            nodes = features.shape[1] * features.shape[2]
            start = time.perf_counter()
            fast = ncut(features, dense_limit=0)
            lanczos_s.append(time.perf_counter() - start)
            if nodes <= args.dense_max:
                start = time.perf_counter()
                exact = ncut(features, dense_limit=10**9)
                dense_s.append(time.perf_counter() - start)
                same += exact.box == fast.box
        dense = f"{1000 * np.mean(dense_s):.0f}" if dense_s else "skipped"
        agree = f"{same}/{len(dense_s)}" if dense_s else "-"
        rows.append(f"| `{variant.label}` | {nodes} | {dense} | {1000 * np.mean(lanczos_s):.0f} | {agree} |")
    print(f"ncut per image, {len(args.images)} image(s), {args.size} px, {torch.get_num_threads()} threads")
    print("| variant | graph nodes | dense eigh ms | Lanczos eigsh ms | same box |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
