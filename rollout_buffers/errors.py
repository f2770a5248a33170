"""Exceptions raised by rollout_buffers.

The original ProtoMotions module validated with bare ``assert`` statements, so existing callers
may catch ``AssertionError``. Every error here subclasses both ``AssertionError`` and the
built-in exception that fits the problem (``ValueError``, ``KeyError``, ``IndexError``,
``TypeError``), so ``except AssertionError`` and ``except ValueError`` both keep working.
"""

from __future__ import annotations

__all__ = [
    "RolloutBuffersError",
    "RolloutValueError",
    "RolloutKeyError",
    "RolloutIndexError",
    "RolloutTypeError",
    "BackendUnavailableError",
]


class RolloutBuffersError(AssertionError):
    """Base class of every validation error of rollout_buffers (an ``AssertionError``)."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class RolloutValueError(RolloutBuffersError, ValueError):
    """A value has the wrong shape, dtype, device, size or content."""


class RolloutKeyError(RolloutBuffersError, KeyError):
    """A key is unknown, duplicated, clashes with an attribute, or is not a string."""


class RolloutIndexError(RolloutBuffersError, IndexError):
    """A step or batch index is out of range."""


class RolloutTypeError(RolloutBuffersError, TypeError):
    """An argument has the wrong type (for example an index that is not an integer)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these tensors."""
