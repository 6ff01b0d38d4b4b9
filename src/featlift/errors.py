"""Exceptions featlift raises for bad input: each message names the value and what was expected."""

from __future__ import annotations


class FeatliftError(Exception):
    """Base class of the errors a user can fix (bad path, wrong checkpoint, bad size, ...)."""


class BackboneError(FeatliftError):
    """The backbone cannot be built or loaded, or it cannot give the requested layer or facet."""


class CheckpointError(FeatliftError):
    """A checkpoint is missing, malformed or of an unknown format version."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was trained for another backbone, layer, facet or channel count."""


class ImageReadError(FeatliftError):
    """An image file cannot be opened or decoded."""


class InputSizeError(FeatliftError, ValueError):
    """An input tensor or size does not fit the backbone (e.g. not a multiple of the patch size)."""


class OutputWriteError(FeatliftError):
    """An output file cannot be written (full disk, quota, read-only file system, I/O error)."""
