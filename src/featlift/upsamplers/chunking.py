"""Working memory bounded by computing an output in chunks of output pixels.

Attention-based upsamplers hold, per output pixel (query), a row of attention scores over the keys and the
intermediate tensors of the query path. Computing the output ``chunk`` pixels at a time, straight into a
preallocated output tensor, makes the working memory ``chunk x bytes_per_query`` instead of growing with the
output size. The chunk is either given (``chunk_size``, in output pixels) or follows from a budget
(``max_memory_mib``) and the method's own estimate of the bytes one query needs.

Every method with chunks takes both as constructor options, so ``jafar:max_memory_mib=256`` or
``anyup:chunk_size=4096`` work as variant specs, and ``--max-memory`` sets the budget of every such method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

DEFAULT_MAX_MEMORY_MIB = 512.0
"""The working-memory budget of a method's chunked computation when neither a chunk size nor a budget is set."""

CHUNK_OPTIONS = ("chunk_size", "max_memory_mib")
"""The constructor options that set a method's chunking (choices of use, never stored in a checkpoint)."""


def check_chunking(owner: str, chunk_size: int | None, max_memory_mib: float | None) -> None:
    """Refuse a chunk size below 1 or a budget that is not a positive finite number (ValueError naming `owner`)."""
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(
            f"{owner} chunk_size must be >= 1 output pixels (or None: from the budget), got {chunk_size}"
        )
    if max_memory_mib is not None and not (max_memory_mib > 0 and math.isfinite(max_memory_mib)):
        raise ValueError(
            f"{owner} max_memory_mib must be > 0 and finite (or None: the default), got {max_memory_mib}"
        )


def set_chunking(
    module: object,
    owner: str,
    chunk_size: int | None,
    max_memory_mib: float | None,
    output_dtype_name: str | None,
) -> None:
    """Check a method's chunking options (ValueError naming `owner`) and store them on `module` as
    ``chunk_size``, ``max_memory_mib`` and ``output_dtype``."""
    check_chunking(owner, chunk_size, max_memory_mib)
    if output_dtype_name is not None:
        try:
            output_dtype(output_dtype_name, torch.empty(0))
        except ValueError as exc:
            raise ValueError(f"{owner} {exc}") from None
    module.chunk_size = None if chunk_size is None else int(chunk_size)
    module.max_memory_mib = None if max_memory_mib is None else float(max_memory_mib)
    module.output_dtype = output_dtype_name


def chunk_length(
    total: int, bytes_per_item: float, chunk_size: int | None = None, max_memory_mib: float | None = None
) -> int:
    """How many of `total` items (output pixels) to compute at once.

    `chunk_size` when given; otherwise as many as fit ``max_memory_mib`` (default `DEFAULT_MAX_MEMORY_MIB`) at
    `bytes_per_item` each, at least one. Never more than `total`.
    """
    if total < 1:
        return 1
    if chunk_size is not None:
        return max(1, min(total, int(chunk_size)))
    budget = (DEFAULT_MAX_MEMORY_MIB if max_memory_mib is None else float(max_memory_mib)) * 2**20
    return max(1, min(total, int(budget // max(1.0, float(bytes_per_item)))))


def chunk_slices(total: int, length: int) -> Iterator[slice]:
    """Consecutive slices of at most `length` items covering ``range(total)``."""
    for start in range(0, total, length):
        yield slice(start, min(total, start + length))


def output_dtype(name: str | None, features: torch.Tensor) -> torch.dtype:
    """The dtype an output is allocated in: `name` (``float32``, ``float16``, ``bfloat16``) or the features'."""
    if name is None:
        return features.dtype
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"output_dtype {name!r}: expected one of {', '.join(dtypes)}")
    return dtypes[name]
