"""Unpickling files of numpy arrays (PaddlePaddle checkpoints) without running the code a pickle names.

A pickle can call any importable function while it loads (``__reduce__``): unpickling an untrusted file
can run arbitrary code. `load_array_pickle` admits only the globals that numpy arrays, numpy scalars and
PaddlePaddle's tensor records need, each mapped to a fixed object here (nothing is imported by the name
the file gives), and refuses any other global with an error that names it, before it is called.

Admitted globals:
- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1.x / 2.x
  names), ``numpy.ndarray``, ``numpy.dtype``: how numpy pickles an array;
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: a numpy scalar (e.g. a step count);
- ``builtins.tuple``: PaddlePaddle writes each tensor as ``tuple(((name, array),))``;
- ``_codecs.encode``, restricted to the latin-1 codec: pickle protocol 2 (older Paddle ``.pdparams``)
  writes every ``bytes`` object (an array's raw data) as ``_codecs.encode(text, "latin1")``.

Object arrays (``dtype=object``) are refused too: their elements would be further pickled objects.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy

_numpy_multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
_LATIN1 = codecs.lookup("latin1").name  # "iso8859-1"


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes objects, and for nothing else."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != _LATIN1:
        raise pickle.UnpicklingError(
            f"refused _codecs.encode with encoding {encoding!r}: only latin-1 (how pickle protocol 2 "
            "stores bytes) is admitted"
        )
    return text.encode("latin1", errors)


def _reconstruct_array(subtype: Any, shape: Any, dtype_code: Any) -> Any:
    """numpy's array reconstructor, for plain ``numpy.ndarray`` only (no subclasses)."""
    if subtype is not numpy.ndarray:
        raise pickle.UnpicklingError(f"refused array subtype {subtype!r}: only numpy.ndarray is admitted")
    return _numpy_multiarray._reconstruct(subtype, shape, dtype_code)


def _numpy_scalar(dtype: Any, *data: Any) -> Any:
    """A numpy scalar of a numeric dtype (object scalars would unpickle further objects)."""
    if not isinstance(dtype, numpy.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(
            f"refused numpy scalar of dtype {dtype!r}: only numeric dtypes are admitted"
        )
    return _numpy_multiarray.scalar(dtype, *data)


def _numpy_dtype(*args: Any) -> numpy.dtype:
    dtype = numpy.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refused numpy dtype {dtype}: object arrays are not admitted")
    return dtype


ADMITTED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): numpy.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("builtins", "tuple"): tuple,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global (a class or function) that `ArrayOnlyUnpickler` does not admit."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(
            f"refused global {self.global_name}: this file would import and call it while loading. featlift "
            "unpickles only numpy arrays and scalars (and PaddlePaddle's (name, array) tensor records)"
        )


class ArrayOnlyUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that resolves only `ADMITTED_GLOBALS`, to objects fixed in this module."""

    def find_class(self, module: str, name: str) -> Any:
        found = ADMITTED_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            f"refused persistent id {str(pid)[:60]!r}: a file with external references (e.g. a torch.save "
            "file) is not a plain pickle of arrays"
        )


def _check_no_object_arrays(obj: Any, seen: set[int] | None = None) -> None:
    """Refuse arrays of dtype object anywhere in `obj` (built by `ndarray.__setstate__`, not by a global)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, numpy.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(
                f"refused numpy array of dtype {obj.dtype}: object arrays are not admitted"
            )
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_no_object_arrays(key, seen)
            _check_no_object_arrays(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _check_no_object_arrays(item, seen)


def load_array_pickle(path: str | os.PathLike) -> Any:
    """The object pickled in `path`, which may hold only containers, numbers, strings and numpy arrays.

    Raises `RefusedGlobal` (naming the global) for anything else, and `pickle.UnpicklingError` (or
    another exception of the pickle machinery) for a corrupt file.
    """
    with open(Path(path), "rb") as handle:
        loaded = ArrayOnlyUnpickler(handle).load()
    _check_no_object_arrays(loaded)
    return loaded
