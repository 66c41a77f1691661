"""Typed errors: every failure srfx reports is a subclass of :class:`SrfxError`."""
from __future__ import annotations

__all__ = [
    "SrfxError",
    "TraceError",
    "InputError",
    "VerificationError",
    "RewriteError",
]


class SrfxError(Exception):
    """Base class of every error srfx raises on purpose."""


class TraceError(SrfxError):
    """The model could not be turned into an fx graph (data-dependent control flow, ...)."""


class InputError(SrfxError, ValueError):
    """The model, example input or an argument is not something srfx can work with (also a
    ValueError, so code that caught the ValueErrors of argument checks still does)."""


class RewriteError(SrfxError):
    """A pass could not apply its plan; the input model is untouched."""


class VerificationError(SrfxError):
    """The rewritten module does not compute the same function as the original.

    ``max_abs_error``, ``max_rel_error`` and ``tolerance`` carry the measurement.
    """

    def __init__(self, message: str, *, max_abs_error: float, max_rel_error: float, tolerance: float):
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.max_rel_error = max_rel_error
        self.tolerance = tolerance
