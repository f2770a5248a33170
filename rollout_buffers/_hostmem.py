"""Host memory for large CPU outputs, reused only after PyTorch has freed it.

On Linux, glibc serves every block of 128 KiB and more with a fresh ``mmap`` (up to its
threshold cap of 32 MiB, and always beyond it), and the kernel zero-fills every 4 KiB page on
first touch: a humanoid-sized minibatch paged in ~100k times an epoch, about half of the CPU
gather's time. :func:`empty` keeps such blocks after use instead. A block goes back to the pool
only when PyTorch drops its last reference to the storage made over it: no tensor, view,
storage object, NumPy array, DLPack capsule or autograd graph can still see it, and a storage
moved to shared memory for another process has already let go of it. So memory handed out is
never written again while anything can observe it; the reuse is what any allocator does after
a ``free``. Nothing here looks at reference counts.

The blocks are NumPy byte arrays: a tensor made with ``torch.from_numpy`` holds a reference to
its array until its storage is freed, and a weak reference to that array says when. Such a
storage cannot grow: ``resize_`` to more bytes, or an ``out=`` of a bigger result, raises
torch's "Trying to resize storage that is not resizable". :func:`set_host_pool` (or
``ROLLOUT_BUFFERS_HOST_POOL=0``) turns the pool off: every output then comes from
``torch.empty``, as the original's, and pays the page faults.
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

__all__ = ["empty", "MIN_BYTES", "host_pool", "set_host_pool"]

#: Outputs smaller than this come from ``torch.empty`` (glibc reuses its heap for them).
MIN_BYTES = 1 << 17
# Free blocks kept: per size, and in all (beyond these a returned block is freed for real).
_PER_SIZE = 4
_TOTAL = 512 << 20

_enabled = os.environ.get("ROLLOUT_BUFFERS_HOST_POOL", "1").strip().lower() not in (
    "0", "false", "no", "off", "",
)  # fmt: skip


def host_pool() -> bool:
    """Whether large CPU minibatch outputs are made over the pool's freed blocks (default)."""
    return _enabled


def set_host_pool(enabled: bool) -> None:
    """``False``: CPU minibatch outputs come from ``torch.empty`` (resizable, as the original's;
    the kernel's zero-filling page faults come back). ``True`` (default): the pool."""
    global _enabled
    _enabled = bool(enabled)


# Reentrant: a garbage collection inside a critical section (any container allocated there may
# start one) can free a pooled tensor, whose callback comes back here in the same thread.
_lock = threading.RLock()
_free: dict[int, list[np.ndarray]] = {}  # nbytes -> blocks nobody can see
_held = [0]  # bytes in _free
_out: dict[int, tuple] = {}  # id(weak ref) -> (weak ref, nbytes, block) for blocks handed out


def _returned(ref: weakref.ref) -> None:
    """PyTorch freed the last storage over a block (the array view made for it died)."""
    try:
        _, nbytes, block = _out.pop(id(ref))
    except (KeyError, TypeError):  # interpreter shutdown
        return
    with _lock:
        blocks = _free.setdefault(nbytes, [])
        if len(blocks) < _PER_SIZE and _held[0] + nbytes <= _TOTAL:
            blocks.append(block)
            _held[0] += nbytes


def empty(shape: tuple, dtype: torch.dtype, nbytes: int) -> Tensor:
    """An uninitialized contiguous CPU tensor of ``shape`` and ``dtype`` (``nbytes`` bytes, at
    least :data:`MIN_BYTES`), made over a block that PyTorch freed earlier when there is one."""
    with _lock:
        blocks = _free.get(nbytes)
        block = blocks.pop() if blocks else None
        if block is not None:
            _held[0] -= nbytes
    if block is None:
        block = np.empty(nbytes, np.uint8)
    view = block[:]  # a new array: the storage below holds it, and it alone, to the end
    ref = weakref.ref(view, _returned)
    _out[id(ref)] = (ref, nbytes, block)
    storage = torch.from_numpy(view).untyped_storage()
    # device="cpu": a default-device context (torch.set_default_device) must not move it.
    return torch.empty(0, dtype=dtype, device="cpu").set_(storage, 0, shape)
