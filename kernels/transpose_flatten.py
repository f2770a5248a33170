"""make_dict: ``(S0, S1, *rest) -> (S1*S0, *rest)`` for every key, in one launch.

Output row ``j*S0 + i`` is source row ``(i, j)``: with the rows treated as byte strings the
transpose is a pure row permutation. A program owns a tile of ``R`` source columns ``j`` and
walks every row ``i``, so both indices come from loop counters (no division at all), and copies
each row as a plain range of units (coalesced; 128-bit for 16-byte units). A program finds its
key with one vector load of the table's first-program column. The sources (the buffer's
storages) are fixed, so their descriptors live in a device table built once; the outputs are
new every call and go in as a tuple of pointers.

A key served in another dtype than it is stored in (``out_dtypes``: a bfloat16 storage served
as float32) is moved as elements, ``V`` per unit, and widened in-kernel (``_convert.py``), in
the same launch as the byte keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    I32_LIMIT,
    LaunchPlan,
    addr,
    cached_table,
    dense_rows,
    pow2,
    row_tiles,
    tile_ptrs,
    tile_vptrs,
    vec_elems,
    word_bytes,
)
from ._convert import BYTES_CV, code_of, converts, cvt, typed

__all__ = ["Flattener", "flattener", "transpose_flatten"]


@triton.jit
def _flatten_key(p_t, d_p, i_b, WB: tl.constexpr, I32: tl.constexpr, RU: tl.constexpr,
                 R: tl.constexpr, CB: tl.constexpr, NT: tl.constexpr, S: tl.constexpr,
                 D: tl.constexpr, V: tl.constexpr, SB: tl.constexpr,
                 DB: tl.constexpr):  # fmt: skip
    # Table row: [address, s0, s1 (units), S0, S1, first program]. A program owns R x NT
    # columns j of the source and every row i: output row j*S0 + i and source row (i, j) come
    # from the loop counters, with no division at all. S == 0: a key copied as bytes; else
    # units of V elements (of SB and DB bytes), converted from code S to code D.
    s_p = addr(tl.load(p_t))
    if S > 0:
        s_v = typed(s_p, S)
        d_v = typed(d_p, D)
        if V > 1:
            s_v = tl.multiple_of(s_v, V * SB)
            d_v = tl.multiple_of(d_v, V * DB)
    s_0 = tl.load(p_t + 1)
    s_1 = tl.load(p_t + 2)
    n_0 = tl.load(p_t + 3)
    n_1 = tl.load(p_t + 4)
    if I32:
        s_0 = s_0.to(tl.int32)
        s_1 = s_1.to(tl.int32)
        n_0 = n_0.to(tl.int32)
    for i_t in range(NT):
        o_j = (i_b * NT + i_t) * R + tl.arange(0, R)
        m_j = o_j < n_1
        if I32:
            o_j = o_j.to(tl.int32)
        o_sj = o_j * s_1
        o_dj = o_j * (n_0 * RU)
        for i in range(n_0):
            o_s = o_sj + i * s_0
            o_d = o_dj + i * RU
            for i_c in range((RU + CB - 1) // CB):
                o_c = i_c * CB + tl.arange(0, CB)
                m = (m_j[:, None] & (o_c < RU)[None, :])[:, :, None]
                if S == 0:
                    b_x = tl.load(tile_ptrs(s_p, o_s, o_c, WB), mask=m)
                    tl.store(tile_ptrs(d_p, o_d, o_c, WB), b_x, mask=m)
                else:
                    b_x = tl.load(tile_vptrs(s_v, o_s, o_c, V), mask=m)
                    tl.store(tile_vptrs(d_v, o_d, o_c, V), cvt(b_x, S, D), mask=m)


@triton.jit
def _transpose_flatten_kernel(tab, outs, K: tl.constexpr, WB: tl.constexpr, I32: tl.constexpr,
                              RU: tl.constexpr, R: tl.constexpr, CB: tl.constexpr,
                              NT: tl.constexpr, CV: tl.constexpr):  # fmt: skip
    i_p = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, pow2(K))
    p_0s = tl.load(tab + o_k * 8 + 5, mask=o_k < K, other=1 << 62)
    i_k = tl.sum((p_0s <= i_p).to(tl.int32), axis=0) - 1
    p_0 = tl.max(tl.where(o_k == i_k, p_0s, 0), axis=0)
    for k in tl.static_range(K):
        if i_k == k:
            d_p = outs[k].to(tl.pointer_type(tl.int8))
            _flatten_key(tab + k * 8, d_p, i_p - p_0, WB[k], I32[k], RU[k], R[k], CB[k], NT[k],
                         CV[k][0], CV[k][1], CV[k][2], CV[k][3], CV[k][4])  # fmt: skip


def _build(srcs: Sequence[Tensor], out_dtypes: Sequence[torch.dtype]):
    rows, cx, p = [], [], 0
    for s, od in zip(srcs, out_dtypes, strict=True):
        es = s.element_size()
        re = math.prod(s.shape[2:])
        s0, s1 = s.shape[:2]
        s0b, s1b = s.stride(0) * es, s.stride(1) * es
        if od == s.dtype:  # bytes: the widest unit the sizes, strides and address allow
            wb = word_bytes(s.data_ptr(), re * es, s0b, s1b)
            cv, su, rb, ub = BYTES_CV, wb, re * es, wb
        else:  # elements: V per unit, converted (programs sized by the bytes written)
            db = od.itemsize
            v = vec_elems(es, db, (re, s.stride(0), s.stride(1)), s.data_ptr())
            cv, wb = (code_of(s.dtype), code_of(od), v, es, db), 0
            su, rb, ub = v * es, re * db, v * db
        ru, r, cb, nt = row_tiles(rb, ub, depth=s0)
        extent = (s0 - 1) * (s0b // su) + (s1 - 1) * (s1b // su) + ru
        i32 = extent < I32_LIMIT and s0 * s1 * ru < I32_LIMIT
        rows.append((s.data_ptr(), s0b // su, s1b // su, s0, s1, p))
        cx.append((wb, i32, ru, r, cb, nt, cv))
        p += -(-s1 // (r * nt)) if ru and s0 else 0
    return srcs[0].device, rows, (tuple(cx), p)


class Flattener:
    """``swap_and_flatten01`` of a fixed list of sources, prepared once, called per flatten.

    ``flattener()`` returns new contiguous tensors ``(S1*S0, *rest)``: row ``j*S0 + i`` is
    ``src[i, j]``, in ``out_dtypes[k]`` (converted in the same launch). Every call replays one
    cached launch plan.

    Args:
        srcs: tensors ``(S0, S1, *rest)`` on one device, any dtypes, any strides on the first
            two dims (rows that are not dense are made contiguous first).
        out_dtypes: per source, the dtype to serve it in (``None``, or an entry ``None``: its
            own dtype, moved as bytes). Converted in-kernel where :func:`converts` allows (a
            bfloat16 or float16 storage widened to float32: exact), else cast with torch after
            the launch (one more copy).
    """

    __slots__ = ("srcs", "table", "tptr", "cx", "grid", "device", "outs", "plans", "post")

    def __init__(self, srcs: Sequence[Tensor], out_dtypes: Sequence | None = None) -> None:
        ods = [s.dtype for s in srcs] if out_dtypes is None else [
            s.dtype if d is None else d for s, d in zip(srcs, out_dtypes, strict=True)
        ]  # fmt: skip
        # A pair the kernels cannot convert: flattened as bytes, cast after the launch.
        self.post = [None if converts(s.dtype, d) else d for s, d in zip(srcs, ods, strict=True)]
        ods = [s.dtype if p is not None else d for s, d, p in zip(srcs, ods, self.post)]
        srcs = [
            s if (s.is_contiguous() or dense_rows(s, 2)) and not s.data_ptr() % s.element_size()
            else s.contiguous()
            for s in srcs
        ]  # fmt: skip
        srcs = [s.resolve_conj().resolve_neg() if s.is_neg() or s.is_conj() else s for s in srcs]
        self.srcs = tuple(srcs)
        key = tuple((s.data_ptr(), s.shape, s.stride(), s.dtype, d) for s, d in zip(srcs, ods))
        self.table, (self.cx, self.grid), _ = cached_table(key, lambda: _build(srcs, ods))
        self.tptr = self.table.data_ptr()
        self.device = srcs[0].device
        self.outs = [((s.shape[0] * s.shape[1], *s.shape[2:]), d) for s, d in zip(srcs, ods)]
        if not any(self.post):
            self.post = None
        self.plans: dict[int, LaunchPlan] = {}

    def __call__(self) -> list[Tensor]:
        dev = self.device
        outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in self.outs]
        if not self.grid:
            return outs if self.post is None else self._cast(outs)
        ptrs = [o.data_ptr() for o in outs]
        acc = 0
        for p in ptrs:
            acc |= p
        key = acc & 15
        plan = self.plans.get(key)
        if plan is None:
            wb, i32, ru, r, cb, nt, cv = zip(*self.cx, strict=True)
            cx = dict(K=len(outs), WB=wb, I32=i32, RU=ru, R=r, CB=cb, NT=nt, CV=cv)
            plan = self.plans[key] = LaunchPlan(
                _transpose_flatten_kernel, self.grid, cx, self.device
            )
        if not plan.direct(self.tptr, tuple(ptrs)):
            plan.generic(self.table, tuple(outs))
        return outs if self.post is None else self._cast(outs)

    def _cast(self, outs: list[Tensor]) -> list[Tensor]:
        return [o if d is None else o.to(d) for o, d in zip(outs, self.post, strict=True)]


def flattener(srcs: Sequence[Tensor], out_dtypes: Sequence | None = None) -> Flattener:
    """A :class:`Flattener` of ``srcs`` (not cached here: it holds its sources; the caller keeps
    it as long as they live; its table is cached by content)."""
    return Flattener(srcs, out_dtypes)


def transpose_flatten(srcs: Sequence[Tensor], out_dtypes: Sequence | None = None) -> list[Tensor]:
    """Swap and flatten the first two dims of every tensor, in one launch.

    Args:
        srcs: tensors ``(S0, S1, *rest)`` on one device, any dtypes, any strides (rows that are
            not dense are made contiguous first; strided rows are read in place).
        out_dtypes: per tensor, the dtype of its output (``None``: its own; see
            :class:`Flattener`).

    Returns:
        New contiguous tensors ``(S1*S0, *rest)``; row ``j*S0 + i`` is ``src[i, j]``.
    """
    return flattener(srcs, out_dtypes)()
