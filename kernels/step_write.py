"""Rollout step write: ``dsts[k][index] = srcs[k]`` for every key, in one launch.

Each destination is a contiguous ``(T, N, *shape)`` buffer, so the step ``index`` of key k is
one contiguous region of ``N * row_bytes`` bytes. The buffers are fixed for the life of an
``ExperienceBuffer``, so their descriptors (address, bytes per step, row bytes, first program)
live in a device table built once; the sources change every step, so they are kernel arguments
(a tuple of pointers: no table to copy per step, and a CUDA graph captured after one warm-up
call replays with whatever the static sources hold).

A program finds its key with one vector load of the table's first-program column (not a walk
over the keys with a dependent load each), then copies ``BB`` bytes of that key's step region.

A key whose source has another dtype (a bool ``dones`` into an int64 key, float32 into a
bfloat16 storage) or whose rows are not dense (a column ``x[:, ::3]``, an ``(N, 1)`` tensor
expanded to ``(N, D)``) is moved as elements instead, ``V`` per unit, converted in-kernel as
``dst.copy_(src)`` converts (see ``_convert.py``), in the same launch as the byte keys.
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
    vec_elems,
    word_bytes,
)
from ._convert import BYTES_CV, code_of, converts, cvt, raw_code, storage_bytes, typed

__all__ = ["StepWriter", "step_write", "step_writer"]

FLAT, ROWS, ELEMS = 0, 1, 2  # how an element key's source is laid out (see _convert_step)


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


@triton.jit
def _convert_step(s_p, s_r, s_c, d_p, i_b, n_b, r_b, S: tl.constexpr, D: tl.constexpr,
                  V: tl.constexpr, MD: tl.constexpr, I32: tl.constexpr, SB: tl.constexpr,
                  DB: tl.constexpr, BB: tl.constexpr, CH: tl.constexpr):  # fmt: skip
    # Elements [i_b*BB/DB, (i_b+1)*BB/DB) of one key's step region, in units of V elements,
    # CH units at a time, each converted from code S to code D. The source: FLAT (laid out like
    # the destination), ROWS (dense rows, s_r units apart) or ELEMS (rows of one dim: s_r and
    # s_c elements apart, either may be 0; loads are scalar, stores still V wide).
    n_u = n_b // (V * DB)
    r_u = r_b // (V * DB)
    if I32:
        r_u = r_u.to(tl.int32)
        s_r = s_r.to(tl.int32)
        s_c = s_c.to(tl.int32)
    else:
        s_r = s_r.to(tl.int64)
        s_c = s_c.to(tl.int64)
    o_0 = i_b * (BB // (V * DB))
    p_s = typed(s_p, S)
    if MD != 2 and V > 1:
        p_s = tl.multiple_of(p_s, V * SB)
    p_d = typed(d_p, D)
    if V > 1:
        p_d = tl.multiple_of(p_d, V * DB)
    o_v = tl.arange(0, V)[None, :]
    for i_c in range(BB // (V * DB) // CH):
        o_d = o_0 + i_c * CH + tl.arange(0, CH)
        m_d = (o_d < n_u)[:, None]
        if I32:
            o_d = o_d.to(tl.int32)
        if MD == 0:
            o_s = (o_d * V)[:, None] + o_v
        else:
            i_r = o_d // r_u
            o_c = o_d - i_r * r_u
            if MD == 1:
                o_s = ((i_r * s_r + o_c) * V)[:, None] + o_v
            else:
                o_s = (i_r * s_r)[:, None] + ((o_c * V)[:, None] + o_v) * s_c
        b_x = tl.load(p_s + o_s, mask=m_d)
        tl.store(p_d + (o_d * V)[:, None] + o_v, cvt(b_x, S, D), mask=m_d)


@triton.jit(do_not_specialize=["index"])
def _step_write_kernel(tab, srcs, s_us, index, K: tl.constexpr, WB: tl.constexpr,
                       FLAT: tl.constexpr, I32: tl.constexpr, CV: tl.constexpr,
                       BB: tl.constexpr, CH: tl.constexpr):  # fmt: skip
    # Table row k: [address, bytes per step, bytes per row, first program of key k].
    # CV[k]: (S, D, V, SB, DB, MD, j); S == 0 for a key copied as bytes, else its element path
    # (see _convert_step), its row stride in s_us[k] and its element stride (ELEMS) in s_us[j].
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
            if CV[k][0] == 0:
                _copy_step(s_p, s_us[k], d_p, i_p - p_0, n_b, tl.load(p_t + 2),
                           WB[k], FLAT[k], I32[k], BB, CH)  # fmt: skip
            else:
                _convert_step(s_p, s_us[k], s_us[CV[k][6]], d_p, i_p - p_0, n_b, tl.load(p_t + 2),
                              CV[k][0], CV[k][1], CV[k][2], CV[k][5], I32[k], CV[k][3], CV[k][4],
                              BB, CH)  # fmt: skip


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

    ``writer(index, srcs)`` writes ``srcs[k]`` into step ``index`` of ``dsts[k]``, converting
    dtypes in the same launch (see :func:`~rollout_buffers.kernels.converts`). Contiguous,
    16-byte aligned sources of the destinations' dtypes replay one cached launch plan (per call:
    a few attribute reads and one ``data_ptr()`` per source); any other layout seen before (the
    same dtypes, strides and address alignments) replays the plan cached for it.

    Args:
        dsts: contiguous ``(T, N, *shape)`` tensors, all on one device (any dtypes), whose
            storage stays where it is for the writer's life (the buffer's own tensors).
    """

    __slots__ = ("dsts", "table", "tptr", "info", "grid", "plans", "seen", "device", "complex",
                 "dtypes", "_aligned")  # fmt: skip

    #: Sources must have the destinations' row shape; their dtype may differ wherever
    #: ``converts(src.dtype, dst.dtype)`` (converted in-kernel; other pairs are cast with torch
    #: first, one more copy).
    exact = True
    casts = True

    def __init__(self, dsts: Sequence[Tensor]) -> None:
        self.dsts = tuple(dsts)
        key = tuple((d.data_ptr(), d.shape, d.dtype) for d in dsts)
        self.table, (self.info, self.grid), _ = cached_table(
            key, lambda: _build(dsts), STEP_TABLES, cols=4
        )
        self.tptr = self.table.data_ptr()
        self.device = dsts[0].device
        self.complex = any(d.is_complex() for d in dsts)
        self.dtypes = tuple(d.dtype for d in dsts)
        self.plans: dict[tuple, tuple] = {}  # layout -> (plan, row strides)
        self.seen: dict[tuple, tuple] = {}  # what sources look like -> (plan, row strides)
        self._aligned: tuple | None = None  # the plan of contiguous, 16-byte aligned sources

    def __call__(self, index: int, srcs: Sequence[Tensor], ptrs: list | None = None) -> None:
        """Write step ``index`` (``0 <= index < T``, not checked; not a compile-time constant,
        so a new step never recompiles). ``srcs[k]`` is on ``dsts[k]``'s device, of shape
        exactly ``(N, *shape)``, any dtype (converted as ``copy_`` converts), any strides: rows
        of one dim or scalars are read in place whatever their strides (a column ``x[:, 0]``, a
        slice ``x[:, a:b]``, an ``expand``-ed tensor of stride 0); rows of more dims in place
        when dense, else made contiguous first. ``ptrs``: the sources' ``data_ptr()``, when the
        caller has read them already."""
        hit = self._aligned
        if hit is not None and not self.complex:
            # The common case: contiguous sources of the destinations' dtypes on 16-byte
            # boundaries (as the caching allocator hands them out) replay one plan.
            got, acc = [], 0
            for s, dt in zip(srcs, self.dtypes):
                if not s.is_contiguous() or s.is_neg() or s.dtype is not dt:
                    break
                p = s.data_ptr()
                acc |= p
                got.append(p)
            else:
                if not acc & 15:
                    plan, s_us = hit
                    if not plan.direct(self.tptr, tuple(got), s_us, index):
                        plan.generic(self.table, tuple(srcs), s_us, index)
                    return
        if self.grid:
            self._general(index, srcs, ptrs)

    def dense(self, index: int, srcs: Sequence[Tensor], ptrs: list | None = None) -> None:
        """:meth:`__call__` for sources the caller checked: each contiguous, of its
        destination's dtype and row shape, with no lazy sign flag (``ptrs``: their addresses,
        when the caller has read them)."""
        hit = self._aligned
        if hit is not None and not self.complex:  # (a conjugate flag: __call__ applies it)
            if ptrs is None:
                ptrs = [s.data_ptr() for s in srcs]
            acc = 0
            for p in ptrs:
                acc |= p
            if not acc & 15:
                plan, s_us = hit
                if not plan.direct(self.tptr, tuple(ptrs), s_us, index):
                    plan.generic(self.table, tuple(srcs), s_us, index)
                return
        self(index, srcs, ptrs)

    def _general(self, index: int, srcs: Sequence[Tensor], ptrs: list | None = None) -> None:
        if not self.complex:
            # A layout seen before: what decides the plan is each source's dtype, strides,
            # address modulo 16 and sign flag (its shape is the row's, by contract).
            if ptrs is None:
                ptrs = [s.data_ptr() for s in srcs]
            seen = tuple([(s.dtype, s.stride(), p & 15, s.is_neg()) for s, p in zip(srcs, ptrs)])
            hit = self.seen.get(seen)
            if hit is not None:
                plan, s_us = hit
                if not plan.direct(self.tptr, tuple(ptrs), s_us, index):
                    plan.generic(self.table, tuple(srcs), s_us, index)
                return
        args, layout, cx, s_us, aligned, ready = self._layout(srcs)
        hit = self.plans.get(layout)
        if hit is None:
            hit = self.plans[layout] = (LaunchPlan(_step_write_kernel, self.grid, cx, self.device),
                                        s_us)  # fmt: skip
            if aligned:
                self._aligned = hit
        if ready and not self.complex:  # the sources go as they are: replay by their looks
            if len(self.seen) >= 64:  # bounded: a caller cycling through layouts
                self.seen.clear()
            self.seen[seen] = hit
        plan, s_us = hit
        if not plan.direct(self.tptr, tuple(s.data_ptr() for s in args), s_us, index):
            plan.generic(self.table, tuple(args), s_us, index)

    def _layout(self, srcs: Sequence[Tensor]):
        """How each source is read: ``(args, layout, constexprs, strides, aligned, ready)``.
        ``args`` are the tensors the kernel reads (the sources, or copies where one cannot be
        read in place: ``ready`` False); ``layout`` keys the plan."""
        args, layout, wbs, flats, i32s, cvs, s_us, s_cs = [], [], [], [], [], [], [], []
        aligned = ready = True
        k_all = len(srcs)
        for k, (s, dd, (nb, rb, wb_flat, wb_row)) in enumerate(
            zip(srcs, self.dtypes, self.info, strict=True)
        ):
            if s.is_neg() or s.is_conj():  # a lazy sign flag is not in the bytes: apply it
                s, ready = s.resolve_conj().resolve_neg(), False
            if s.dtype != dd and not converts(s.dtype, dd):  # torch casts it: one more copy
                s, ready = s.to(dd), False
            es = s.element_size()
            dense = s.is_contiguous() or dense_rows(s, 1)
            strided = s.dim() == 2 and (s.dtype != dd or es <= 8)
            if not (dense or strided) or s.data_ptr() % es:
                s, dense, ready = s.contiguous(), True, False
            ptr = s.data_ptr()
            flat = s.is_contiguous() or (dense and s.shape[0] == 1)
            if s.dtype == dd and dense:
                # Bytes: the widest unit the sizes, the stride and both addresses allow.
                if flat:
                    wb, s_u = word_bytes(wb_flat, ptr), 0
                else:
                    s_b = s.stride(0) * es
                    wb = word_bytes(wb_row, ptr, s_b)
                    s_u = s_b // wb
                i32 = nb // wb < I32_LIMIT
                aligned = aligned and flat and not ptr & 15
                layout.append((wb, flat, s_u, not ptr & 15))
                wbs.append(wb)
                flats.append(flat)
                i32s.append(i32)
                cvs.append(BYTES_CV + (0, k))
                s_us.append(s_u)
            else:
                # Elements, converted: V per unit, as wide as both sides allow.
                aligned = False
                same = s.dtype == dd
                sc, dc = (raw_code(dd),) * 2 if same else (code_of(s.dtype), code_of(dd))
                sb, db = es, storage_bytes(dc)
                n, d = s.shape[0], rb // db
                if flat:
                    md, s_r, s_c = FLAT, 0, 0
                    v = vec_elems(sb, db, (n * d,), ptr, wb_flat)
                elif dense:
                    md, s_r, s_c = ROWS, s.stride(0), 1
                    v = vec_elems(sb, db, (d, s_r), ptr, wb_flat)
                else:
                    md, (s_r, s_c) = ELEMS, s.stride()
                    v = vec_elems(sb, db, (d,), 0, wb_flat)
                extent = max(n - 1, 0) * s_r + max(d - 1, 0) * s_c + 1
                i32 = nb // db < I32_LIMIT and extent < I32_LIMIT
                j = k
                if md == ELEMS:
                    j = k_all + len(s_cs)
                    s_cs.append(s_c)
                s_u = s_r // v if md == ROWS else s_r
                layout.append((sc, dc, v, md, s_u, s_c, i32, not ptr & 15))
                wbs.append(0)
                flats.append(False)
                i32s.append(i32)
                cvs.append((sc, dc, v, sb, db, md, j))
                s_us.append(s_u)
            args.append(s)
        cx = dict(K=len(args), WB=tuple(wbs), FLAT=tuple(flats), I32=tuple(i32s),
                  CV=tuple(cvs), BB=BLOCK_BYTES, CH=CHUNK)  # fmt: skip
        return args, tuple(layout), cx, tuple(s_us + s_cs), aligned, ready


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
        srcs: one tensor per destination on its device, shape exactly ``(N, *shape)``, any
            strides, any dtype (converted in-kernel where :func:`converts` says so, as
            ``copy_`` converts; other pairs are cast with torch first).
    """
    step_writer(dsts)(index, srcs)
