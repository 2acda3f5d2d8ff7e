"""The converter's two failure kinds: bad input (exit status 2) and a repo that does not reproduce its input (1)."""

from __future__ import annotations


class ConversionError(ValueError):
    """The input cannot be converted (missing files or weights, wrong model type, existing output, ...)."""


class VerificationError(RuntimeError):
    """The converted repo does not reproduce the input."""
