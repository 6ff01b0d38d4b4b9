"""torch.compile with inductor (the default backend) on each `featlift.ops` operator: compiled == eager.

The test suite compiles each operator with dynamo (``backend="eager"``, ``fullgraph=True``: one graph, no
breaks); inductor generates and compiles C++ for minutes on a CPU, so its check lives here:

    python benchmarks/ops_inductor_check.py [--device cpu|cuda]

Prints one line per operator (max |compiled - eager|, compile + first-call seconds); exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from featlift.ops import CARAFE, FADE, SAPA, DySample


def perturbed(op: torch.nn.Module) -> torch.nn.Module:
    """`op` with every parameter moved off its (often zero) initial value, so every term shows."""
    with torch.no_grad():
        for parameter in op.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return op.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    features = torch.randn(1, 8, 6, 7, device=args.device)
    guide = torch.randn(1, 8, 12, 14, device=args.device)
    cases = {
        "CARAFE": (CARAFE(8, compressed_channels=4, chunk_rows=3), (features,)),
        "SAPA-G": (SAPA(8, 8, embedding_dim=4, variant="G", norm_groups=2, chunk_rows=3), (features, guide)),
        "FADE": (FADE(8, 8, embedding_dim=4, chunk_rows=3), (features, guide)),
        "DySample": (DySample(8, groups=2, chunk_rows=4), (features,)),
    }
    failed = False
    for name, (op, inputs) in cases.items():
        op = perturbed(op.to(args.device))
        with torch.no_grad():
            eager = op(*inputs)
            start = time.perf_counter()
            compiled = torch.compile(op)(*inputs)
            seconds = time.perf_counter() - start
        diff = (compiled - eager).abs().max().item()
        ok = diff <= 1e-5 * max(1.0, eager.abs().max().item())
        failed |= not ok
        print(f"{name}: max |compiled - eager| {diff:.2e} ({'ok' if ok else 'MISMATCH'}), {seconds:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
