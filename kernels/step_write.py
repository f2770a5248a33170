"""Rollout step write: ``dsts[k][index] = srcs[k]`` for every key, in one launch.

Each destination is a contiguous ``(T, N, *shape)`` buffer, so the step ``index`` of key k is
one contiguous region of ``N * row_bytes`` bytes. The buffers are fixed for the life of an
``ExperienceBuffer``, so their descriptors (address, bytes per step, row bytes, the programs
that serve the key) live in a device table built once; the sources change every step, so
they are kernel arguments (a tuple of tensors: no table to copy per step, and a CUDA graph
captured after one warm-up call replays with whatever the static sources hold).
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
    NUM_WARPS,
    STEP_TABLES,
    addr,
    cached_table,
    dense_rows,
    device_guard,
    n_programs,
    unit_ptrs,
    word_bytes,
)

# Table columns.
_PTR, _NB, _RB, _P0, _P1 = (tl.constexpr(i) for i in range(5))


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
    i_p = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        p_t = tab + k * 8
        p_0 = tl.load(p_t + _P0)
        if (i_p >= p_0) & (i_p < tl.load(p_t + _P1)):
            n_b = tl.load(p_t + _NB)
            d_p = addr(tl.load(p_t + _PTR)) + index.to(tl.int64) * n_b
            s_p = srcs[k].to(tl.pointer_type(tl.int8))
            _copy_step(s_p, s_us[k], d_p, i_p - p_0, n_b, tl.load(p_t + _RB),
                       WB[k], FLAT[k], I32[k], BB, CH)  # fmt: skip


def _build(dsts: Sequence[Tensor]):
    rows, keys, p = [], [], 0
    for d in dsts:
        rb = math.prod(d.shape[2:]) * d.element_size()
        nb = d.shape[1] * rb
        ptr = d.data_ptr()
        q = p + n_programs(nb)
        rows.append((ptr, nb, rb, p, q))
        # Widest units the destination allows for a flat copy of the step / row by row.
        keys.append((nb, rb, word_bytes(ptr, nb), word_bytes(ptr, rb)))
        p = q
    return dsts[0].device, rows, (tuple(keys), p)


def step_write(dsts: Sequence[Tensor], index: int, srcs: Sequence[Tensor]) -> None:
    """Write ``srcs[k]`` into step ``index`` of ``dsts[k]`` for every k, in one launch.

    Args:
        dsts: contiguous ``(T, N, *shape)`` tensors, all on one device (any dtypes).
        index: the step, ``0 <= index < T`` (not checked here; not a compile-time constant,
            so a new step never recompiles the kernel).
        srcs: one tensor per destination, same dtype and device, shape exactly
            ``(N, *shape)``, any strides (an ``expand``-ed row stride of 0 or the row stride of
            a slice are read in place; a non-dense row is made contiguous first).
    """
    key = tuple((d.data_ptr(), d.shape, d.dtype) for d in dsts)
    tab, (info, grid), _ = cached_table(key, lambda: _build(dsts), STEP_TABLES)
    if grid == 0:
        return
    args, s_us, wbs, flats, i32s = [], [], [], [], []
    for s, (nb, _, wb_flat, wb_row) in zip(srcs, info, strict=True):
        if not (s.is_contiguous() or dense_rows(s, 1)):
            s = s.contiguous()
        ptr = s.data_ptr()
        if s.is_contiguous() or s.shape[0] == 1:
            wb, flat, s_u = word_bytes(wb_flat, ptr), True, 0
        else:
            s_b = s.stride(0) * s.element_size()
            wb, flat = word_bytes(wb_row, ptr, s_b), False
            s_u = s_b // wb
        args.append(s)
        s_us.append(s_u)
        wbs.append(wb)
        flats.append(flat)
        i32s.append(nb // wb < I32_LIMIT)
    with device_guard(dsts[0]):
        _step_write_kernel[(grid,)](
            tab, tuple(args), tuple(s_us), index, K=len(args), WB=tuple(wbs),
            FLAT=tuple(flats), I32=tuple(i32s), BB=BLOCK_BYTES, CH=CHUNK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
