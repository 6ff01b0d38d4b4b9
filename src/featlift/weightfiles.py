"""Reading weights files safely: the format told by the content (not the suffix), and no NaN or inf.

Both backbone weights (``--weights``) and upsampler checkpoints (featlift's own and the original
LiFT's) go through here, so every loader refuses the same bad files with the same messages.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import FeatliftError

SAFETENSORS = "safetensors"
TORCH = "torch"
PICKLE = "pickle"  # a plain pickle, not torch.save's: e.g. a PaddlePaddle .pd/.pdparams checkpoint
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # torch.save's default (zip) format; an empty zip
_PICKLE_PROTOCOL = b"\x80"  # torch.save's legacy format: a pickle, protocol 2 or higher
# torch.save's legacy format starts with a pickle of its magic number 0x1950a86a20f9469cfc6c (LONG1 opcode);
# protocols 4 and 5 put a 9-byte frame header before it
_TORCH_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_HEAD_BYTES = 24


def some_of(items: list[str], examples: int = 3, sep: str = ", ") -> str:
    """The first `examples` of `items`, and how many there are in all when some are left out."""
    more = f"{sep}... ({len(items)} in all)" if len(items) > examples else ""
    return sep.join(items[:examples]) + more


def weights_file_format(path: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"torch"`` (a torch.save file), ``"pickle"`` (a plain pickle, e.g. PaddlePaddle's
    ``.pd``/``.pdparams``) or None (none of these), from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if head.startswith(_ZIP_MAGIC):
        return TORCH
    # an 8-byte little-endian header length (under 2**40: its top 3 bytes are 0), then the JSON header; checked
    # before pickles, since a header length such as 0x280 starts with the bytes of a pickle protocol (80 02)
    if (
        len(head) > 8
        and head[8:9] == b"{"
        and head[5:8] == b"\0\0\0"
        and struct.unpack("<Q", head[:8])[0] > 1
    ):
        return SAFETENSORS
    if head[:1] == _PICKLE_PROTOCOL and len(head) > 1 and 2 <= head[1] <= 5:
        framed = head[1] >= 4 and head[2:3] == b"\x95"
        return TORCH if head[11 if framed else 2 :].startswith(_TORCH_LEGACY_MAGIC) else PICKLE
    return None


def read_weights_file(
    path: str | os.PathLike, error: type[FeatliftError], what: str = "weights file", pickles: bool = False
) -> Any:
    """The content of a .safetensors or torch.save file (whatever its suffix), loaded on the CPU.

    torch files are read with ``weights_only=True``: no pickled Python objects are run. With `pickles`,
    a plain pickle (a PaddlePaddle checkpoint) is read too, by `restricted_pickle.load_array_pickle`: only
    numpy arrays (returned as numpy arrays), scalars and containers; any other pickled global is refused
    without being imported. Every failure raises `error` with a message that starts ``"{what} {path}: "``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    try:
        kind = weights_file_format(path)
    except OSError as exc:
        raise error(f"{what} {path}: cannot read it ({exc.strerror or exc})") from exc
    if kind is None:
        with open(path, "rb") as handle:
            head = handle.read(16)
        seen = f"it starts with {head!r}" if head else "it is empty"
        raise error(
            f"{what} {path}: not a PyTorch or safetensors weights file ({seen}); "
            "expected a .safetensors file or a file written by torch.save"
        )
    if kind == PICKLE:
        return _read_plain_pickle(path, error, what, pickles)
    try:
        if kind == SAFETENSORS:
            from safetensors.torch import load_file

            return load_file(str(path))
        with open(path, "rb") as handle:  # a file object: torch.load picks no reader by the suffix
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for corrupt files
        if "Unsupported global" in str(exc):  # torch refused to unpickle a class
            raise error(
                f"{what} {path}: it also holds pickled Python objects (e.g. a training run's args), which "
                "featlift does not unpickle (torch.load(weights_only=True), for safety). If you trust the file, "
                f"save its state dict alone: torch.save(torch.load({str(path)!r}, weights_only=False)['teacher'], "
                "'weights.pth') (or ['model'], ['state_dict'])"
            ) from exc
        raise error(
            f"{what} {path}: cannot read this {kind} file; is it truncated or corrupt? ({type(exc).__name__}: {exc})"
        ) from exc


def _read_plain_pickle(path: Path, error: type[FeatliftError], what: str, pickles: bool) -> Any:
    import pickle

    from .restricted_pickle import RefusedGlobal, load_array_pickle

    if not pickles:
        raise error(
            f"{what} {path}: a plain pickle (e.g. a PaddlePaddle .pd/.pdparams checkpoint), not a file written "
            "by torch.save; only backbone weights (--weights) are read from such files"
        )
    try:
        return load_array_pickle(path)
    except RefusedGlobal as exc:
        raise error(
            f"{what} {path}: {exc}. If this is a PaddlePaddle training checkpoint that also pickles the run's "
            "arguments or other objects, save its model state dict alone (in Paddle: "
            "paddle.save(paddle.load(PATH)['model'], 'model.pdparams'))"
        ) from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        raise error(
            f"{what} {path}: cannot read this pickle file; is it truncated or corrupt? ({type(exc).__name__}: {exc})"
        ) from exc


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity, in order.

    A finite sum proves a tensor finite (NaN and infinity propagate), and summing is far cheaper than
    ``isfinite`` on CPU, so only a tensor whose sum is not finite (or overflows) is looked at element-wise.
    """
    floats = [
        (name, value)
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex())
        and value.numel()
    ]
    if not floats:
        return []
    sums = torch.stack(
        [(torch.view_as_real(t.sum()).sum() if t.is_complex() else t.sum()).float() for _, t in floats]
    )
    suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
    return [floats[i][0] for i in suspects if not bool(torch.isfinite(floats[i][1]).all())]


def refuse_non_finite(state: Mapping[str, Any], source: str, error: type[FeatliftError]) -> None:
    """Raise `error` naming `source` and the first bad tensors if any tensor of `state` is NaN or inf."""
    bad = non_finite_tensors(state)
    if bad:
        raise error(
            f"{source}: NaN or infinite values in {some_of(bad)}; these weights are broken (a diverged "
            "training run, or a corrupted file) and would give NaN features"
        )
