"""Rollout step write: ``dsts[k][index] = srcs[k]`` for every key, in one launch.

Each destination is a contiguous ``(T, N, *shape)`` buffer, so the step ``index`` of key k is
one contiguous region of ``N * row_bytes`` bytes. The buffers are fixed for the life of an
``ExperienceBuffer``, so their descriptors (address, bytes per step, row bytes, first program)
live in a device table built once; the sources change every step, so they are kernel arguments
(a tuple of pointers: no table to copy per step, and a CUDA graph captured after one warm-up
call replays with whatever the static sources hold).

A program finds its key with one vector load of the table's first-program column (not a walk
over the keys with a dependent load each), then copies ``BB`` bytes of that key's step region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    BLOCK_BYTES,
    CHUNK,
    I32_LIMIT,
    STEP_TABLES,
    LaunchPlan,
    addr,
    cached_table,
    dense_rows,
    n_programs,
    pow2,
    unit_ptrs,
    word_bytes,
)

__all__ = ["StepWriter", "step_write", "step_writer"]


@triton.jit
def _copy_step(s_p, s_u, d_p, i_b, n_b, r_b, WB: tl.constexpr, FLAT: tl.constexpr,
               I32: tl.constexpr, BB: tl.constexpr, CH: tl.constexpr):  # fmt: skip
    # Units [i_b*BB/WB, (i_b+1)*BB/WB) of one key's step region, CH at a time.
    n_u = n_b // WB
    r_u = r_b // WB
    o_0 = i_b * (BB // WB)
    for i_c in range(BB // WB // CH):
        o_d = o_0 + i_c * CH + tl.arange(0, CH)
        m_d = (o_d < n_u)[:, None]
        if FLAT:
            # Source laid out like the destination: a straight copy.
            o_s = o_d
        elif I32:
            o_32 = o_d.to(tl.int32)
            i_r = o_32 // r_u.to(tl.int32)
            o_s = i_r.to(tl.int64) * s_u + (o_32 - i_r * r_u.to(tl.int32))
        else:
            i_r = o_d // r_u
            o_s = i_r * s_u + (o_d - i_r * r_u)
        b_x = tl.load(unit_ptrs(s_p, o_s, WB), mask=m_d)
        tl.store(unit_ptrs(d_p, o_d, WB), b_x, mask=m_d)


@triton.jit(do_not_specialize=["index"])
def _step_write_kernel(tab, srcs, s_us, index, K: tl.constexpr, WB: tl.constexpr,
                       FLAT: tl.constexpr, I32: tl.constexpr, BB: tl.constexpr,
                       CH: tl.constexpr):  # fmt: skip
    # Table row k: [address, bytes per step, bytes per row, first program of key k].
    i_p = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, pow2(K))
    p_0s = tl.load(tab + o_k * 4 + 3, mask=o_k < K, other=1 << 62)
    i_k = tl.sum((p_0s <= i_p).to(tl.int32), axis=0) - 1
    p_0 = tl.max(tl.where(o_k == i_k, p_0s, 0), axis=0)
    for k in tl.static_range(K):
        if i_k == k:
            p_t = tab + k * 4
            n_b = tl.load(p_t + 1)
            d_p = addr(tl.load(p_t)) + index.to(tl.int64) * n_b
            s_p = srcs[k].to(tl.pointer_type(tl.int8))
            _copy_step(s_p, s_us[k], d_p, i_p - p_0, n_b, tl.load(p_t + 2),
                       WB[k], FLAT[k], I32[k], BB, CH)  # fmt: skip


def _build(dsts: Sequence[Tensor]):
    rows, keys, p = [], [], 0
    for d in dsts:
        rb = math.prod(d.shape[2:]) * d.element_size()
        nb = d.shape[1] * rb
        ptr = d.data_ptr()
        rows.append((ptr, nb, rb, p))
        # Widest units the destination allows for a flat copy of the step / row by row.
        keys.append((nb, rb, word_bytes(ptr, nb), word_bytes(ptr, rb)))
        p += n_programs(nb)
    return dsts[0].device, rows, (tuple(keys), p)


class StepWriter:
    """The step write of a fixed list of destinations, prepared once and called every step.

    ``writer(index, srcs)`` writes ``srcs[k]`` into step ``index`` of ``dsts[k]``. Sources of
    one layout (every source contiguous, or the same strides and alignments as a call before)
    replay a cached launch plan: per call, one ``data_ptr()`` per source and the launch.

    Args:
        dsts: contiguous ``(T, N, *shape)`` tensors, all on one device (any dtypes), whose
            storage stays where it is for the writer's life (the buffer's own tensors).
    """

    __slots__ = ("dsts", "table", "tptr", "info", "grid", "plans", "device", "complex",
                 "_aligned")  # fmt: skip

    def __init__(self, dsts: Sequence[Tensor]) -> None:
        self.dsts = tuple(dsts)
        key = tuple((d.data_ptr(), d.shape, d.dtype) for d in dsts)
        self.table, (self.info, self.grid), _ = cached_table(
            key, lambda: _build(dsts), STEP_TABLES, cols=4
        )
        self.tptr = self.table.data_ptr()
        self.device = dsts[0].device
        self.complex = any(d.is_complex() for d in dsts)
        self.plans: dict[tuple, tuple] = {}
        self._aligned: tuple | None = None  # the plan of contiguous, 16-byte aligned sources

    def __call__(self, index: int, srcs: Sequence[Tensor]) -> None:
        """Write step ``index`` (``0 <= index < T``, not checked; not a compile-time constant,
        so a new step never recompiles). ``srcs[k]`` has ``dsts[k]``'s dtype and device and
        shape exactly ``(N, *shape)``, any strides (an ``expand``-ed row of stride 0 or the
        rows of a slice are read in place; a non-dense row is made contiguous first)."""
        hit = self._aligned
        if hit is not None and not self.complex:
            # The common case: contiguous sources on 16-byte boundaries (as the caching
            # allocator hands them out) replay one plan; per source a few attribute reads.
            ptrs, acc = [], 0
            for s in srcs:
                if not s.is_contiguous() or s.is_neg():
                    break
                p = s.data_ptr()
                acc |= p
                ptrs.append(p)
            else:
                if not acc & 15:
                    plan, s_us = hit
                    if not plan.direct(self.tptr, tuple(ptrs), s_us, index):
                        plan.generic(self.table, tuple(srcs), s_us, index)
                    return
        if self.grid:
            self._general(index, srcs)

    exact = True  # sources must have the destinations' dtype and row shape

    def dense(self, index: int, srcs: Sequence[Tensor]) -> None:
        """:meth:`__call__` for sources the caller checked: each contiguous, of its
        destination's dtype and row shape, and no view (so no lazy sign flag either)."""
        hit = self._aligned
        if hit is not None:
            ptrs = [s.data_ptr() for s in srcs]
            acc = 0
            for p in ptrs:
                acc |= p
            if not acc & 15:
                plan, s_us = hit
                if not plan.direct(self.tptr, tuple(ptrs), s_us, index):
                    plan.generic(self.table, tuple(srcs), s_us, index)
                return
        self(index, srcs)

    def _general(self, index: int, srcs: Sequence[Tensor]) -> None:
        args, layout, wbs, flats, i32s, s_us = [], [], [], [], [], []
        aligned = True
        for s, (nb, _, wb_flat, wb_row) in zip(srcs, self.info, strict=True):
            if s.is_neg() or s.is_conj():  # a lazy sign flag is not in the bytes: apply it
                s = s.resolve_conj().resolve_neg()
            if not (s.is_contiguous() or dense_rows(s, 1)):
                s = s.contiguous()
            ptr = s.data_ptr()
            if s.is_contiguous() or s.shape[0] == 1:
                wb, flat, s_u = word_bytes(wb_flat, ptr), True, 0
            else:
                s_b = s.stride(0) * s.element_size()
                wb, flat = word_bytes(wb_row, ptr, s_b), False
                s_u = s_b // wb
                aligned = False
            aligned = aligned and not ptr & 15 and s.is_contiguous()
            args.append(s)
            layout.append((wb, flat, s_u, ptr & 15 == 0))
            wbs.append(wb)
            flats.append(flat)
            i32s.append(nb // wb < I32_LIMIT)
            s_us.append(s_u)
        key = tuple(layout)
        hit = self.plans.get(key)
        if hit is None:
            cx = dict(K=len(args), WB=tuple(wbs), FLAT=tuple(flats), I32=tuple(i32s),
                      BB=BLOCK_BYTES, CH=CHUNK)  # fmt: skip
            hit = self.plans[key] = (LaunchPlan(_step_write_kernel, self.grid, cx, self.device),
                                     tuple(s_us))  # fmt: skip
            if aligned:
                self._aligned = hit
        plan, s_us = hit
        if not plan.direct(self.tptr, tuple(s.data_ptr() for s in args), s_us, index):
            plan.generic(self.table, tuple(args), s_us, index)


def step_writer(dsts: Sequence[Tensor]) -> StepWriter:
    """A :class:`StepWriter` of ``dsts``. Not cached here: a writer holds its destinations,
    and the caller (a buffer) keeps it as long as they live. Its descriptor table is cached by
    content, so a second writer of the same storages costs no new table."""
    return StepWriter(dsts)


def step_write(dsts: Sequence[Tensor], index: int, srcs: Sequence[Tensor]) -> None:
    """Write ``srcs[k]`` into step ``index`` of ``dsts[k]`` for every k, in one launch.

    Args:
        dsts: contiguous ``(T, N, *shape)`` tensors, all on one device (any dtypes).
        index: the step, ``0 <= index < T`` (not checked here).
        srcs: one tensor per destination, same dtype and device, shape exactly
            ``(N, *shape)``, any strides.
    """
    step_writer(dsts)(index, srcs)
