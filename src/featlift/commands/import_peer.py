"""``featlift import-peer METHOD FILE --out DIR``: an official JAFAR / AnyUp / FeatUp checkpoint as a featlift one."""

from __future__ import annotations

import argparse

from ..backbones import FACETS
from ..errors import FeatliftError
from ..peer_import import PEERS, import_peer, official_backbone
from .common import backbone_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-peer",
        help="convert an official JAFAR, AnyUp or FeatUp (JBU) checkpoint into featlift's format",
        description="Reads the official file without unpickling it (torch.load weights_only=True), checks that it "
        "is that method's checkpoint, and writes a featlift checkpoint folder (model.safetensors + config.json) "
        "that records the backbone it was trained for (JAFAR, FeatUp: DINOv2 ViT-S/14; AnyUp: any backbone). "
        "Pass --backbone/--weights to record your own backbone instead (with its weights' fingerprint).",
    )
    parser.add_argument("method", choices=sorted(PEERS), help="which method's official checkpoint FILE is")
    parser.add_argument("file", help="the official checkpoint (.pth / .ckpt)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    group = parser.add_argument_group("backbone (default: the one the official file was trained for)")
    group.add_argument("--backbone", default=None, help="timm name of the backbone the file was trained for")
    group.add_argument(
        "--weights", default=None, help="local weights of that backbone (records their fingerprint)"
    )
    group.add_argument("--layer", type=int, default=None, help="block index (default: last)")
    group.add_argument(
        "--facet", choices=FACETS, default="token", help="token, query, key or value (default token)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    backbone = None
    if args.backbone is not None or args.weights is not None:
        if args.backbone is None:
            args.backbone = official_backbone(args.method)
            if args.backbone == "any":
                raise FeatliftError(
                    f"--weights: name their backbone with --backbone ({args.method} serves any)"
                )
        backbone = backbone_from_args(args)
    _, config = import_peer(args.method, args.file, args.out, backbone)
    print(f"featlift import-peer: wrote {args.out} ({config.upsampler}, {config.backbone.describe()})")
    return 0
