"""Dataset layouts of the segmentation probe: where the (image, label) files of a split are, and how the ids
stored in a label PNG map to class ids ``0..K-1`` (everything else becomes `IGNORE`, 255).

Every format maps stored values through one 256-entry lookup table, so a label PNG is decoded the same way
whatever its PIL mode (palette ``P`` PNGs are read as their palette indices, which are VOC's class ids).

==============  ==================================================================================  =======
format          layout                                                                                classes
==============  ==================================================================================  =======
``camvid``      ``images/{train,val}/*.jpg`` + ``labels/{train,val}/*.png``; ids 0..10, 11 ignore       11
``voc``         VOCdevkit: ``JPEGImages``, ``SegmentationClass`` (palette PNGs, 255 ignore),           21
                ``ImageSets/Segmentation/{train,val}.txt``
``ade20k``      ``images/{training,validation}`` + ``annotations/...``; 0 ignore, 1..150 -> 0..149      150
``cityscapes``  ``leftImg8bit/{train,val}/CITY/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``;  19
                the 34 label ids -> the 19 train ids of cityscapesScripts, all others (and -1) ignore
``cocostuff``   ``images/{train2017,val2017}/*.jpg`` + ``annotations/{train2017,val2017}/*.png``            27
                (``stuffthingmaps``: ids 0..181, 255 unlabelled) -> the 27 coarse classes (12 thing, 15
                stuff supercategories), as JAFAR's probe does; the image list is
                ``curated/SPLIT/Coco164kFull_Stuff_Coarse.txt`` when present (STEGO's curated list, which
                JAFAR reads), else every image of the split
``cocostuff171`` same files; the 171 used ids (80 things, 91 stuff) in order -> 0..170                     171
==============  ==================================================================================  =======
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import FeatliftError
from .segmentation_metrics import IGNORE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# cityscapesScripts' labels.py: label id -> train id for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
COCOSTUFF_COARSE_CLASSES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial",
    "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
# COCO-Stuff's hierarchy: the coarse class of each stored id 0..181 (stored id = COCO category id - 1).
# Things (ids 0..90) by supercategory runs; ids that COCO never uses fall inside the runs and never occur.
_THING_RUNS = ((0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10), (43, 50, 5),
               (51, 60, 2), (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4))  # fmt: skip
# Stuff ids 91..181 in order.
_STUFF_COARSE = (
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22,
    26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21,
    26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18,
    18, 18, 26, 26, 19, 19, 24,
)  # fmt: skip
# Stored ids of COCO's 11 unused thing categories (COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91).
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def lookup(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 table: stored value -> class id, `IGNORE` for every value not in `mapping`."""
    table = np.full(256, IGNORE, np.uint8)
    for stored, class_id in mapping.items():
        table[stored] = class_id
    return table


def cocostuff_coarse_table() -> np.ndarray:
    mapping = {i: coarse for first, last, coarse in _THING_RUNS for i in range(first, last + 1)}
    mapping.update({91 + i: coarse for i, coarse in enumerate(_STUFF_COARSE)})
    return lookup(mapping)


def cocostuff_fine_table() -> np.ndarray:
    used = [i for i in range(182) if i not in COCO_UNUSED_IDS]
    return lookup({stored: index for index, stored in enumerate(used)})


def _require(path: Path, fmt: SegFormat, kind: str = "file") -> None:
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise FeatliftError(f"{path}: no such {kind}; expected {fmt.name} layout: {fmt.layout}")


def _folder_pairs(image_sub: str, label_sub: str, label_name: Callable[[Path], str]):
    """Pairs of ROOT/image_sub/SPLIT/**/image and ROOT/label_sub/SPLIT/**/label_name(image), sorted by path."""

    def pairs(fmt: SegFormat, root: Path, split: str) -> list[tuple[Path, Path]]:
        image_dir, label_dir = root / image_sub / split, root / label_sub / split
        for folder in (image_dir, label_dir):
            _require(folder, fmt, "folder")
        images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [(p, label_dir / p.parent.relative_to(image_dir) / label_name(p)) for p in images]

    return pairs


def _voc_pairs(fmt: SegFormat, root: Path, split: str) -> list[tuple[Path, Path]]:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    _require(listing, fmt)
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    return [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]


def _cocostuff_pairs(fmt: SegFormat, root: Path, split: str) -> list[tuple[Path, Path]]:
    curated = root / "curated" / split / "Coco164kFull_Stuff_Coarse.txt"
    if not curated.is_file():
        return _folder_pairs("images", "annotations", lambda p: f"{p.stem}.png")(fmt, root, split)
    ids = [line.strip() for line in curated.read_text().splitlines() if line.strip()]
    return [(root / "images" / split / f"{i}.jpg", root / "annotations" / split / f"{i}.png") for i in ids]


def _cityscapes_label(image: Path) -> str:
    return image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")


@dataclass(frozen=True)
class SegFormat:
    """How one dataset family is laid out on disk and how its label PNGs map to class ids."""

    name: str
    num_classes: int
    splits: tuple[str, str]  # (train, val) folder or list names
    layout: str
    class_names: tuple[str, ...]
    table: np.ndarray = field(repr=False, compare=False)
    lister: Callable = field(repr=False, compare=False)

    def pairs(self, root: Path, split: str) -> list[tuple[Path, Path]]:
        """(image, label) paths of one split, checked to exist."""
        root = Path(root)
        pairs = self.lister(self, root, split)
        if not pairs:
            raise FeatliftError(f"{root}: no {split} images; expected {self.name} layout: {self.layout}")
        for image, label in pairs:
            _require(image, self)
            _require(label, self)
        return pairs

    def read_label(self, path: Path) -> np.ndarray:
        """Label PNG -> ``[H, W]`` uint8 class ids in ``0..num_classes-1``, `IGNORE` (255) elsewhere."""
        try:
            with Image.open(path) as image:
                array = np.array(image)
        except OSError as exc:
            raise FeatliftError(f"{path}: cannot read label PNG ({exc})") from exc
        if array.ndim != 2:
            raise FeatliftError(
                f"{path}: expected a single-channel label PNG (class ids), got shape {array.shape}"
            )
        if array.dtype != np.uint8:
            if array.size and (array.min() < 0 or array.max() > 255):
                raise FeatliftError(f"{path}: label values {array.min()}..{array.max()}: expected 0..255")
            array = array.astype(np.uint8)
        return self.table[array]


FORMATS = {
    "camvid": SegFormat(
        "camvid", 11, ("train", "val"),
        "ROOT/images/{train,val}/<name>.jpg + ROOT/labels/{train,val}/<name>.png (uint8 ids 0..10, 11 ignore)",
        CAMVID_CLASSES, lookup({i: i for i in range(11)}),
        _folder_pairs("images", "labels", lambda p: f"{p.stem}.png"),
    ),
    "voc": SegFormat(
        "voc", 21, ("train", "val"),
        "ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png (palette, 255 ignore), "
        "ROOT/ImageSets/Segmentation/{train,val}.txt",
        VOC_CLASSES, lookup({i: i for i in range(21)}), _voc_pairs,
    ),
    "ade20k": SegFormat(
        "ade20k", 150, ("training", "validation"),
        "ROOT/images/{training,validation}/<name>.jpg + ROOT/annotations/{training,validation}/<name>.png "
        "(0 ignore, 1..150 classes)",
        tuple(str(i) for i in range(150)), lookup({i: i - 1 for i in range(1, 151)}),
        _folder_pairs("images", "annotations", lambda p: f"{p.stem}.png"),
    ),
    "cityscapes": SegFormat(
        "cityscapes", 19, ("train", "val"),
        "ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png + "
        "ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (label ids -> 19 train ids, others ignore)",
        CITYSCAPES_CLASSES, lookup(CITYSCAPES_TRAIN_IDS),
        _folder_pairs("leftImg8bit", "gtFine", _cityscapes_label),
    ),
    "cocostuff": SegFormat(
        "cocostuff", 27, ("train2017", "val2017"),
        "ROOT/images/{train2017,val2017}/<id>.jpg + ROOT/annotations/{train2017,val2017}/<id>.png "
        "(stuffthingmaps ids 0..181, 255 unlabelled; 27 coarse classes), optional "
        "ROOT/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse.txt image lists",
        COCOSTUFF_COARSE_CLASSES, cocostuff_coarse_table(), _cocostuff_pairs,
    ),
    "cocostuff171": SegFormat(
        "cocostuff171", 171, ("train2017", "val2017"),
        "as cocostuff; the 171 used ids in order -> classes 0..170",
        tuple(str(i) for i in range(171)), cocostuff_fine_table(), _cocostuff_pairs,
    ),
}  # fmt: skip
