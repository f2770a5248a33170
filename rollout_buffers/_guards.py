"""What the fast paths prove before they skip a check, each named for what it proves.

A fast path may skip validation only where it can show, cheaply, the invariant the validation
stands for. These are those invariants, read from what a tensor *is* (its storage's address
and size, its own address, shape and strides, its version counter), never from a proxy (a
reference count, ``_base is None``, an object's identity):

- :class:`Footprint`: the bytes a set of storages covers. A tensor that starts outside them
  shares no memory with them: every tensor over a storage starts inside that storage (PyTorch
  checks the bounds of every view), so one address compare proves it. That is also how torch
  decides overlap (storages, then byte ranges); a tensor that starts inside takes the full
  byte-range analysis (``_overlap.check_sources``). Like torch, a storage made over raw memory
  that straddles two allocations is not detected.
- :func:`contents`: what a cache of a tensor was made from (address, version counter, shape,
  strides): a copy of it, a descriptor table holding its raw address, rows worked out from it.
  The cache is valid while these are the same: an in-place write bumps the version,
  ``.data =`` / ``set_`` move the address or the layout.
- :func:`storage_range`: the bytes of a tensor's whole storage, which every tensor over that
  storage starts inside (what :class:`Footprint` is made of).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from torch import Tensor

__all__ = ["Footprint", "contents", "storage_range"]


def storage_range(t: Tensor) -> tuple[int, int]:
    """``[first byte, one past the last byte)`` of ``t``'s whole storage: every tensor over
    that storage starts inside it. A tensor without a real storage (a wrapper subclass, such as
    the stand-in CUDA tensors host cost is measured with) gets its own elements' extent."""
    try:
        s = t.untyped_storage()
        lo = s.data_ptr()
        return lo, lo + s.nbytes()
    except RuntimeError:
        lo = t.data_ptr()
        extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n)
        return lo, lo + (extent * t.element_size() if t.numel() else 0)


class Footprint:
    """The byte ranges of some tensors' whole storages (a buffer's keys)."""

    __slots__ = ("lo", "hi", "starts", "ends")

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        # Sorted, disjoint [start, end) ranges (storages shared by several keys merged), so
        # that the one a pointer may fall in is found by bisection.
        merged: list[list[int]] = []
        for lo, hi in sorted(storage_range(t) for t in tensors):
            if merged and lo < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.starts = [lo for lo, _ in merged]
        self.ends = [hi for _, hi in merged]
        self.lo = self.starts[0] if merged else 0
        self.hi = self.ends[-1] if merged else -1

    def excludes(self, t: Tensor) -> bool:
        """Whether ``t`` provably shares no memory with these storages: it starts outside all
        of them. (Inside one, it may or may not overlap: the caller then checks byte ranges.)
        Hot paths inline it: ``not lo <= p < hi``, then :meth:`excludes_inside`. The ranges
        are half-open: a tensor starting at a storage's end holds none of its bytes (only an
        empty view can), and the next allocation often starts exactly there."""
        p = t.data_ptr()
        return not self.lo <= p < self.hi or self.excludes_inside(p)

    def excludes_inside(self, p: int) -> bool:
        """:meth:`excludes` of an address between ``lo`` and ``hi``: in a gap between storages."""
        i = bisect_right(self.starts, p)
        return i == 0 or p >= self.ends[i - 1]


def contents(t: Tensor) -> tuple:
    """The state a copy of ``t`` was made from: equal later iff the copy still matches.

    An inference tensor keeps no version counter: its stamp never equals another, so a cache
    of one is rebuilt every time (correct, slower).
    """
    try:
        version = t._version
    except RuntimeError:
        version = object()
    return t.data_ptr(), version, t.shape, t.stride()
