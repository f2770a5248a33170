"""make_dict: ``(S0, S1, *rest) -> (S1*S0, *rest)`` for every key, in one launch.

Output row ``j*S0 + i`` is source row ``(i, j)``: with the rows treated as byte strings the
transpose is a pure row permutation, so each output unit finds its source unit with two
divisions and no shared memory. The outputs are written densely (coalesced stores); the
reads are coalesced along each row, which for rows of 16+ bytes is most of the traffic.
The sources (the buffer's storages) are fixed, so their descriptors live in a device table
built once; the outputs are new every call and go in as a tuple of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    BLOCK_BYTES,
    CHUNK,
    I32_LIMIT,
    NUM_WARPS,
    addr,
    cached_table,
    dense_rows,
    device_guard,
    n_programs,
    unit_ptrs,
    word_bytes,
)

# Table columns (strides and sizes in units of the key's WB bytes).
_PTR, _S0U, _S1U, _S0, _RU, _NU, _P0, _P1 = (tl.constexpr(i) for i in range(8))


@triton.jit
def _copy_flat(p_t, d_p, i_b, WB: tl.constexpr, I32: tl.constexpr, BB: tl.constexpr,
               CH: tl.constexpr):  # fmt: skip
    s_p = addr(tl.load(p_t + _PTR))
    s_0 = tl.load(p_t + _S0U)
    s_1 = tl.load(p_t + _S1U)
    n_0 = tl.load(p_t + _S0)
    r_u = tl.load(p_t + _RU)
    n_u = tl.load(p_t + _NU)
    o_0 = i_b * (BB // WB)
    for i_c in range(BB // WB // CH):
        o_d = o_0 + i_c * CH + tl.arange(0, CH)
        m_d = (o_d < n_u)[:, None]
        # Output unit -> output row (j*S0 + i) and column -> source (i, j, column).
        if I32:
            o_32 = o_d.to(tl.int32)
            i_r = o_32 // r_u.to(tl.int32)
            i_j = i_r // n_0.to(tl.int32)
            i_i = i_r - i_j * n_0.to(tl.int32)
            o_c = o_32 - i_r * r_u.to(tl.int32)
        else:
            i_r = o_d // r_u
            i_j = i_r // n_0
            i_i = i_r - i_j * n_0
            o_c = o_d - i_r * r_u
        o_s = i_i.to(tl.int64) * s_0 + i_j.to(tl.int64) * s_1 + o_c
        b_x = tl.load(unit_ptrs(s_p, o_s, WB), mask=m_d)
        tl.store(unit_ptrs(d_p, o_d, WB), b_x, mask=m_d)


@triton.jit
def _transpose_flatten_kernel(tab, outs, K: tl.constexpr, WB: tl.constexpr, I32: tl.constexpr,
                              BB: tl.constexpr, CH: tl.constexpr):  # fmt: skip
    i_p = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        p_t = tab + k * 8
        p_0 = tl.load(p_t + _P0)
        if (i_p >= p_0) & (i_p < tl.load(p_t + _P1)):
            d_p = outs[k].to(tl.pointer_type(tl.int8))
            _copy_flat(p_t, d_p, i_p - p_0, WB[k], I32[k], BB, CH)


def _build(srcs: Sequence[Tensor]):
    rows, wbs, i32s, p = [], [], [], 0
    for s in srcs:
        es = s.element_size()
        rb = math.prod(s.shape[2:]) * es
        s0, s1 = s.shape[:2]
        s0b, s1b = s.stride(0) * es, s.stride(1) * es
        wb = word_bytes(s.data_ptr(), rb, s0b, s1b)
        n_u = s0 * s1 * rb // wb
        q = p + n_programs(s0 * s1 * rb)
        rows.append((s.data_ptr(), s0b // wb, s1b // wb, s0, rb // wb, n_u, p, q))
        wbs.append(wb)
        i32s.append(n_u < I32_LIMIT)
        p = q
    return srcs[0].device, rows, (tuple(wbs), tuple(i32s), p)


def transpose_flatten(srcs: Sequence[Tensor]) -> list[Tensor]:
    """Swap and flatten the first two dims of every tensor, in one launch.

    Args:
        srcs: tensors ``(S0, S1, *rest)`` on one device, any dtypes, any strides (rows that are
            not dense are made contiguous first; strided rows are read in place).

    Returns:
        New contiguous tensors ``(S1*S0, *rest)``; row ``j*S0 + i`` is ``src[i, j]``.
    """
    srcs = [s if s.is_contiguous() or dense_rows(s, 2) else s.contiguous() for s in srcs]
    key = tuple((s.data_ptr(), s.shape, s.stride(), s.dtype) for s in srcs)
    tab, (wbs, i32s, grid), _ = cached_table(key, lambda: _build(srcs))
    outs = [
        torch.empty((s.shape[0] * s.shape[1], *s.shape[2:]), dtype=s.dtype, device=s.device)
        for s in srcs
    ]
    if grid:
        with device_guard(srcs[0]):
            _transpose_flatten_kernel[(grid,)](
                tab, tuple(outs), K=len(outs), WB=wbs, I32=i32s, BB=BLOCK_BYTES, CH=CHUNK,
                num_warps=NUM_WARPS,
            )  # fmt: skip
    return outs
