"""Integer indices from user input, validated on the host."""

from __future__ import annotations

import operator
from typing import Any

from torch import Tensor

from .errors import RolloutTypeError


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
