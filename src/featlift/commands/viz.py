"""``featlift viz similarity|pca IMAGE``: figures comparing feature variants on one image;
``featlift viz explore IMAGE...``: an interactive HTML page comparing them on several images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..devices import resolve_device
from ..errors import FeatliftError
from ..fileio import check_writable_dir
from ..images import collect_images, load_image
from ..pretrained import find_shipped_checkpoint
from ..variants import parse_variants
from .common import (
    add_backbone_args,
    add_device_arg,
    add_max_memory_arg,
    add_variant_arg,
    backbone_from_args,
    memory_defaults,
    positive_int,
    size_arg,
)
from .numbers import float_in

logger = logging.getLogger(__name__)

BASE_VARIANTS = ["none", "bilinear", "input-2x"]
LIFT_VARIANTS = ["lift", "lift:iters=2"]


def point_arg(text: str) -> tuple[float, float]:
    parts = text.replace(" ", "").split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"point {text!r}: expected x,y in image pixels, e.g. 120,80"
        ) from None
    return x, y


def _add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    add_backbone_args(parser)
    add_variant_arg(
        parser,
        "none, bilinear, input-2x, and lift, lift:iters=2 when featlift ships a checkpoint for the backbone",
    )
    parser.add_argument(
        "--size", type=size_arg, default=(224, 224), help="base input size S or HxW (default 224)"
    )
    parser.add_argument(
        "--panel", type=positive_int, default=256, help="width of each panel in pixels (default 256)"
    )
    parser.add_argument("--out", default=default_out, help=f"output PNG (default {default_out})")
    add_device_arg(parser)
    add_max_memory_arg(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser("viz", help="similarity-map and PCA figures of feature variants")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    similarity = kinds.add_parser(
        "similarity",
        help="cosine-similarity maps of chosen points, one column per variant",
        description="For each --point (x,y in pixels of the original image), the cosine similarity of the feature "
        "under it with every feature of the image, for each variant; one row per point.",
    )
    _add_common(similarity, "similarity.png")
    similarity.add_argument(
        "--point",
        type=point_arg,
        action="append",
        required=True,
        metavar="X,Y",
        help="a query point in pixels (repeatable)",
    )
    similarity.set_defaults(run=run_similarity)
    pca = kinds.add_parser(
        "pca",
        help="first three PCA components of the features as RGB, one panel per variant",
        description="PCA of the features to RGB. By default one basis and colour scale is fitted jointly over all "
        "variants, so equal colours mean equal feature directions across panels; --per-variant fits each alone.",
    )
    _add_common(pca, "pca.png")
    pca.add_argument("--per-variant", action="store_true", help="fit the PCA on each variant separately")
    pca.set_defaults(run=run_pca)
    _register_explore(kinds)


def _register_explore(kinds) -> None:
    from ..explorer import DEFAULT_MAX_MB_PER_IMAGE

    explore = kinds.add_parser(
        "explore",
        help="an interactive, self-contained HTML page: similarity maps under the pointer and PCA, per variant",
        description="Writes one HTML page that opens offline: for each image, every variant's features (8 bits per "
        "channel after a per-channel affine; if that exceeds --max-mb-per-image, projected onto 256, 128, 64, 32 or "
        "16 principal components, then average-pooled by 2 per side) and a joint PCA-to-RGB view. Hovering or "
        "clicking a point shows its cosine-similarity map for every variant side by side, computed in the browser.",
    )
    explore.add_argument("image", metavar="IMAGE", nargs="+", help="image files, folders or glob patterns")
    add_backbone_args(explore)
    add_variant_arg(
        explore,
        "none, bilinear, input-2x, and lift, lift:iters=2 when featlift ships a checkpoint for the backbone",
    )
    explore.add_argument(
        "--size", type=size_arg, default=(224, 224), help="base input size S or HxW (default 224)"
    )
    explore.add_argument(
        "--panel", type=positive_int, default=256, help="width of each panel in pixels (default 256)"
    )
    explore.add_argument(
        "--max-mb-per-image",
        type=float_in(0, low_open=True),
        default=DEFAULT_MAX_MB_PER_IMAGE,
        metavar="MB",
        help="what each image may add to the page, in MB of 10^6 bytes: its photo and every variant's base64 "
        f"codes and PCA view (default {DEFAULT_MAX_MB_PER_IMAGE:g}); picks the components and grid",
    )
    explore.add_argument(
        "--components",
        type=positive_int,
        default=None,
        metavar="K",
        help="embed K principal components per cell (the channels themselves when K >= C) instead of the "
        "budget's choice; the grids are still pooled if the budget needs it",
    )
    explore.add_argument("--out", default="explore.html", help="output HTML file (default explore.html)")
    add_device_arg(explore)
    add_max_memory_arg(explore)
    explore.set_defaults(run=run_explore)


def _check_out(path: str) -> None:
    """Refuse an output the figure could not be written to, before any work."""
    if not path.lower().endswith(".png"):
        raise FeatliftError(f"--out {path}: the output must be a .png file")
    if Path(path).is_dir():
        raise FeatliftError(f"--out {path}: is a folder; expected the path of a .png file")
    check_writable_dir(Path(path).parent, f"--out {path}: its folder")


def _variants(args: argparse.Namespace):
    backbone = backbone_from_args(args)
    specs = args.variant
    if not specs:
        specs = list(BASE_VARIANTS)
        if find_shipped_checkpoint(backbone.name, backbone.layer, backbone.facet, "lift") is not None:
            specs += LIFT_VARIANTS
        else:
            logger.warning(
                "no shipped LiFT checkpoint for %s layer %d facet %s: showing %s only (add --variant lift:CKPT)",
                backbone.name,
                backbone.layer,
                backbone.facet,
                ", ".join(specs),
            )
    variants = parse_variants(specs, backbone, memory_defaults(args))
    device = resolve_device(args.device)
    for variant in variants:
        variant.to(device)
        variant.output_grid(args.size)  # fails early on a size that does not fit the patch
    return variants, device


def run_similarity(args: argparse.Namespace) -> int:
    from ..viz import check_points, similarity_figure

    _check_out(args.out)
    image = load_image(args.image)
    check_points(args.point, (image.width, image.height))
    variants, device = _variants(args)
    path = similarity_figure(variants, image, args.point, args.out, args.size, device, args.panel)
    print(f"featlift viz similarity: {len(args.point)} point(s) x {len(variants)} variant(s) -> {path}")
    return 0


def run_pca(args: argparse.Namespace) -> int:
    from ..viz import pca_figure

    _check_out(args.out)
    image = load_image(args.image)
    variants, device = _variants(args)
    if not variants:
        raise FeatliftError("no variants to show")
    path = pca_figure(variants, image, args.out, args.size, device, args.panel, joint=not args.per_variant)
    print(
        f"featlift viz pca: {len(variants)} variant(s), {'per-variant' if args.per_variant else 'joint'} PCA -> {path}"
    )
    return 0


def run_explore(args: argparse.Namespace) -> int:
    from ..explorer import MEGABYTE, explore_page

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise FeatliftError(f"--out {args.out}: the output must be an .html file")
    if out.is_dir():
        raise FeatliftError(f"--out {args.out}: is a folder; expected the path of an .html file")
    check_writable_dir(out.parent, f"--out {args.out}: its folder")
    # each input on its own: two inputs may hold files of one name (DAVIS frames 00000.jpg of two sequences);
    # on the page such names are shown as the paths given
    items = {}
    for raw in args.image:
        for item in collect_images([raw]):
            items.setdefault(Path(item.path).resolve(), item)
    names = [item.relative.as_posix() for item in items.values()]
    images = [
        (name if names.count(name) == 1 else str(item.path), load_image(item.path))
        for name, item in zip(names, items.values(), strict=True)
    ]
    variants, device = _variants(args)
    if not variants:
        raise FeatliftError("no variants to show")
    path, embedded = explore_page(
        variants,
        images,
        out,
        args.size,
        device,
        max_mb_per_image=args.max_mb_per_image,
        panel=args.panel,
        components=args.components,
    )
    for entry in embedded:
        print(
            f"{entry.name}: {entry.embedded_bytes / MEGABYTE:.2f} MB of {args.max_mb_per_image:g} MB "
            f"(photo {entry.photo_size[0]}x{entry.photo_size[1]} JPEG)"
        )
        for variant in entry.variants:
            print(f"  {variant.describe()}")
    size = path.stat().st_size
    print(
        f"featlift viz explore: {len(embedded)} image(s) x {len(variants)} variant(s) -> {path} "
        f"({size / MEGABYTE:.2f} MB)"
    )
    return 0
