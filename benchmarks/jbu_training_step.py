"""One training step of FeatUp's JBU stack on a 224 px image: time and memory, featlift's backward against autograd's.

For C=384 tokens of a 224 px image (16x16, DINOv2 ViT-S/14's grid) and a 224 px guide, the JBU stack's forward
to its native 256x256 output and the backward of a loss on it, with the per-pixel kernels' backward

- ``tap-by-tap``: featlift's `PixelKernels` (one gradient buffer per input, accumulated tap by tap);
- ``autograd``: autograd through the same tap-by-tap forward (each of the 49 shifted views gets its own
  zero-filled gradient of the whole padded map, summed afterwards), what featlift did before;

then the `featup` objective's whole loss + backward for a batch (the upsampler and the five jitters through the
attention downsampler), with and without per-jitter checkpointing, and its tracked peak memory (featlift's tensor
tracker: the peak of the tensors the step creates, in a second, tracked call). Random weights and inputs: time and memory do not depend on
them. One thread unless --threads.

    python benchmarks/jbu_training_step.py [--threads 1] [--batch 1] [--repeats 1]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from featlift.meters import TensorMemoryTracker
from featlift.train.batches import Batch
from featlift.train.objectives.featup import FeatUpObjective
from featlift.upsamplers import featup_jbu
from featlift.upsamplers.featup_jbu import FeatUpJBU
from featlift.upsamplers.pixel_kernels import accumulate_taps, apply_pixel_kernels

CHANNELS = 384
TOKENS = 16
IMAGE = 224


def stack_step(kernels_fn, repeats: int) -> tuple[float, float]:
    """Best (forward, backward) seconds of the JBU stack on one image with `kernels_fn` applying the kernels."""
    torch.manual_seed(0)
    upsampler = FeatUpJBU(channels=CHANNELS).train()
    features, guide = torch.randn(1, CHANNELS, TOKENS, TOKENS), torch.randn(1, 3, IMAGE, IMAGE)
    best = (float("inf"), float("inf"))
    with mock.patch.object(featup_jbu, "apply_pixel_kernels", kernels_fn):
        for _ in range(repeats):
            start = time.perf_counter()
            out = upsampler(features, guide, upsampler.native_output_size((TOKENS, TOKENS)))
            middle = time.perf_counter()
            out.square().mean().backward()
            end = time.perf_counter()
            best = (min(best[0], middle - start), min(best[1], end - middle))
    return best


def objective_step(batch_size: int, checkpointed: bool, tracked: bool) -> float:
    """Seconds (untracked) or tracked peak MiB of the featup objective's loss + backward on random 224 px inputs."""
    torch.manual_seed(0)
    upsampler = FeatUpJBU(channels=CHANNELS).train()
    objective = FeatUpObjective()
    objective.checkpoint_jitters = checkpointed
    objective.prepare(upsampler, CHANNELS)
    pixels = {
        v.name: torch.randint(0, 256, (batch_size, 3, IMAGE, IMAGE), dtype=torch.uint8)
        for v in objective.views
    }
    features = {v.name: torch.randn(batch_size, CHANNELS, TOKENS, TOKENS) for v in objective.views}
    batch = Batch(pixels, features, list(range(batch_size)), lambda x: x, torch.device("cpu"))
    if not tracked:
        start = time.perf_counter()
        objective.loss(upsampler, batch).backward()
        return time.perf_counter() - start
    with TensorMemoryTracker() as tracker:
        objective.loss(upsampler, batch).backward()
    return tracker.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="images in the objective's batch (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="stack steps per row; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"JBU stack, C={CHANNELS}, {TOKENS}x{TOKENS} tokens -> 256x256, one {IMAGE} px image, {args.threads} thread(s)"
    )
    print("| kernels' backward | forward s | backward s |")
    print("|---|---|---|")
    for name, fn in (("tap-by-tap (`PixelKernels`)", apply_pixel_kernels), ("autograd", accumulate_taps)):
        forward, backward = stack_step(fn, args.repeats)
        print(f"| {name} | {forward:.2f} | {backward:.2f} |")
    print(f"\n`featup` objective, loss + backward, batch {args.batch}")
    print("| jitters | s | tracked peak MiB |")
    print("|---|---|---|")
    for checkpointed in (True, False):
        seconds = objective_step(args.batch, checkpointed, tracked=False)
        peak = objective_step(args.batch, checkpointed, tracked=True)
        print(f"| {'checkpointed' if checkpointed else 'all kept'} | {seconds:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
