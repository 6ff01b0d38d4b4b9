"""Named recipes of the linear segmentation probe (``featlift eval probe --protocol NAME``).

``jafar`` is the protocol of the JAFAR / AnyUp / UPLiFT tables, read from JAFAR's ``evaluation/train_probes.py``,
``utils/training.py`` and ``config/eval.yaml`` (and AnyUp's fix of its schedule); ``jafar-original`` keeps
JAFAR's schedule bug; ``cpu`` is a small-input variant for quick comparisons on a CPU; ``featlift`` is the
recipe featlift's probe had before the protocols existed (kept so that older results can be reproduced).

Every protocol, every setting:

- **input**: the image resized so that its shorter side is ``input_size`` and centre-cropped to
  ``input_size`` x ``input_size`` (``crop``; JAFAR: torchvision ``Resize(448)`` + ``CenterCrop(448)``), or resized
  to ``input_size`` x ``input_size`` ignoring aspect ratio (``stretch``, featlift's old recipe). featlift takes
  the centred square of the decoded image first and resizes that (bilinear with antialiasing, as torchvision's
  ``Resize`` of a PIL image; ``crop``) or with featlift's antialiased bicubic (``stretch``), so a crop's
  position can differ from torchvision's by the rounding of one pixel.
- **labels**: the same square crop, resized with ``nearest-exact`` to ``label_size`` (JAFAR: the input size,
  448), or kept at their own resolution (``label_size`` None).
- **features**: ``label`` -- every variant's output resized to the label size (JAFAR calls its upsampler with
  the label size; the raw tokens get their logits bilinearly upsampled, which for a 1x1 head is the same as
  upsampling the tokens); ``grid4x`` -- every variant's output at 4x the token grid; ``native`` -- the variant's
  own output. Logits are upsampled bilinearly (``align_corners=False``) to the label size when they differ.
- **head**: a 1x1 conv ``C -> classes`` (bias), on the raw features (JAFAR) or on features standardised per
  channel with train statistics (``standardise``).
- **optimiser**: AdamW (betas 0.9, 0.999) with ``lr`` and ``weight_decay``; ``epochs``; ``batch_size``
  images per step; train order shuffled by a generator seeded with ``seed``.
- **schedule**: cosine annealing to 0; ``per-epoch`` (T_max = epochs, stepped once per epoch: AnyUp's fix),
  ``jafar-bug`` (T_max = epochs but stepped every iteration, as JAFAR's code does, so the learning rate swings
  between lr and 0 with a period of 2 x epochs iterations), ``per-iteration`` (T_max = epochs x steps, stepped
  every iteration).
- **augmentation**: ``flip`` -- with probability 0.5 per batch, the batch's images and labels are flipped
  horizontally (JAFAR). Features of a flipped image are the variant's features of the flipped image
  (recomputed; with cached features the cached features of the flipped view).
- **loss**: cross-entropy, mean over the labelled (not ignored) pixels of the batch at the label size.
- **metric**: one confusion matrix over all labelled val pixels at the label size; mIoU over the classes present
  in the val ground truth (JAFAR: torchmetrics ``JaccardIndex(average="macro")``, which on the full VOC val,
  where every class occurs, is the same), and pixel accuracy.
- **splits**: the dataset's own train / val (VOC: ``ImageSets/Segmentation/{train,val}.txt``; JAFAR reads
  torchvision's ``VOCSegmentation`` train (1464) and val (1449)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import FeatliftError

SCHEDULES = ("per-epoch", "jafar-bug", "per-iteration")
RESIZES = ("crop", "stretch")
FEATURE_SIZES = ("label", "grid4x", "native")


@dataclass(frozen=True)
class ProbeProtocol:
    """One complete recipe of the linear probe; `describe` is what results.json records."""

    name: str
    input_size: int
    resize: str
    label_size: int | None
    feature_size: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    schedule: str
    flip: bool
    standardise: bool
    seed: int = 0
    train_label_side: int | None = None  # the old recipe: training labels shrunk to this long side

    def __post_init__(self) -> None:
        for key, allowed in (("schedule", SCHEDULES), ("resize", RESIZES), ("feature_size", FEATURE_SIZES)):
            if getattr(self, key) not in allowed:
                raise FeatliftError(f"probe protocol {key} {getattr(self, key)!r}: expected one of {allowed}")

    def with_overrides(self, **overrides) -> ProbeProtocol:
        """This protocol with some settings changed (None values are ignored); the name says so."""
        changes = {k: v for k, v in overrides.items() if v is not None and getattr(self, k) != v}
        if not changes:
            return self
        unknown = sorted(set(changes) - set(asdict(self)))
        if unknown:
            raise FeatliftError(f"probe protocol settings {unknown}: expected some of {sorted(asdict(self))}")
        label = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        return replace(self, name=f"{self.name}({label})", **changes)

    def describe(self) -> dict:
        out = asdict(self)
        out["optimizer"] = "AdamW betas (0.9, 0.999)"
        out["loss"] = "cross-entropy, mean over the labelled pixels of a batch at the label size"
        out["metric"] = (
            "mIoU over classes present in the val ground truth, one confusion matrix over all val pixels"
        )
        return out


PROTOCOLS = {
    "jafar": ProbeProtocol(
        "jafar", input_size=448, resize="crop", label_size=448, feature_size="label", epochs=20, lr=5e-4,
        weight_decay=1e-5, batch_size=2, schedule="per-epoch", flip=True, standardise=False,
    ),
    "jafar-original": ProbeProtocol(
        "jafar-original", input_size=448, resize="crop", label_size=448, feature_size="label", epochs=20, lr=5e-4,
        weight_decay=1e-5, batch_size=2, schedule="jafar-bug", flip=True, standardise=False,
    ),
    "cpu": ProbeProtocol(
        "cpu", input_size=224, resize="crop", label_size=224, feature_size="grid4x", epochs=20, lr=5e-4,
        weight_decay=1e-5, batch_size=2, schedule="per-epoch", flip=False, standardise=False,
    ),
    "featlift": ProbeProtocol(
        "featlift", input_size=224, resize="stretch", label_size=None, feature_size="native", epochs=40, lr=1e-2,
        weight_decay=1e-4, batch_size=8, schedule="per-iteration", flip=False, standardise=True,
        train_label_side=160,
    ),
}  # fmt: skip


def get_protocol(name: str) -> ProbeProtocol:
    """The protocol called `name`, or an error listing the names."""
    if name not in PROTOCOLS:
        raise FeatliftError(f"probe protocol {name!r}: expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
