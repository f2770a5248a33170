"""Integer indices from user input, validated on the host."""

from __future__ import annotations

import operator
from typing import Any

from torch import Tensor

from .errors import RolloutTypeError, RolloutValueError


def int_or_none(value: Any) -> int | None:
    """``value`` as an int when it is an integer (Python or NumPy) and not a bool, else None."""
    if isinstance(value, (bool, Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name: str, value: Any) -> int:
    """``value`` as a positive int (a NumPy integer is fine), else a RolloutValueError."""
    n = int_or_none(value)
    if n is None or n <= 0:
        raise RolloutValueError(f"{name} must be a positive int, received {value!r}")
    return n


def as_index(value: Any, what: str) -> int:
    """``value`` as a Python int: an int, a NumPy integer or a 0-dim integer CPU tensor.

    Bools and floats are refused (``1.0`` is not a step). So are tensors on an accelerator:
    reading one would synchronize the host with the device on every call; pass a Python int.
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
    raise RolloutTypeError(
        f"{what} must be an integer (a Python int, NumPy integer or 0-dim integer CPU tensor), "
        f"received {value!r} ({type(value).__name__}{where})"
    )
