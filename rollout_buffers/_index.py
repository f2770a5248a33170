"""Integer indices from user input, validated on the host."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from torch import Tensor

from .errors import (
    RolloutArgumentTypeError,
    RolloutIndexTensorError,
    RolloutIndexTypeError,
    RolloutShapeError,
    RolloutTypeError,
    RolloutValueError,
)


def int_or_none(value: Any) -> int | None:
    """``value`` as an int when it is an integer (Python or NumPy) and not a bool, else None."""
    if isinstance(value, (bool, Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name: str, value: Any, zero: type[RolloutValueError] = RolloutValueError) -> int:
    """``value`` as a positive int (a NumPy integer is fine), else a RolloutValueError.

    The class also says what the original raised for that value when it used it: a
    TypeError for a non-integer (``torch.zeros``, ``%``), a RuntimeError for a negative size
    (``torch.zeros``); ``zero`` is the class for 0.
    """
    n = int_or_none(value)
    if n is not None and n > 0:
        return n
    cls = RolloutArgumentTypeError if n is None else RolloutShapeError if n < 0 else zero
    raise cls(f"{name} must be a positive int, received {value!r}")


def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int: an int, a NumPy integer or a 0-dim integer CPU tensor.

    Bools and floats are refused (``1.0`` is not a step). So are tensors on an accelerator:
    reading one would synchronize the host with the device on every call; pass a Python int.
    The class of the error includes what torch's indexing raises for that value: IndexError
    for a float or a bool, RuntimeError for a tensor it cannot read as one integer.
    """
    if type(value) is int:
        return value
    ok = not isinstance(value, bool)
    if isinstance(value, Tensor):
        ok = ok and not value.is_floating_point() and value.device.type == "cpu"
    if ok:
        try:
            return operator.index(value)
        except (TypeError, RuntimeError):  # RuntimeError: a tensor with more than one element
            pass
    where = f" on {value.device}" if isinstance(value, Tensor) else ""
    if isinstance(value, Tensor) and (value.numel() != 1 or value.device.type != "cpu"):
        cls: type[RolloutTypeError] = RolloutIndexTensorError
    elif isinstance(value, (bool, float, np.bool_, np.floating)) or (
        isinstance(value, Tensor) and (value.is_floating_point() or value.dtype.is_complex)
    ):
        cls = RolloutIndexTypeError
    else:
        cls = RolloutTypeError
    raise cls(
        f"{what} must be an integer (a Python int, NumPy integer or 0-dim integer CPU tensor), "
        f"received {value!r} ({type(value).__name__}{where})"
    )
