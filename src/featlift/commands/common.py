"""Arguments and helpers shared by several sub-commands."""

from __future__ import annotations

import argparse
import os

from ..backbones import FACETS, LAYERS_AS, Backbone, create_backbone
from ..devices import device_problem
from ..errors import FeatliftError
from ..images import parse_size
from .numbers import float_in, int_at_least

DEFAULT_BACKBONE = "vit_small_patch14_dinov2.lvd142m"
WEIGHTS_ENV = "FEATLIFT_WEIGHTS"


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"timm ViT name, or a timm CNN with features_only such as resnet50, convnext_tiny (default {DEFAULT_BACKBONE})",
    )
    group.add_argument(
        "--weights",
        default=None,
        help=f"local backbone weights (.safetensors/.pth; timm, DINO or DINOv2 layout) instead of timm's download; "
        f"default ${WEIGHTS_ENV} if set",
    )
    group.add_argument(
        "--layer",
        type=layer_arg,
        default=None,
        help="ViT: block index, 0-based, negative from the end (default: last), or several in increasing order, "
        "e.g. 3,6,9,11 (one forward pass); CNN: the stage, timm's feature_info index, 0-based (default: last)",
    )
    group.add_argument(
        "--facet",
        choices=FACETS,
        default="token",
        help="token (block output), query, key or value (ViTs only; a CNN stage has token only)",
    )


def layer_arg(text: str) -> int | tuple[int, ...]:
    """argparse type of ``--layer``: ``11`` -> 11, ``3,6,9,11`` -> (3, 6, 9, 11)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a layer index (e.g. 11, -1) or several separated by commas (e.g. 3,6,9,11)"
        ) from None
    return values[0] if len(values) == 1 else tuple(values)


def add_layers_as_arg(parser: argparse.ArgumentParser) -> None:
    """``--layers-as concat|separate``: how the layers of ``--layer 3,6,9,11`` are given."""
    parser.add_argument(
        "--layers-as",
        choices=LAYERS_AS,
        default="concat",
        help="with several --layer values: concat (default; one `features` tensor, the layers' channels in order) "
        "or separate (each layer upsampled on its own and stored as features_layerN in the same file; "
        "untrained methods only)",
    )


def add_max_memory_arg(parser: argparse.ArgumentParser) -> None:
    """``--max-memory MIB``: the working-memory budget of every method that computes in chunks."""
    parser.add_argument(
        "--max-memory",
        type=float_in(0, low_open=True),
        default=None,
        metavar="MIB",
        help="working-memory budget in MiB of the methods that compute their output in chunks (JAFAR, AnyUp, ...), "
        "beyond the output itself (default: each method's own, 512 MiB); a variant's max_memory_mib= wins",
    )


def memory_defaults(args: argparse.Namespace) -> dict:
    """The options ``--max-memory`` implies for every method that takes them."""
    budget = getattr(args, "max_memory", None)
    return {} if budget is None else {"max_memory_mib": budget}


VARIANT_GRAMMAR = "none | input-Nx | NAME[:CKPT][:key=value...] for any registered upsampler (e.g. bilinear, lift:iters=2, lift:size=64x64)"


def add_variant_arg(parser: argparse.ArgumentParser, default: str) -> None:
    """``--variant SPEC``, repeatable and/or comma-separated (see `featlift.variants`)."""
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"feature variant, repeatable and/or comma-separated: {VARIANT_GRAMMAR} (default: {default})",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default=None,
        type=device_arg,
        help="cpu, cuda, cuda:N, mps or xpu, checked up front (default: cuda when available, else cpu)",
    )


def device_arg(text: str) -> str:
    """argparse type of ``--device``: refuse at parse time a device this machine does not have."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


def weights_from_args(args: argparse.Namespace) -> str | None:
    """``--weights``, else ``$FEATLIFT_WEIGHTS``, else None (timm downloads)."""
    return args.weights or os.environ.get(WEIGHTS_ENV) or None


def backbone_from_args(args: argparse.Namespace) -> Backbone:
    return create_backbone(
        args.backbone,
        weights=weights_from_args(args),
        layer=args.layer,
        facet=args.facet,
        layers_as=getattr(args, "layers_as", "concat"),
    )


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except FeatliftError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


positive_int = int_at_least(1)
