"""Exceptions raised by rollout_buffers.

The original ProtoMotions module validated with bare ``assert`` statements, so existing callers
may catch ``AssertionError``. Every error here subclasses both ``AssertionError`` and the
built-in exception that fits the problem (``ValueError``, ``KeyError``, ``IndexError``,
``TypeError``), so ``except AssertionError`` and ``except ValueError`` both keep working.

Where the original raised something other than an ``AssertionError`` for the same call (torch's
``RuntimeError`` for data of the wrong shape, ``AttributeError`` from ``getattr`` for an unknown
key, ``TypeError``, ``ZeroDivisionError``), the error is an instance of that class too: the
subclasses below add it to one of the five base classes, so ``except RuntimeError`` written
against the original still catches it and ``except RolloutValueError`` still does too.

=============================  ==========================  =====================================
class                          also a                      raised for
=============================  ==========================  =====================================
RolloutShapeError              ValueError, RuntimeError    data that does not broadcast to its
                                                           destination; a negative size
RolloutDeviceError             ValueError, RuntimeError    data on another device; a device
                                                           name torch refuses
RolloutOverlapError            ValueError, RuntimeError    a source that overlaps its
                                                           destination
RolloutArgumentTypeError       ValueError, TypeError       a size, shape or device of a type
                                                           torch refuses (``2.5``, ``"4"``,
                                                           ``None``); a 0-dim tensor in a dataset
RolloutZeroDivisionError       ValueError,                 ``DictDataset`` with ``batch_size=0``
                               ZeroDivisionError
RolloutDimensionError          ValueError, IndexError      ``swap_and_flatten01`` of fewer than
                                                           2 dimensions
RolloutUnknownKeyError         KeyError, AttributeError    a key that was never registered
RolloutKeyTypeError            KeyError, TypeError         a key that is not a string
RolloutNotATensorError         TypeError, AttributeError   data that is not a tensor and does not
                                                           convert to one
RolloutNotAMappingError        TypeError, AttributeError   a ``tensor_dict`` / ``tensors`` that is
                                                           not a mapping
RolloutLayoutError             TypeError, RuntimeError     sparse (not strided) data
RolloutIndexTypeError          TypeError, IndexError       a step or batch index that is a float
                                                           or a bool
RolloutIndexTensorError        TypeError, RuntimeError     an index tensor with more than one
                                                           element, or on a device
=============================  ==========================  =====================================
"""

from __future__ import annotations

__all__ = [
    "RolloutBuffersError",
    "RolloutValueError",
    "RolloutKeyError",
    "RolloutIndexError",
    "RolloutTypeError",
    "RolloutShapeError",
    "RolloutDeviceError",
    "RolloutOverlapError",
    "RolloutArgumentTypeError",
    "RolloutZeroDivisionError",
    "RolloutDimensionError",
    "RolloutUnknownKeyError",
    "RolloutKeyTypeError",
    "RolloutNotATensorError",
    "RolloutNotAMappingError",
    "RolloutLayoutError",
    "RolloutIndexTypeError",
    "RolloutIndexTensorError",
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


# -- the original's class as well (see the table above) --------------------------------------


class RolloutShapeError(RolloutValueError, RuntimeError):
    """Data that does not broadcast to its destination, or a negative size (torch: RuntimeError)."""


class RolloutDeviceError(RolloutValueError, RuntimeError):
    """Data on another device than its destination, or a device torch refuses (RuntimeError)."""


class RolloutOverlapError(RolloutValueError, RuntimeError):
    """A source whose memory overlaps its destination (torch refuses it with a RuntimeError)."""


class RolloutArgumentTypeError(RolloutValueError, TypeError):
    """A size, shape or device of a type torch refuses, as the original's ``torch.zeros`` or
    ``len()`` did with a TypeError (``2.5``, ``"4"``, ``None``, a 0-dim tensor)."""


class RolloutZeroDivisionError(RolloutValueError, ZeroDivisionError):
    """``batch_size=0`` (the original computed ``num_tensors % batch_size``)."""


class RolloutDimensionError(RolloutValueError, IndexError):
    """A tensor with too few dimensions (torch's ``transpose(0, 1)``: IndexError)."""


class RolloutUnknownKeyError(RolloutKeyError, AttributeError):
    """A key that was never registered (the original's ``getattr`` raised AttributeError)."""


class RolloutKeyTypeError(RolloutKeyError, TypeError):
    """A key that is not a string (the original's ``getattr``/``hasattr`` raised TypeError)."""


class RolloutNotATensorError(RolloutTypeError, AttributeError):
    """Data that is not a tensor (the original read ``data.requires_grad`` or ``arr.size()``
    on it: AttributeError)."""


class RolloutNotAMappingError(RolloutTypeError, AttributeError):
    """A mapping argument that is not one (the original called ``.items()`` on it)."""


class RolloutLayoutError(RolloutTypeError, RuntimeError):
    """Data that is not a strided (dense) tensor (torch's copy: RuntimeError)."""


class RolloutIndexTypeError(RolloutTypeError, IndexError):
    """An index that is a float or a bool (torch's indexing: IndexError)."""


class RolloutIndexTensorError(RolloutTypeError, RuntimeError):
    """An index tensor that is not one host integer: several elements, or on a device
    (torch: RuntimeError when it converts it)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for these tensors."""
