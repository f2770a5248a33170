"""Minibatch gather: ``out[k][r] = srcs[k][perm[start + r] % len(srcs[k])]``, in one launch.

The permutation stays on the device and is read by the kernel, so serving a minibatch costs
no host round trip. Each output unit loads its row's permutation entry (the ``RU`` units of a
row hit the same cached word), reduces it modulo the key's length only for keys shorter than
the permutation, and copies its unit. The sources (the dataset's tensors) are fixed, so their
descriptors live in a device table built once; outputs are new every call (a tuple of tensors).
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
_PTR, _S0U, _LEN, _RU, _NU, _P0, _P1 = (tl.constexpr(i) for i in range(7))


@triton.jit
def _copy_rows(p_t, d_p, perm, start, i_b, WB: tl.constexpr, MOD: tl.constexpr,
               I32: tl.constexpr, BB: tl.constexpr, CH: tl.constexpr):  # fmt: skip
    s_p = addr(tl.load(p_t + _PTR))
    s_0 = tl.load(p_t + _S0U)
    n_l = tl.load(p_t + _LEN)
    r_u = tl.load(p_t + _RU)
    n_u = tl.load(p_t + _NU)
    o_0 = i_b * (BB // WB)
    for i_c in range(BB // WB // CH):
        o_d = o_0 + i_c * CH + tl.arange(0, CH)
        m_u = o_d < n_u
        # Output unit -> output row and column; rows and lengths fit in 32 bits.
        if I32:
            o_32 = o_d.to(tl.int32)
            i_r = o_32 // r_u.to(tl.int32)
            o_c = (o_32 - i_r * r_u.to(tl.int32)).to(tl.int64)
        else:
            i_r = o_d // r_u
            o_c = o_d - i_r * r_u
        i_s = tl.load(perm + start + i_r, mask=m_u, other=0)
        if MOD:
            # Python's modulo, in 64 bits: an assigned permutation may hold any int64, and
            # C's % keeps the sign of a negative entry. Never a row outside [0, n_l).
            i_s = i_s % n_l
            i_s = tl.where(i_s < 0, i_s + n_l, i_s)
        o_s = i_s * s_0 + o_c
        b_x = tl.load(unit_ptrs(s_p, o_s, WB), mask=m_u[:, None])
        tl.store(unit_ptrs(d_p, o_d, WB), b_x, mask=m_u[:, None])


@triton.jit(do_not_specialize=["start"])
def _permuted_gather_kernel(tab, outs, perm, start, K: tl.constexpr, WB: tl.constexpr,
                            MOD: tl.constexpr, I32: tl.constexpr, BB: tl.constexpr,
                            CH: tl.constexpr):  # fmt: skip
    i_p = tl.program_id(0).to(tl.int64)
    p_s = perm + start.to(tl.int64)
    for k in tl.static_range(K):
        p_t = tab + k * 8
        p_0 = tl.load(p_t + _P0)
        if (i_p >= p_0) & (i_p < tl.load(p_t + _P1)):
            d_p = outs[k].to(tl.pointer_type(tl.int8))
            _copy_rows(p_t, d_p, p_s, 0, i_p - p_0, WB[k], MOD[k], I32[k], BB, CH)


def _build(srcs: Sequence[Tensor], n: int, count: int, wrap: bool, lengths: Sequence[int]):
    rows, wbs, mods, i32s, p = [], [], [], [], 0
    for s, length in zip(srcs, lengths, strict=True):
        if not 1 <= length <= s.shape[0]:  # the modulo must keep every read inside the tensor
            raise IndexError(
                f"permuted_gather: a modulo length of {length} for a tensor of {s.shape[0]} rows"
            )
        es = s.element_size()
        rb = math.prod(s.shape[1:]) * es
        s0b = s.stride(0) * es
        wb = word_bytes(s.data_ptr(), rb, s0b)
        n_u = count * rb // wb
        q = p + n_programs(count * rb)
        rows.append((s.data_ptr(), s0b // wb, length, rb // wb, n_u, p, q))
        wbs.append(wb)
        mods.append(wrap or length < n)
        i32s.append(n_u < I32_LIMIT)
        p = q
    return srcs[0].device, rows, (tuple(wbs), tuple(mods), tuple(i32s), p)


def permuted_gather(
    srcs: Sequence[Tensor],
    perm: Tensor,
    start: int,
    count: int,
    wrap: bool = False,
    lengths: Sequence[int] | None = None,
) -> list[Tensor]:
    """Gather rows ``perm[start:start+count]`` (modulo each tensor's length), in one launch.

    Args:
        srcs: tensors ``(R_k, *shape_k)`` on ``perm``'s device, any dtypes, any row stride
            (rows that are not dense are made contiguous first). ``R_k >= 1``.
        perm: 1-D int64 permutation of ``range(n)`` (``n < 2**31``), read on the device.
        wrap: ``perm`` may hold any int64 (an assigned permutation): every key then takes its
            entries modulo its length (Python's modulo), not only the shorter keys.
        lengths: per tensor, the length ``L_k`` to take the modulo by, ``1 <= L_k <= R_k``
            (default: ``R_k``); a key is reduced iff ``wrap or L_k < n``. A length
            past the tensor's end is refused (IndexError): no read ever leaves a tensor.
        start: first entry of ``perm`` to use (not a compile-time constant).
        count: rows to gather, ``start + count <= n``.

    Returns:
        New contiguous tensors ``(count, *shape_k)``: ``out[k][r] = srcs[k][perm[start + r] % L_k]``.
    """
    n = perm.shape[0]
    srcs = [s if s.is_contiguous() or dense_rows(s, 1) else s.contiguous() for s in srcs]
    lengths = tuple(s.shape[0] for s in srcs) if lengths is None else tuple(lengths)
    key = (n, count, wrap, lengths) + tuple(
        (s.data_ptr(), s.shape, s.stride(), s.dtype) for s in srcs
    )
    tab, (wbs, mods, i32s, grid), _ = cached_table(
        key, lambda: _build(srcs, n, count, wrap, lengths)
    )
    outs = [torch.empty((count, *s.shape[1:]), dtype=s.dtype, device=s.device) for s in srcs]
    if grid:
        with device_guard(perm):
            _permuted_gather_kernel[(grid,)](
                tab, tuple(outs), perm, start, K=len(outs), WB=wbs, MOD=mods, I32=i32s,
                BB=BLOCK_BYTES, CH=CHUNK, num_warps=NUM_WARPS,
            )  # fmt: skip
    return outs
