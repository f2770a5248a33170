"""Host arrays to the device without synchronizing (the permutations drawn with NumPy)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def host_to_device(
    array: np.ndarray, device: torch.device, out: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``array`` as an int64 tensor on ``device`` (written into ``out`` when given), and the
    host tensor the copy reads from.

    On CUDA the copy goes through pinned memory and is non-blocking: the host does not wait for
    it, so the caller must keep the returned host tensor alive until the copy has run (keeping
    it until the next call is enough: copies on one stream run in order). On CPU no copy is
    made unless ``out`` is given, and the host tensor returned is ``None``.
    """
    host = torch.from_numpy(array.astype(np.int64, copy=False))
    if device.type == "cuda":
        host = host.pin_memory()
        if out is None:
            return host.to(device, non_blocking=True), host
        out.copy_(host, non_blocking=True)
        return out, host
    if out is None:
        return host.to(device), None  # CPU: the same memory, no copy
    out.copy_(host)
    return out, None
