"""Minibatch gather: rows picked by an on-device index array, for many keys, in one launch.

Three ways to map an output row to a source row, chosen per key (``MODE``):

- ``ROWS``: a tensor ``(L, *shape)``; output row ``r`` is source row ``perm[start + r] % L``.
- ``ENV_MAJOR``: a time-major storage ``(T, N, *shape)`` read as its env-major flattening (what
  ``swap_and_flatten01`` would return): row ``i = perm[start + r] % L`` is ``src[i % T, i // T]``.
  A minibatch of a rollout is served straight from the buffer, with no flattened copy.
- ``CHUNKS``: sequences of ``seq`` consecutive steps of one env, for recurrent policies. Chunk id
  ``c = perm[start + b]`` is env ``c // nc``, chunk ``c % nc`` (``nc = T // seq``); output row
  ``s * nb + b`` (an ``(S, nb, *shape)`` output, ``S`` = ``seq`` or 1 for the first step only)
  is ``src[(c % nc) * seq + s, c // nc]``.

A program finds its key with one vector load of the table's first-program column, then copies
tiles of ``R`` rows x ``CB`` units: the row index arithmetic (the permutation load, the modulo,
the divisions of ENV_MAJOR and CHUNKS) is done once per row, never per unit, and the columns of
a row are a plain ``arange`` (coalesced, 128-bit for 16-byte units). The permutation stays on
the device: serving a minibatch costs no host round trip. Sources are fixed (a dataset's
tensors, a buffer's storages), so their descriptors live in a device table built once; outputs
are new every call (a tuple of pointers).

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

__all__ = ["ROWS", "ENV_MAJOR", "CHUNKS", "Gatherer", "gatherer", "permuted_gather"]

ROWS, ENV_MAJOR, CHUNKS = 0, 1, 2


@triton.jit
def _bound32(i, n):
    """The low 32 bits of index ``i`` kept in ``[0, n)`` (``0 < n < 2**31``) by one unsigned
    min: an index the host never saw cannot send a read outside the source."""
    u = i.to(tl.int32).to(tl.uint32, bitcast=True)
    return tl.minimum(u, (n - 1).to(tl.uint32)).to(tl.int32, bitcast=True)


@triton.jit
def _gather_key(p_t, d_p, p_s, i_b, nb, seq, nc, WB: tl.constexpr, MODE: tl.constexpr,
                MOD: tl.constexpr, I32: tl.constexpr, RU: tl.constexpr, R: tl.constexpr,
                CB: tl.constexpr, NT: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                V: tl.constexpr, SB: tl.constexpr, DB: tl.constexpr):  # fmt: skip
    # Table row: [address, s_a, s_b (units), L, T, output rows, first program, -]. Every row
    # read is bounded by L (CHUNKS: the number of chunks). S == 0: a key copied as bytes; else
    # units of V elements (of SB and DB bytes), converted from code S to code D.
    s_p = addr(tl.load(p_t))
    if S > 0:
        s_v = typed(s_p, S)
        d_v = typed(d_p, D)
        if V > 1:
            s_v = tl.multiple_of(s_v, V * SB)
            d_v = tl.multiple_of(d_v, V * DB)
    s_a = tl.load(p_t + 1)
    s_b = tl.load(p_t + 2)
    n_l = tl.load(p_t + 3)
    n_t = tl.load(p_t + 4)
    n_r = tl.load(p_t + 5)
    if I32:
        s_a = s_a.to(tl.int32)
        s_b = s_b.to(tl.int32)
    for i_t in range(NT):
        o_r = (i_b * NT + i_t) * R + tl.arange(0, R)
        m_r = o_r < n_r
        if MODE == 2:
            # Chunks: output row s * nb + b reads step (c % nc) * seq + s of env c // nc.
            o_r32 = o_r.to(tl.int32)
            i_s = o_r32 // nb
            # Bounded whatever the ids hold: never a chunk outside [0, N * nc).
            i_c = _bound32(tl.load(p_s + (o_r32 - i_s * nb), mask=m_r, other=0), n_l)
            i_e = i_c // nc
            i_st = (i_c - i_e * nc) * seq + i_s
            if I32:
                o_s = i_st * s_a + i_e * s_b
            else:
                o_s = i_st.to(tl.int64) * s_a + i_e.to(tl.int64) * s_b
        else:
            i_x = tl.load(p_s + o_r, mask=m_r, other=0)
            if MOD:
                # Python's modulo, in 64 bits: an assigned permutation may hold any int64, and
                # C's % keeps the sign of a negative entry. Never a row outside [0, L).
                i_x = i_x % n_l
                i_x = tl.where(i_x < 0, i_x + n_l, i_x)
            elif I32:
                # The host found the permutation inside [0, L) when it last looked; a write it
                # could not see (through NumPy, DLPack, another stream) must still not make
                # the gather read outside the tensor: one unsigned min per row keeps the row
                # in [0, L). sm_90 SASS of a 4-byte-row gather: 237 instructions unbounded,
                # 239 bounded (a 64-bit clamp took 308, and a 64-bit select made ptxas spill).
                i_x = _bound32(i_x, n_l)
            else:
                i_x = tl.where(i_x.to(tl.uint64, bitcast=True) < n_l.to(tl.uint64), i_x, 0)
            if MODE == 1:
                # Env-major row i of a (T, N) storage: step i % T of env i // T.
                i_32 = i_x.to(tl.int32)
                i_e = i_32 // n_t.to(tl.int32)
                i_st = i_32 - i_e * n_t.to(tl.int32)
                if I32:
                    o_s = i_st * s_a + i_e * s_b
                else:
                    o_s = i_st.to(tl.int64) * s_a + i_e.to(tl.int64) * s_b
            else:
                if I32:
                    o_s = i_x.to(tl.int32) * s_a
                else:
                    o_s = i_x * s_a
        if I32:
            o_d = o_r.to(tl.int32) * RU
        else:
            o_d = o_r * RU
        for i_c in tl.static_range((RU + CB - 1) // CB):
            o_c = i_c * CB + tl.arange(0, CB)
            m = (m_r[:, None] & (o_c < RU)[None, :])[:, :, None]
            if S == 0:
                b_x = tl.load(tile_ptrs(s_p, o_s, o_c, WB), mask=m)
                tl.store(tile_ptrs(d_p, o_d, o_c, WB), b_x, mask=m)
            else:
                b_x = tl.load(tile_vptrs(s_v, o_s, o_c, V), mask=m)
                tl.store(tile_vptrs(d_v, o_d, o_c, V), cvt(b_x, S, D), mask=m)


@triton.jit(do_not_specialize=["start", "nb", "seq", "nc"])
def _permuted_gather_kernel(tab, outs, perm, start, nb, seq, nc, K: tl.constexpr,
                            WB: tl.constexpr, MODE: tl.constexpr, MOD: tl.constexpr,
                            I32: tl.constexpr, RU: tl.constexpr, R: tl.constexpr,
                            CB: tl.constexpr, NT: tl.constexpr, CV: tl.constexpr):  # fmt: skip
    i_p = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, pow2(K))
    p_0s = tl.load(tab + o_k * 8 + 6, mask=o_k < K, other=1 << 62)
    i_k = tl.sum((p_0s <= i_p).to(tl.int32), axis=0) - 1
    p_0 = tl.max(tl.where(o_k == i_k, p_0s, 0), axis=0)
    p_s = perm + start.to(tl.int64)
    for k in tl.static_range(K):
        if i_k == k:
            d_p = outs[k].to(tl.pointer_type(tl.int8))
            _gather_key(tab + k * 8, d_p, p_s, i_p - p_0, nb, seq, nc, WB[k], MODE[k], MOD[k],
                        I32[k], RU[k], R[k], CB[k], NT[k], CV[k][0], CV[k][1], CV[k][2],
                        CV[k][3], CV[k][4])  # fmt: skip


def _layout(s: Tensor, mode: int, rows: int, od: torch.dtype):
    """(address, s_a, s_b, units per row, wb, i32, tile rows, col block, tiles per program,
    conversion): ``od`` the output dtype (the source's: bytes; another: elements, converted)."""
    es = s.element_size()
    lead = 1 if mode == ROWS else 2
    re = math.prod(s.shape[lead:])
    s_a = s.stride(0) * es
    s_b = s.stride(1) * es if mode != ROWS else 0
    if od == s.dtype:  # bytes: the widest unit the sizes, strides and address allow
        wb = word_bytes(s.data_ptr(), re * es, s_a, s_b)
        cv, su, rb, ub = BYTES_CV, wb, re * es, wb
    else:  # elements: V per unit, converted (tiles sized by the bytes written)
        db = od.itemsize
        v = vec_elems(es, db, (re, s_a // es, s_b // es), s.data_ptr())
        cv, wb = (code_of(s.dtype), code_of(od), v, es, db), 0
        su, rb, ub = v * es, re * db, v * db
    ru, r, cb, nt = row_tiles(rb, ub)
    if mode == ROWS:
        extent = (s.shape[0] - 1) * (s_a // su) + ru
    else:
        extent = (s.shape[0] - 1) * (s_a // su) + (s.shape[1] - 1) * (s_b // su) + ru
    i32 = extent < I32_LIMIT and rows * ru < I32_LIMIT
    return s.data_ptr(), s_a // su, s_b // su, ru, wb, i32, r, cb, nt, cv


def _build(srcs, modes, lengths, first, n, count, wrap, seq, ods):
    rows, cx, p = [], [], 0
    for s, mode, length, f, od in zip(srcs, modes, lengths, first, ods, strict=True):
        rows_of = s.shape[0] if mode == ROWS else s.shape[0] * s.shape[1]
        if mode == CHUNKS:
            length = rows_of // seq  # bounds the chunk ids: N * (T // seq) chunks
        elif not 1 <= length <= rows_of:
            # The modulo must keep every read inside the tensor.
            raise IndexError(f"gather: a modulo length of {length} for a source of {rows_of} rows")
        out_rows = count * (seq if mode == CHUNKS and not f else 1)
        ptr, s_a, s_b, ru, wb, i32, r, cb, nt, cv = _layout(s, mode, out_rows, od)
        t = s.shape[0] if mode != ROWS else 1
        rows.append((ptr, s_a, s_b, length, t, out_rows, p))
        mod = mode != CHUNKS and (wrap or length < n)
        cx.append((wb, mode, mod, i32, ru, r, cb, nt, cv))
        p += -(-out_rows // (r * nt)) if ru else 0
    return srcs[0].device, rows, (tuple(cx), p)


class Gatherer:
    """The minibatch gather of a fixed list of sources, prepared once and called per minibatch.

    ``gatherer(perm, start)`` returns one new contiguous tensor per source: ``count`` rows of a
    ``ROWS`` or ``ENV_MAJOR`` source (``(count, *shape)``), or ``(S, count, *shape)`` for a
    ``CHUNKS`` source (``S`` = ``seq``, or 1 for a key of ``first_step``). Every call replays
    one cached launch plan: per call, the outputs' allocation, one ``data_ptr()`` each, and the
    launch.

    Args:
        srcs: the sources, on one device, any dtypes: ``(L, *shape)`` for ``ROWS``,
            ``(T, N, *shape)`` for ``ENV_MAJOR`` and ``CHUNKS``; any strides on the leading
            dims (rows that are not dense are made contiguous first).
        modes: ``ROWS``, ``ENV_MAJOR`` or ``CHUNKS`` per source.
        lengths: the modulo length of each source (``ROWS``: at most its rows; ``ENV_MAJOR``:
            at most ``T * N``); unused for ``CHUNKS``.
        n: the length of the permutations this gatherer will be called with.
        count: rows per minibatch (``CHUNKS``: chunks per minibatch).
        wrap: the permutations may hold entries outside ``[0, n)``: every key takes the modulo
            (Python's: never negative), full-length keys included.
        seq: steps per chunk (``CHUNKS``); ``T`` must be a multiple of it.
        first_step: per source, whether a ``CHUNKS`` source yields only each chunk's first step.
        out_dtypes: per source, the dtype to serve it in (``None``, or an entry ``None``: its
            own dtype, moved as bytes). Converted in-kernel where :func:`converts` allows (a
            bfloat16 or float16 storage widened to float32: exact), else cast with torch after
            the launch (one more copy).
    """

    __slots__ = (
        "srcs",
        "table",
        "tptr",
        "cx",
        "grid",
        "shapes",
        "device",
        "plans",
        "nb",
        "seq",
        "nc",
        "post",
    )

    def __init__(self, srcs: Sequence[Tensor], modes: Sequence[int], lengths: Sequence[int],
                 n: int, count: int, wrap: bool = False, seq: int = 1,
                 first_step: Sequence[bool] | None = None,
                 out_dtypes: Sequence | None = None) -> None:  # fmt: skip
        lead = [1 if m == ROWS else 2 for m in modes]
        ods = [s.dtype for s in srcs] if out_dtypes is None else [
            s.dtype if d is None else d for s, d in zip(srcs, out_dtypes, strict=True)
        ]  # fmt: skip
        # A pair the kernels cannot convert: gathered as bytes, cast after the launch.
        post = [None if converts(s.dtype, d) else d for s, d in zip(srcs, ods, strict=True)]
        ods = [s.dtype if p is not None else d for s, d, p in zip(srcs, ods, post)]
        self.post = post if any(post) else None
        srcs = [
            s if (s.is_contiguous() or dense_rows(s, d)) and not s.data_ptr() % s.element_size()
            else s.contiguous()
            for s, d in zip(srcs, lead, strict=True)
        ]  # fmt: skip
        srcs = [s.resolve_conj().resolve_neg() if s.is_neg() or s.is_conj() else s for s in srcs]
        first = tuple(first_step) if first_step is not None else (False,) * len(srcs)
        self.srcs = tuple(srcs)
        key = (n, count, wrap, seq, tuple(modes), tuple(lengths), first) + tuple(
            (s.data_ptr(), s.shape, s.stride(), s.dtype, od) for s, od in zip(srcs, ods)
        )
        self.table, (self.cx, self.grid), _ = cached_table(
            key, lambda: _build(srcs, modes, lengths, first, n, count, wrap, seq, ods)
        )
        self.tptr = self.table.data_ptr()
        self.shapes = []
        for s, m, d, f, od in zip(srcs, modes, lead, first, ods, strict=True):
            tail = tuple(s.shape[d:])
            shape = (count, *tail) if m != CHUNKS else ((1 if f else seq), count, *tail)
            self.shapes.append((shape, od))
        self.device = srcs[0].device
        self.nb, self.seq = count, seq
        self.nc = next((s.shape[0] // seq for s, m in zip(srcs, modes) if m == CHUNKS), 1)
        self.plans: dict[int, LaunchPlan] = {}

    def __call__(self, perm: Tensor, start: int) -> list[Tensor]:
        """Gather minibatch ``perm[start:start + count]`` (``CHUNKS``: chunk ids)."""
        dev = self.device
        outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in self.shapes]
        if not self.grid:
            return outs if self.post is None else self._cast(outs)
        ptrs = [o.data_ptr() for o in outs]
        pp = perm.data_ptr()
        acc = pp
        for p in ptrs:
            acc |= p
        key = acc & 15  # the pointers' 16-byte alignment is part of the specialization
        plan = self.plans.get(key)
        if plan is None:
            wb, mode, mod, i32, ru, r, cb, nt, cv = zip(*self.cx, strict=True)
            cx = dict(K=len(outs), WB=wb, MODE=mode, MOD=mod, I32=i32, RU=ru, R=r, CB=cb, NT=nt,
                      CV=cv)  # fmt: skip
            plan = self.plans[key] = LaunchPlan(_permuted_gather_kernel, self.grid, cx, dev)
        if not plan.direct(self.tptr, tuple(ptrs), pp, start, self.nb, self.seq, self.nc):
            plan.generic(self.table, tuple(outs), perm, start, self.nb, self.seq, self.nc)
        return outs if self.post is None else self._cast(outs)

    def _cast(self, outs: list[Tensor]) -> list[Tensor]:
        return [o if d is None else o.to(d) for o, d in zip(outs, self.post, strict=True)]


def gatherer(srcs: Sequence[Tensor], modes: Sequence[int], lengths: Sequence[int], n: int,
             count: int, wrap: bool = False, seq: int = 1,
             first_step: Sequence[bool] | None = None,
             out_dtypes: Sequence | None = None) -> Gatherer:  # fmt: skip
    """A :class:`Gatherer` of these arguments (not cached here: it holds its sources, which a
    module-level cache would keep alive; the caller, a dataset, keeps it; its table is cached
    by content)."""
    return Gatherer(srcs, modes, lengths, n, count, wrap, seq, first_step, out_dtypes)


def permuted_gather(
    srcs: Sequence[Tensor],
    perm: Tensor,
    start: int,
    count: int,
    wrap: bool = False,
    lengths: Sequence[int] | None = None,
    out_dtypes: Sequence | None = None,
) -> list[Tensor]:
    """Gather rows ``perm[start:start+count]`` (modulo each tensor's length), in one launch.

    Args:
        srcs: tensors ``(L_k, *shape_k)`` on ``perm``'s device, any dtypes, any row stride
            (rows that are not dense are made contiguous first). ``L_k >= 1``.
        perm: 1-D int64 permutation of ``range(n)`` (``n < 2**31``), read on the device.
        start: first entry of ``perm`` to use (not a compile-time constant).
        count: rows to gather, ``start + count <= n``.
        wrap: ``perm`` may hold any int64 (an assigned permutation): every key then takes its
            entries modulo its length (Python's modulo), not only the shorter keys.
        lengths: per tensor, the length ``L_k`` to take the modulo by, ``1 <= L_k <= R_k``
            (default: ``R_k``, its rows); a key is reduced iff ``wrap or L_k < n``. A length
            past the tensor's end is refused (IndexError): no read ever leaves a tensor.
        out_dtypes: per tensor, the dtype of its output (``None``: its own; see
            :class:`Gatherer`).

    Returns:
        New contiguous tensors ``(count, *shape_k)``: ``out[k][r] = srcs[k][perm[start + r] % L_k]``.
    """
    n = perm.shape[0]
    lengths = [s.shape[0] for s in srcs] if lengths is None else list(lengths)
    g = gatherer(srcs, [ROWS] * len(srcs), lengths, n, count, wrap, out_dtypes=out_dtypes)
    return g(perm, start)
