"""A source that overlaps its destination is refused, as torch refuses it, on every backend.

``buffer[t] = buffer.view(-1)[1:5]`` reads elements that the same copy writes. PyTorch refuses
such a partial overlap with a RuntimeError; a fused kernel would race on it (one launch writes
while it reads). This module checks the byte ranges on the host, before anything is written.
It only looks at memory: a source whose storage is not a destination's costs one pointer
compare per source, and the callers only call it for views (a tensor that is not a view owns
its storage, and so does every buffer ``register_key`` allocated).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .errors import RolloutOverlapError

__all__ = ["check_sources"]


def _storage_base(t: Tensor) -> int:
    """The address of ``t``'s storage (what ``t.untyped_storage().data_ptr()`` returns, without
    making the storage object: also for tensors without one, such as host-cost stand-ins)."""
    return t.data_ptr() - t.storage_offset() * t.element_size()


def _span(t: Tensor) -> tuple[int, int]:
    """``[first byte, one past the last byte)`` of the elements of ``t`` (strides are >= 0)."""
    lo = t.data_ptr()
    return lo, lo + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def check_sources(
    keys: Sequence[str],
    dsts: Sequence[Tensor],
    index: int | None,
    srcs: Sequence[Tensor],
    where: str,
) -> bool:
    """Refuse a source that overlaps its own destination; say whether one overlaps another's.

    ``srcs[k]`` is written into step ``index`` of ``dsts[k]`` (contiguous ``(T, N, ...)``
    buffers), or into the whole buffer when ``index`` is None. A source whose bytes overlap its
    own destination raises :class:`RolloutOverlapError` (a ``RuntimeError``, as torch's), except
    the destination itself (a no-op copy, which torch allows too) and a single element (read
    before anything is written, as torch's ``fill_`` does). The refusal also covers overlaps
    torch lets through because it cannot analyse them (a strided or broadcast view of the
    destination): their result would depend on the order of the copy.

    Returns True when a source overlaps *another* key's destination: one fused launch would race
    there, so the caller writes key by key instead, which gives PyTorch's sequential result.
    """
    dst_storages = None
    sequential = False
    for k, src in enumerate(srcs):
        if src.numel() == 0:
            continue
        storage = _storage_base(src)
        if src.data_ptr() == 0:  # no memory behind it (a meta tensor)
            continue
        if dst_storages is None:
            dst_storages = [_storage_base(d) for d in dsts]
        for j, dst in enumerate(dsts):
            if dst_storages[j] != storage:
                continue
            if index is None:
                region = (dst.data_ptr(), dst.data_ptr() + dst.numel() * dst.element_size())
                shape, stride = dst.shape, dst.stride()
            else:
                size = dst.stride(0) * dst.element_size()
                region = (dst.data_ptr() + index * size, dst.data_ptr() + (index + 1) * size)
                shape, stride = dst.shape[1:], dst.stride()[1:]
            lo, hi = _span(src)
            if hi <= region[0] or region[1] <= lo:
                continue
            if j != k:
                sequential = True
                continue
            if src.numel() == 1 or (
                lo == region[0] and src.shape == shape and src.stride() == stride
            ):
                continue
            step = "the whole buffer" if index is None else f"step {index}"
            raise RolloutOverlapError(
                f"{keys[k]}: {where} received a source that overlaps its destination ({step} of "
                f"'{keys[k]}'): the copy would read elements it has already written (torch "
                f"refuses it as well: 'some elements of the input tensor and the written-to "
                f"tensor refer to a single memory location'); clone() the source first"
            )
    return sequential
